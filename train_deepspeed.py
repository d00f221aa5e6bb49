"""Fine-tune ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B with LoRA (or every weight) in a plain DeepSpeed training loop.

    deepspeed train_deepspeed.py --model_dir=model_hub/chatglm2-6b --data_name=msra
    deepspeed --num_gpus 2 train_deepspeed.py --model_dir=model_hub/chatglm2-6b --data_name=msra --per_device_train_batch_size=2
    deepspeed train_deepspeed.py --model_dir=model_hub/chatglm2-6b --data_name=msra --resume_from_checkpoint=auto
    python train_deepspeed.py --model_dir=model_hub/chatglm2-6b --data_name=msra    # one process, no launcher
    mpirun -np 2 python train_deepspeed.py --model_dir=model_hub/chatglm2-6b --data_name=msra    # ranks from MPI
    deepspeed --num_gpus 2 train_deepspeed.py --model_dir=model_hub/chatglm2-6b --data_name=msra --method=full --deepspeed=deepspeed_zero3.json

The defaults (model, LoRA, learning rate, epochs) are the shipped small model's; with a 6B model add about
--learning_rate=2e-4 --num_train_epochs=3.

The same training as train_trainer.py (same config keys, data, LoRA, loss normalisation and outputs), written out as
a loop around `deepspeed.initialize`, so that every step is visible. The ZeRO stage and optimizer come from
--deepspeed (deepspeed.json: ZeRO-2, AdamW); its "auto" values are filled from this script's config the way the
Trainer fills them, so `deepspeed train_trainer.py` and this script train alike. deepspeed.json names no scheduler,
so both use the Trainer's linear warmup and decay (a "scheduler" section, if you add one, is honoured). The loss of a step is normalised by
the target tokens of all its micro-batches on all processes, so accumulation and data parallelism change nothing.
Reads data/<data_name>/instruct_data/{train,dev}.txt (made by process.py) and writes
checkpoint/<data_name>/train_deepspeed/:
    adapter_model/   the LoRA adapter in PEFT format + train_args.json
    prefix_model/    --method=ptuning: the P-tuning v2 prefix (official layout, safetensors) + train_args.json
    model/           --method=full or freeze: the fine-tuned model folder (official layout, loads as --model_dir) + train_args.json
    checkpoint-N/    DeepSpeed checkpoints (global_stepN/: trained weights, optimizer, schedule, data position) for
                     --resume_from_checkpoint, RNG states, the adapter of step N (LoRA), trainer_state.json (the log),
                     train_args.json (the run record: a resume takes its settings and is checked against them)
    runs/            TensorBoard logs;  loss.png  the loss curve
"""
import itertools
import json
import math
import os
import random
import resource
import time
from pathlib import Path

import utils.log_filters  # noqa: F401, I001  (before the libraries: bitsandbytes logs a known-harmless message on import)
import deepspeed
import torch
import torch.distributed as dist
import transformers
from deepspeed.accelerator import get_accelerator
from torch.utils.data import DataLoader, DistributedSampler, Subset
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from utils.config_utils import ConfigError, parse_config
from utils.dataset import PaddingCollator
from utils.distributed import free_port, set_env_from_mpi
from utils.model_loading import load_model_and_tokenizer, resolve_dtype
from utils.trainer import check_weights_finite, load_datasets, peak_memory_gib, plot_loss, prepare_packing
from utils.training_methods import (add_lora, freeze_all_but, gathered_state_dict, prefix_settings, prefix_state,
                                    print_trainable_parameters, save_adapter, save_full_model, save_prefix,
                                    train_prefix_only, write_partial_checkpoint)
from utils.training_options import check_method, check_training_start, checkpoint_dir
from utils.run_dirs import (check_output_dir, finish_output_dir, find_resume_checkpoint, hold_run_folder, mark_complete,
                            prepare_output_dir, rotate_checkpoints)
from utils.run_record import check_resume_matches, resumed_line, run_record, write_run_record

DEFAULTS = {
    "model_dir": "model_hub/chatglm2-small",  # the shipped small model; a 6B model: see README ("Run")
    "data_name": "demo_ner",
    "train_file": "",  # default: data/<data_name>/instruct_data/train.txt (text_data/ for data_format=text)
    "dev_file": "",  # default: data/<data_name>/instruct_data/dev.txt, text_data/ likewise, if it exists; none: no evaluation
    "output_dir": "",  # default: checkpoint/<data_name>/train_deepspeed
    "max_source_length": 256,
    "max_target_length": 128,
    "data_format": "instruction",  # instruction: {instruct, query, answer} records; text: {text} records for causal-LM training
    "block_size": 512,  # data_format=text: tokens per training block
    "skip_bad_lines": False,
    "loss_on_all_turns": False,  # multi-turn records: every history answer is learnt, not only the last answer
    # (ChatGLM3 conversation records always learn every assistant message without "loss": false)
    "show_example": False,  # print the first training sample: its tokens, ids and which of them are in the loss
    "method": "lora",  # lora: LoRA adapters on frozen weights; ptuning: a P-tuning v2 prefix on frozen weights; freeze: the last blocks; full: every weight (DeepSpeed keeps the fp32 master copy)
    "lora": {"r": 32, "alpha": 64, "dropout": 0.05, "target_modules": "all"},  # all: the four linear layers of a block
    # method=ptuning (THUDM's P-tuning v2): learnt keys and values of pre_seq_len positions in every layer; with
    # prefix_projection they come from a two-layer MLP. The official runs used pre_seq_len 128 and learning rate 2e-2.
    "pre_seq_len": 128,
    "prefix_projection": False,
    # method=freeze (freeze tuning): the last trainable_layers blocks train (a negative number: the first ones), within
    # them the parameters named by trainable_modules ("all", or e.g. "mlp,self_attention"), plus those outside the
    # blocks named by extra_modules (e.g. "final_layernorm,output_layer"). The run writes a whole model folder.
    "freeze": {"trainable_layers": 2, "trainable_modules": "all", "extra_modules": ""},
    "dtype": "auto",  # weights: auto (bf16 on GPUs that have it, else fp16; fp32 on CPU), fp32, fp16, bf16
    "num_train_epochs": 8.0,
    "max_steps": -1,  # > 0 overrides num_train_epochs
    "per_device_train_batch_size": 16,  # with packing: rows of packed samples (up to pack_tokens tokens each)
    # Packed training: several samples per row, each attending only to itself (positions restart per sample), the
    # loss normalised over the target tokens of the step as unpacked, so a packed run trains like the unpacked one on
    # fewer, fuller rows. per_device_train_batch_size then counts rows, not samples. Models that cannot pack train
    # unpacked in batches grouped by length (the log says so).
    "packing": False,
    # Tokens per packed row (the row budget: peak memory follows it and the rows per step, not the longest sample).
    # Measured on an H200 (ChatGLM2-6B LoRA r 8, MSRA, real tokens/s between log lines): one row of 2560 a step
    # 15,700 at 19.4 GiB; one of 3072 18,200 at 20.9 GiB; two of 2048 17,800 at 24.0 GiB; docs/benchmarks.md.
    "pack_tokens": 2560,
    "per_device_eval_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "learning_rate": 3e-3,  # for the small model; 6B models: about 2e-4
    "weight_decay": 0.0,
    "warmup_steps": 0.05,  # a fraction of the total steps if < 1
    "lr_scheduler_type": "linear",  # transformers' names: linear, cosine, constant_with_warmup, ... (without a "scheduler" in --deepspeed)
    "max_grad_norm": 1.0,
    "gradient_checkpointing": False,
    "logging_steps": 10,
    "eval_steps": 100,
    "save_steps": 100,  # <= 0: no checkpoint-N folders (the final adapter / model is written all the same)
    "save_total_limit": 2,  # complete checkpoint-N folders kept (<= 0: all)
    "seed": 42,
    "resume_from_checkpoint": "",  # "auto" = the newest complete checkpoint-N in output_dir, or a path
    "overwrite_output_dir": False,  # replace a finished run (kept as <output_dir>.previous until this one has finished)
    "deepspeed": "deepspeed.json",  # the DeepSpeed config; its "auto" values are filled from this config
    "local_rank": -1,  # set by the deepspeed launcher
    "report_to": "tensorboard",  # tensorboard (runs/), or none
}
# What the Trainer puts into "auto" optimizer fields (TrainingArguments' defaults; train_trainer.py does not set them).
ADAM_BETAS, ADAM_EPSILON = [0.9, 0.999], 1e-8


def resolve_deepspeed_config(path, values, must_match):
    """The DeepSpeed config file with every "auto" replaced from `values` (dotted keys). A value written out in the
    file that disagrees with the script's config is an error, as in the Trainer's DeepSpeed integration."""
    ds_config = json.loads(Path(path).read_text(encoding="utf-8"))
    mismatches = []
    for dotted, value in values.items():
        *parents, key = dotted.split(".")
        node = ds_config
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if not isinstance(node, dict) or key not in node:
            continue
        if node[key] == "auto":
            node[key] = value
        elif dotted in must_match and node[key] != value:
            mismatches.append(f"{path}: {dotted}={node[key]!r} but the config gives {value!r}")

    def autos(node, prefix=""):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from autos(value, f"{prefix}{key}.")
            elif value == "auto":
                yield prefix + key

    left = list(autos(ds_config))
    if left:
        raise ValueError(f"{path}: no value for the \"auto\" entries {left}; write numbers there")
    if mismatches:
        raise ValueError("DeepSpeed config and script config disagree (use \"auto\" or make them equal):\n" + "\n".join(mismatches))
    return ds_config


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start its epoch part-way, after the samples a checkpoint has trained on."""

    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self):
        return self.num_samples - self.skip


class TrainingState:
    """Where training stands: saved with every checkpoint (DeepSpeed's client state, state_dict) and restored from it
    (load_state_dict) in this one place. The counters since the last log line and this session's loss sum stay on
    the device, per rank (no host sync per step): saving sums them over ranks, restoring gives the carried-over sums
    to rank 0. world_size and micro_batches_per_epoch are saved to refuse a resume that would order the data
    differently."""

    def __init__(self, world_size, micro_batches_per_epoch):
        self.world_size, self.micro_batches_per_epoch = world_size, micro_batches_per_epoch
        self.global_step = self.epoch = self.batches_done = 0  # batches_done: micro-batches of this epoch trained
        self.tokens_seen = 0  # real tokens of the logged steps, all ranks
        self.log_history = []
        self.loss_sum_before = 0.0  # the step losses of earlier sessions, summed: train_loss covers every step
        self.loss_since_log = torch.zeros((), device=device)
        self.steps_since_log = self.tokens_since_log = 0
        self.session_loss = torch.zeros((), device=device)  # the step losses of this session, this rank

    def epoch_progress(self):
        return self.epoch + self.batches_done / self.micro_batches_per_epoch

    def train_loss(self):
        """Mean step loss over every step, earlier sessions included (collective: every rank calls it)."""
        return (self.loss_sum_before + all_reduce_sum(self.session_loss).item()) / max(self.global_step, 1)

    def state_dict(self):
        """Collective: every rank calls it (the counters are summed over ranks)."""
        return {"global_step": self.global_step, "epoch": self.epoch, "batches_done": self.batches_done,
                "tokens_seen": self.tokens_seen, "log_history": self.log_history, "world_size": self.world_size,
                "micro_batches_per_epoch": self.micro_batches_per_epoch,
                "train_loss_sum": self.loss_sum_before + all_reduce_sum(self.session_loss).item(),
                # what was trained since the last log line, so that a resumed run logs the same averages
                "pending": {"loss": all_reduce_sum(self.loss_since_log).item(), "steps": self.steps_since_log,
                            "tokens": int(all_reduce_sum(self.tokens_since_log))}}

    def load_state_dict(self, saved, source):
        if "batches_done" not in saved:
            raise ConfigError(f"--resume_from_checkpoint: {source}: not a checkpoint of train_deepspeed.py (no DeepSpeed state "
                              "with its client state)")
        if (saved["world_size"], saved["micro_batches_per_epoch"]) != (self.world_size, self.micro_batches_per_epoch):
            raise ConfigError(f"--resume_from_checkpoint: {source}: saved with world_size={saved['world_size']} and {saved['micro_batches_per_epoch']} "
                              f"micro-batches per epoch; this run has {self.world_size} and {self.micro_batches_per_epoch}: "
                              "the data order would differ")
        self.global_step, self.epoch, self.batches_done = saved["global_step"], saved["epoch"], saved["batches_done"]
        self.tokens_seen, self.log_history = saved["tokens_seen"], saved["log_history"]
        self.loss_sum_before = saved["train_loss_sum"]
        pending = saved["pending"]
        self.loss_since_log.fill_(pending["loss"] if master else 0.0)
        self.steps_since_log, self.tokens_since_log = pending["steps"], pending["tokens"] if master else 0
        if self.batches_done >= self.micro_batches_per_epoch:  # saved at the end of an epoch
            self.epoch, self.batches_done = self.epoch + 1, 0

    def step_done(self, micro_batches, step_loss):
        self.global_step += 1
        self.batches_done += micro_batches
        self.loss_since_log += step_loss
        self.session_loss += step_loss
        self.steps_since_log += 1

    def log_line_done(self):
        self.loss_since_log.zero_()
        self.steps_since_log = self.tokens_since_log = 0

    def next_epoch(self):
        self.epoch, self.batches_done = self.epoch + 1, 0


def rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def all_reduce_sum(value):
    """Sum of a number or tensor over all ranks, as a tensor on this rank's device."""
    tensor = value.detach().clone().to(device) if torch.is_tensor(value) else torch.tensor(value, device=device)
    dist.all_reduce(tensor)
    return tensor


def every(steps):
    """Whether the step just taken is a multiple of `steps` (never for steps <= 0)."""
    return steps > 0 and state.global_step % steps == 0


def memory_stats():
    if torch.cuda.is_available():
        return {"peak_memory_gib": peak_memory_gib()}
    return {"peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}  # Linux: KiB


# ---------------------------------------------------------------------------------------------------------------------
# Config and the process group. The deepspeed launcher sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; under mpirun they
# come from MPI (mpi4py); a plain `python train_deepspeed.py` gets a group of one.
config = parse_config(DEFAULTS, description=__doc__)
output_dir = checkpoint_dir(config["output_dir"], config["data_name"], "train_deepspeed")
set_env_from_mpi()
# Before anything slow: a resumed run's own settings (its checkpoint's record), then the model folder, the data files,
# the options, then the output folder: refused if it holds a run that is neither resumed nor overwritten, and held by
# rank 0 for all ranks (one run at a time writes there).
resume = find_resume_checkpoint(output_dir, config["resume_from_checkpoint"])
check_resume_matches(resume, config, "train_deepspeed.py")
train_file, dev_file = check_training_start(config, "train_deepspeed.py")
if int(os.environ.get("RANK", "0")) == 0:
    hold_run_folder(output_dir)
check_output_dir(output_dir, resume, config["overwrite_output_dir"])
if "RANK" not in os.environ:
    local_rank = max(config["local_rank"], 0)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK=str(local_rank))
accelerator = get_accelerator()  # cuda on GPUs, cpu otherwise (backend nccl / gloo)
deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name())
rank, world_size = dist.get_rank(), dist.get_world_size()
local_rank = int(os.environ["LOCAL_RANK"])
if accelerator.device_name() == "cpu":
    device = torch.device("cpu")
else:
    accelerator.set_device(local_rank)
    device = torch.device(accelerator.device_name(local_rank))
master = rank == 0

# ---------------------------------------------------------------------------------------------------------------------
# Model with LoRA, or all weights trainable (--method=full). "auto" dtype follows the device the engine trains on
# (bf16/fp16 on GPUs, fp32 on CPU); with half-precision weights DeepSpeed keeps the fp32 master copy of what it trains.
method = check_method(config["method"])
full, ptuning, freeze = method == "full", method == "ptuning", method == "freeze"
transformers.set_seed(config["seed"])  # the LoRA weights, or the prefix encoder as the model loads, follow --seed
weight_dtype = resolve_dtype(config["dtype"], device.type)
prefix = prefix_settings(config) if ptuning else {}
model, tokenizer = load_model_and_tokenizer(config["model_dir"], dtype=weight_dtype, device=str(device), **prefix)
model_version = model.model_version
if config["gradient_checkpointing"]:
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
if ptuning:
    train_prefix_only(model, config["model_dir"])  # the prefix encoder alone, in fp32; the engine keeps fp32 masters
elif freeze:
    freeze_all_but(model, **config["freeze"])  # the engine keeps fp32 master copies of the trained blocks
elif not full:
    model = add_lora(model, config["lora"])
if master:
    print_trainable_parameters(model)

# Data: each rank trains on its share of a seeded shuffle (a new one per epoch) and evaluates on its share of dev.
train_data, eval_data = load_datasets(train_file, dev_file, tokenizer, model_version, config["data_format"], config["max_source_length"],
                                      config["max_target_length"], config["block_size"], config["skip_bad_lines"],
                                      config["loss_on_all_turns"], config["show_example"])
train_data, group_by_length = prepare_packing(model, train_data, config["packing"], config["pack_tokens"], config["seed"],
                                           log=print if master else lambda text: None)
if group_by_length and master:
    print("train_deepspeed.py has no length-grouped sampler: training unpacked in shuffled batches")
collate = PaddingCollator(tokenizer.pad_token_id)
batch_size, accumulation = config["per_device_train_batch_size"], config["gradient_accumulation_steps"]
sampler = ResumableSampler(train_data, num_replicas=world_size, rank=rank, shuffle=True, seed=config["seed"])
# Own generators: iterating a loader then leaves the global RNG (LoRA dropout) alone, so a resumed run draws the
# same dropout masks as an uninterrupted one.
train_loader = DataLoader(train_data, batch_size=batch_size, sampler=sampler, collate_fn=collate,
                          generator=torch.Generator().manual_seed(config["seed"]))
eval_loader = None
if eval_data is not None:
    eval_loader = DataLoader(Subset(eval_data, range(rank, len(eval_data), world_size)), batch_size=config["per_device_eval_batch_size"],
                             collate_fn=collate, generator=torch.Generator().manual_seed(config["seed"]))
    # Every rank runs the same number of forward passes (ZeRO-3 gathers weights in them); extra ones are not counted.
    eval_batches = math.ceil(math.ceil(len(eval_data) / world_size) / config["per_device_eval_batch_size"])

# Config, model and data are good: only now is an overwritten run moved aside. One process does it; every process
# learns whether that failed.
failure = [None]
if master:
    try:
        prepare_output_dir(output_dir, resume, config["overwrite_output_dir"])
    except Exception as error:  # noqa: BLE001 - handed to the other ranks, then raised everywhere
        failure[0] = error
dist.broadcast_object_list(failure, src=0)
if failure[0] is not None:
    raise failure[0]

# Steps as the Trainer counts them: an epoch's last optimizer step takes the micro-batches that are left.
micro_batches_per_epoch = math.ceil(sampler.num_samples / batch_size)
steps_per_epoch = max(math.ceil(micro_batches_per_epoch / accumulation), 1)
if config["max_steps"] > 0:
    total_steps = config["max_steps"]
    num_epochs = math.ceil(total_steps / steps_per_epoch)
else:
    total_steps = math.ceil(config["num_train_epochs"] * steps_per_epoch)
    num_epochs = math.ceil(config["num_train_epochs"])
warmup = config["warmup_steps"]
warmup_steps = int(warmup) if warmup >= 1 else math.ceil(total_steps * warmup)

# ---------------------------------------------------------------------------------------------------------------------
# DeepSpeed engine. The "auto" entries get what the Trainer would put there for the same config.
hidden_size = model.config.hidden_size
auto_values = {
    "train_micro_batch_size_per_gpu": batch_size,
    "gradient_accumulation_steps": accumulation,
    "train_batch_size": batch_size * accumulation * world_size,
    "gradient_clipping": config["max_grad_norm"],
    "optimizer.params.lr": config["learning_rate"],
    "optimizer.params.betas": ADAM_BETAS,
    "optimizer.params.eps": ADAM_EPSILON,
    "optimizer.params.weight_decay": config["weight_decay"],
    "scheduler.params.warmup_min_lr": 0,
    "scheduler.params.warmup_max_lr": config["learning_rate"],
    # DeepSpeed refuses 0 warmup steps (and warms up for at least 2): the Trainer passes max(1, warmup), so do we.
    "scheduler.params.warmup_num_steps": max(1, warmup_steps),
    "scheduler.params.total_num_steps": total_steps,
    "fp16.enabled": weight_dtype == torch.float16,
    "bf16.enabled": weight_dtype == torch.bfloat16,
    "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
    "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
    "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
}
not_matched = {"scheduler.params.warmup_min_lr", "zero_optimization.reduce_bucket_size",
               "zero_optimization.stage3_prefetch_bucket_size", "zero_optimization.stage3_param_persistence_threshold"}
ds_config = resolve_deepspeed_config(config["deepspeed"], auto_values, must_match=set(auto_values) - not_matched)
if master:
    print(f"DeepSpeed config ({config['deepspeed']}, resolved):\n{json.dumps(ds_config, indent=2)}")
# A config without a "scheduler" gets the Trainer's schedule of that name (default: linear warmup then linear decay to
# 0, which, unlike DeepSpeed's WarmupDecayLR, takes warmup 0 and starts at the full rate after warmup_steps steps).
trainer_schedule = None
if "scheduler" not in ds_config:
    def trainer_schedule(optimizer):
        return transformers.get_scheduler(config["lr_scheduler_type"], optimizer, warmup_steps, total_steps)
trainable = [p for p in model.parameters() if p.requires_grad]
engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config, lr_scheduler=trainer_schedule)
# The run record (train_args.json) of every checkpoint and of the final output, which adds the metrics.
record = run_record("train_deepspeed.py", config, model_version, train_data, eval_data, world_size, ds_config,
                    deepspeed=deepspeed.__version__)
if master:
    print(f"ZeRO stage {engine.zero_optimization_stage()}, {world_size} process(es), {total_steps} steps "
          f"({steps_per_epoch} per epoch, warmup {warmup_steps}), {batch_size * accumulation * world_size} examples per step")

# Resume: weights, optimizer and schedule from the DeepSpeed checkpoint; where training stands from its client state;
# RNG per rank, next to it.
state = TrainingState(world_size, micro_batches_per_epoch)
if resume:
    resume = Path(resume)
    load_path, client = engine.load_checkpoint(str(resume), load_module_strict=False)  # the tag in resume/latest
    state.load_state_dict(client if load_path is not None else {}, resume)
    set_rng_state(torch.load(resume / f"rng_state_{rank}.pth", weights_only=True))
    if master:
        print(f"{resumed_line(resume, state.global_step, total_steps)}: epoch {state.epoch}, {state.batches_done} micro-batches into it")
start_step, tokens_at_start = state.global_step, state.tokens_seen

tensorboard = master and "tensorboard" in config["report_to"].split(",")
writer = SummaryWriter(str(output_dir / "runs"), purge_step=state.global_step if resume else None) if tensorboard else None


def evaluate():
    """Eval loss as the Trainer computes it: each batch's mean over its target tokens, averaged over the examples."""
    engine.eval()
    total, count = torch.zeros((), device=device), 0
    with torch.no_grad():
        batches = iter(eval_loader)
        for _ in range(eval_batches):
            batch = next(batches, None)
            counted = batch is not None
            batch = {key: value.to(device) for key, value in (batch or collate([eval_data[0]])).items()}
            loss = engine(**batch).loss.float()
            if counted:
                total += loss * len(batch["input_ids"])
                count += len(batch["input_ids"])
    engine.train()
    return (all_reduce_sum(total) / all_reduce_sum(count)).item()


def save_checkpoint():
    """checkpoint-N/ as the Trainer lays it out under DeepSpeed: global_stepN/ (DeepSpeed state of the trainable
    weights, optimizer, schedule; client state: the TrainingState) + latest, rng_state_<rank>.pth,
    the adapter of step N, trainer_state.json and the run record. Once every rank has written its part, the checkpoint is marked
    complete and only then are older checkpoints beyond save_total_limit removed (utils/run_dirs.py)."""
    folder = output_dir / f"checkpoint-{state.global_step}"
    engine.save_checkpoint(str(folder), tag=f"global_step{state.global_step}", client_state=state.state_dict(),
                           exclude_frozen_parameters=True)
    torch.save(rng_state(), folder / f"rng_state_{rank}.pth")
    if not (full or freeze):  # the adapter or prefix of step N (otherwise the DeepSpeed state holds the weights)
        with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):  # whole LoRA weights under ZeRO-3
            if master and ptuning:
                write_partial_checkpoint(folder, prefix_state(engine.module), engine.module.config)
            elif master:
                engine.module.save_pretrained(str(folder), safe_serialization=True)
    if master:
        trainer_state = {"global_step": state.global_step, "epoch": state.epoch_progress(), "log_history": state.log_history}
        (folder / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        write_run_record(folder, record)  # the run's train_args.json, before the marker
    dist.barrier()  # every rank's part is written
    if master:
        mark_complete(folder)
        rotate_checkpoints(output_dir, config["save_total_limit"])
    dist.barrier()


def log(entry):
    entry = {**entry, "epoch": round(state.epoch_progress(), 4), "step": state.global_step}
    state.log_history.append(entry)
    if writer:
        for key, value in entry.items():
            if key not in ("epoch", "step") and isinstance(value, (int, float)):
                writer.add_scalar(("eval/" + key[5:]) if key.startswith("eval_") else f"train/{key}", value, state.global_step)
        writer.flush()
    if master:
        tqdm.write(json.dumps(entry))


# ---------------------------------------------------------------------------------------------------------------------
# Training. Each optimizer step takes `accumulation` micro-batches; the loss is summed over their target tokens and
# divided by the target tokens of all of them on all ranks (as the Trainer does with num_items_in_batch), so
# accumulation and data parallelism give the gradient of one large batch.
engine.train()
progress = tqdm(total=total_steps, initial=state.global_step, desc="training", disable=not master, dynamic_ncols=True)
# A run resumed from its last checkpoint trains no step: its metrics keep the last eval loss it logged.
eval_loss = next((entry["eval_loss"] for entry in reversed(state.log_history) if "eval_loss" in entry), None)
started = log_started = time.time()
while state.global_step < total_steps and state.epoch < num_epochs:
    sampler.set_epoch(state.epoch)
    sampler.skip = state.batches_done * batch_size
    batches = iter(train_loader)
    while state.global_step < total_steps:
        micro_batches = list(itertools.islice(batches, accumulation))
        if not micro_batches:
            break
        num_targets = all_reduce_sum(sum(int(b["labels"][:, 1:].ne(-100).sum()) for b in micro_batches))
        learning_rate = engine.get_lr()[0]  # the rate this step uses
        step_loss = torch.zeros((), device=device)
        for index, batch in enumerate(micro_batches):
            batch = {key: value.to(device) for key, value in batch.items()}
            engine.set_gradient_accumulation_boundary(index == len(micro_batches) - 1)
            loss = engine(**batch, num_items_in_batch=num_targets).loss
            # DeepSpeed averages gradients over ranks; the loss is already normalised over all of them.
            engine.backward(loss * world_size, scale_wrt_gas=False)
            engine.step()
            step_loss += loss.detach()
            state.tokens_since_log += int(batch["attention_mask"].ne(0).sum())  # packed rows: segment ids
        state.step_done(len(micro_batches), step_loss)
        progress.update(1)

        final = state.global_step >= total_steps
        if state.global_step == 1 or every(config["logging_steps"]) or final:
            mean_loss = (all_reduce_sum(state.loss_since_log) / state.steps_since_log).item()
            tokens = int(all_reduce_sum(state.tokens_since_log))
            state.tokens_seen += tokens
            check_weights_finite(engine.module, state.global_step)
            grad_norm = engine.get_global_grad_norm()
            log({"loss": round(mean_loss, 6), "grad_norm": float(grad_norm) if grad_norm is not None else None,
                 "learning_rate": learning_rate, "tokens_per_second": round(tokens / (time.time() - log_started), 1),
                 "num_input_tokens_seen": state.tokens_seen, **memory_stats()})
            progress.set_postfix(loss=f"{mean_loss:.4f}")
            state.log_line_done()
            log_started = time.time()
        paused = time.time()  # evaluation and saving do not count in the next line's tokens/s
        if eval_loader is not None and (every(config["eval_steps"]) or final):
            eval_loss = evaluate()
            log({"eval_loss": round(eval_loss, 6)})
        if every(config["save_steps"]) or (final and config["save_steps"] > 0):
            save_checkpoint()
        log_started += time.time() - paused
    if state.global_step < total_steps:
        state.next_epoch()
progress.close()
train_runtime = time.time() - started

# ---------------------------------------------------------------------------------------------------------------------
# The adapter in PEFT format (or the fully fine-tuned model folder) with the run's settings and metrics, the loss curve.
steps_run = state.global_step - start_step
metrics = {
    "train_runtime": round(train_runtime, 2),
    "train_loss": state.train_loss(),  # over every step, earlier sessions included
    "train_steps_per_second": round(steps_run / train_runtime, 3),
    "epoch": round(state.epoch_progress(), 4),
    "global_step": state.global_step,
    "num_input_tokens_seen": state.tokens_seen,
    "train_tokens_per_second": round((state.tokens_seen - tokens_at_start) / train_runtime, 1),  # this run's tokens
    **memory_stats(),
}
if eval_loss is not None:
    metrics["eval_loss"] = eval_loss
train_args = {**record, "metrics": metrics, "wall_seconds": round(train_runtime, 1)}
if full or freeze:  # every rank takes part in gathering the ZeRO-3 shards, one weight at a time
    full_state = gathered_state_dict(engine.module, keep=master)
    if master:
        saved = f"model: {save_full_model(full_state, model_version, config['model_dir'], output_dir, train_args)}"
else:
    with deepspeed.zero.GatheredParameters(trainable, modifier_rank=None):
        if master and ptuning:
            saved = f"P-tuning v2 prefix: {save_prefix(engine.module, output_dir, train_args)}"
        elif master:
            saved = f"adapter: {save_adapter(engine.module, output_dir, train_args)}"
if writer:
    writer.close()
if master:
    plot_loss(state.log_history, output_dir / "loss.png")
    finish_output_dir(output_dir)
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, indent=2))
    print(f"{saved}\nloss curve: {output_dir / 'loss.png'}" + (f"\nTensorBoard: tensorboard --logdir {output_dir / 'runs'}" if tensorboard else ""))
dist.barrier()
dist.destroy_process_group()
