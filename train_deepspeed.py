"""Fine-tune ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B or GLM-4 (LoRA, P-tuning v2, freeze or full) in a plain DeepSpeed
loop.

    deepspeed --num_gpus 2 train_deepspeed.py --model_dir=model_hub/chatglm2-6b --data_name=msra
    python train_deepspeed.py --model_dir=model_hub/chatglm2-6b --data_name=msra    # one process, no launcher
    mpirun -np 2 python train_deepspeed.py --model_dir=model_hub/chatglm2-6b --data_name=msra    # ranks from MPI

The defaults are the shipped small model's; with a 6B model add about --learning_rate=2e-4 --num_train_epochs=3.
train_trainer.py's training (config keys, data, methods, loss normalisation, outputs) as a loop around
`deepspeed.initialize`. ZeRO stage and optimizer come from --deepspeed, its "auto" values filled as the Trainer fills
them; without a "scheduler" section the Trainer's --lr_scheduler_type is used. Writes checkpoint/<data_name>/
train_deepspeed/: adapter_model/, prefix_model/ or model/ with train_args.json; checkpoint-N/ (DeepSpeed state) for
--resume_from_checkpoint; runs/ (TensorBoard) and loss.png.
"""
import contextlib
import io
import itertools
import json
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import utils.log_filters  # noqa: F401, I001  (before the libraries: bitsandbytes logs a known-harmless message on import)
import deepspeed
import torch
import torch.distributed as dist
import transformers
from deepspeed.accelerator import get_accelerator
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from transformers.integrations import HfTrainerDeepSpeedConfig

from utils.config_utils import ConfigError, parse_config
from utils.dataset import PaddingCollator
from utils.distributed import free_port, leave_process_group, set_env_from_mpi
from utils.model_loading import resolve_dtype
from utils.generation import peak_memory_gib
from utils.sdpa_backends import without_per_shape_plans
from utils.trainer import (check_weights_finite, eval_batch_tokens, eval_prefix_length, evaluation_loss, is_native,
                           load_datasets, native_batch_loss, plot_loss, prepare_packing, training_arguments)
from utils.training_methods import (gathered_state_dict, gathered_trainable_parameters, load_model_to_train, prefix_state,
                                    save_adapter, save_full_model, save_prefix, write_partial_checkpoint)
from utils.training_options import DEFAULTS as TRAINING_DEFAULTS, check_run_start, checkpoint_dir
from utils.run_dirs import RunFolder, mark_complete, rotate_checkpoints
from utils.run_record import resumed_line, run_record, write_run_record

# The training scripts' shared keys and defaults; here a DeepSpeed config is always used.
DEFAULTS = {**TRAINING_DEFAULTS, "deepspeed": "deepspeed.json"}


def unresolved_autos(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from unresolved_autos(value, f"{prefix}{key}.")
        elif value == "auto":
            yield prefix + key


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start its epoch part-way, after the samples a checkpoint has trained on."""

    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

    def __len__(self):
        return self.num_samples - self.skip


def all_reduce_sum(value, device):
    """Sum of a number or tensor over all ranks, as a tensor on this rank's device."""
    tensor = value.detach().clone().to(device) if torch.is_tensor(value) else torch.tensor(value, device=device)
    dist.all_reduce(tensor)
    return tensor


def memory_stats(device):
    return {"peak_memory_gib" if device.type == "cuda" else "peak_rss_gib": peak_memory_gib(device)}


class TrainingState:
    """Where training stands (engine, counters, loss sums, log, RNG), saved with every checkpoint and restored here.
    Loss sums stay on the device per rank (no host sync per step): saving sums them over ranks, restoring gives them
    to rank 0. world_size and micro_batches_per_epoch are saved to refuse a resume that would reorder the data."""

    def __init__(self, engine, micro_batches_per_epoch, device, writer=None):
        self.engine, self.device, self.writer = engine, device, writer
        self.micro_batches_per_epoch = micro_batches_per_epoch
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.master = self.rank == 0
        self.global_step = self.epoch = self.batches_done = 0  # batches_done: micro-batches of this epoch trained
        self.tokens_seen = 0  # real tokens of the logged steps, all ranks
        self.log_history = []
        self.loss_sum_before = 0.0  # the step losses of earlier sessions, summed: train_loss covers every step
        self.loss_since_log = torch.zeros((), device=device)
        self.steps_since_log = self.tokens_since_log = 0
        self.session_loss = torch.zeros((), device=device)  # the step losses of this session, this rank

    def sum(self, value):
        return all_reduce_sum(value, self.device)

    def epoch_progress(self):
        return self.epoch + self.batches_done / self.micro_batches_per_epoch

    def every(self, steps):
        """Whether the step just taken is a multiple of `steps` (never for steps <= 0)."""
        return steps > 0 and self.global_step % steps == 0

    def train_loss(self):
        """Mean step loss over every step, earlier sessions included (collective: every rank calls it)."""
        return (self.loss_sum_before + self.sum(self.session_loss).item()) / max(self.global_step, 1)

    def save(self, folder):
        """DeepSpeed's checkpoint in folder/global_stepN, where training stands as its client state, and this rank's
        RNG states (collective)."""
        client = {"global_step": self.global_step, "epoch": self.epoch, "batches_done": self.batches_done,
                  "tokens_seen": self.tokens_seen, "log_history": self.log_history, "world_size": self.world_size,
                  "micro_batches_per_epoch": self.micro_batches_per_epoch,
                  "train_loss_sum": self.loss_sum_before + self.sum(self.session_loss).item(),
                  # what was trained since the last log line, so that a resumed run logs the same averages
                  "pending": {"loss": self.sum(self.loss_since_log).item(), "steps": self.steps_since_log,
                              "tokens": int(self.sum(self.tokens_since_log))}}
        self.engine.save_checkpoint(str(folder), tag=f"global_step{self.global_step}", client_state=client,
                                    exclude_frozen_parameters=True)
        rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, Path(folder) / f"rng_state_{self.rank}.pth")

    def restore(self, checkpoint):
        load_path, saved = self.engine.load_checkpoint(str(checkpoint), load_module_strict=False)  # tag in latest
        if load_path is None or "batches_done" not in saved:
            raise ConfigError(f"--resume_from_checkpoint: {checkpoint}: not a checkpoint of train_deepspeed.py (no "
                              "DeepSpeed state with its client state)")
        if (saved["world_size"], saved["micro_batches_per_epoch"]) != (self.world_size, self.micro_batches_per_epoch):
            raise ConfigError(f"--resume_from_checkpoint: {checkpoint}: saved with world_size={saved['world_size']} "
                              f"and {saved['micro_batches_per_epoch']} micro-batches per epoch; this run has "
                              f"{self.world_size} and {self.micro_batches_per_epoch}: the data order would differ")
        self.global_step, self.epoch, self.batches_done = saved["global_step"], saved["epoch"], saved["batches_done"]
        self.tokens_seen, self.log_history = saved["tokens_seen"], saved["log_history"]
        self.loss_sum_before = saved["train_loss_sum"]
        pending = saved["pending"]
        self.loss_since_log.fill_(pending["loss"] if self.master else 0.0)
        self.steps_since_log, self.tokens_since_log = pending["steps"], pending["tokens"] if self.master else 0
        if self.batches_done >= self.micro_batches_per_epoch:  # saved at the end of an epoch
            self.epoch, self.batches_done = self.epoch + 1, 0
        rng = torch.load(Path(checkpoint) / f"rng_state_{self.rank}.pth", weights_only=True)
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])

    def log(self, entry):
        """A line of the log (rank 0 prints it; TensorBoard gets its numbers)."""
        entry = {**entry, "epoch": round(self.epoch_progress(), 4), "step": self.global_step}
        self.log_history.append(entry)
        if self.writer:
            for key, value in entry.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)):
                    tag = ("eval/" + key[5:]) if key.startswith("eval_") else f"train/{key}"
                    self.writer.add_scalar(tag, value, self.global_step)
            self.writer.flush()
        if self.master:
            tqdm.write(json.dumps(entry))

    def log_training(self, learning_rate, seconds):
        """The log line of the steps since the last one (collective); returns their mean loss."""
        mean_loss = (self.sum(self.loss_since_log) / self.steps_since_log).item()
        tokens = int(self.sum(self.tokens_since_log))
        self.tokens_seen += tokens
        check_weights_finite(self.engine.module, self.global_step)
        grad_norm = self.engine.get_global_grad_norm()
        self.log({"loss": round(mean_loss, 6), "grad_norm": float(grad_norm) if grad_norm is not None else None,
                  "learning_rate": learning_rate, "tokens_per_second": round(tokens / seconds, 1),
                  "num_input_tokens_seen": self.tokens_seen, **memory_stats(self.device)})
        self.loss_since_log.zero_()
        self.steps_since_log = self.tokens_since_log = 0
        return mean_loss


def start_process_group(local_rank):
    """The process group (a plain `python train_deepspeed.py`: a group of one); returns this rank's device."""
    rendezvous = {}
    if "RANK" not in os.environ:  # a group of one meets through a file: no port that another process could take first
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK=str(max(local_rank, 0)))  # MASTER_PORT also names DeepSpeed's shared memory
        handle, store = tempfile.mkstemp(prefix="train_deepspeed-group-")
        os.close(handle)  # torch removes the file when the group ends
        rendezvous = {"init_method": f"file://{store}", "rank": 0, "world_size": 1}
    accelerator = get_accelerator()  # cuda on GPUs, cpu otherwise (backend nccl / gloo)
    deepspeed.init_distributed(dist_backend=accelerator.communication_backend_name(), **rendezvous)
    if accelerator.device_name() == "cpu":
        return torch.device("cpu")
    accelerator.set_device(int(os.environ["LOCAL_RANK"]))
    return torch.device(accelerator.device_name(int(os.environ["LOCAL_RANK"])))


def load_data(config, train_file, dev_file, model, tokenizer, master):
    """(train data, eval data, the train loader: each rank's share of a seeded shuffle per epoch, the collator)."""
    train_data, eval_data = load_datasets(
        train_file, dev_file, tokenizer, model.model_version, config["data_format"], config["max_source_length"],
        config["max_target_length"], config["block_size"], config["skip_bad_lines"], config["loss_on_all_turns"],
        config["show_example"])
    train_data, group_by_length = prepare_packing(model, train_data, config["packing"], config["pack_tokens"],
                                                  config["seed"], log=print if master else lambda text: None)
    if group_by_length and master:
        print("train_deepspeed.py has no length-grouped sampler: training unpacked in shuffled batches")
    collate = PaddingCollator(tokenizer.pad_token_id)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    sampler = ResumableSampler(train_data, num_replicas=world_size, rank=rank, shuffle=True, seed=config["seed"])
    # Own generators: iterating a loader then leaves the global RNG (LoRA dropout) alone, so a resumed run draws the
    # same dropout masks as an uninterrupted one.
    train_loader = DataLoader(train_data, batch_size=config["per_device_train_batch_size"], sampler=sampler,
                              collate_fn=collate, generator=torch.Generator().manual_seed(config["seed"]))
    return train_data, eval_data, train_loader, collate


def prepare_output_dir_once(output_dir, resume, overwrite):
    """Rank 0 moves an overwritten run aside (config, model and data are good); every rank learns if that failed."""
    failure = [None]
    if dist.get_rank() == 0:
        try:
            RunFolder(output_dir, resume, overwrite).prepare()
        except Exception as error:  # noqa: BLE001 - handed to the other ranks, then raised everywhere
            failure[0] = error
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise failure[0]


def plan_steps(config, sampler):
    """Steps as the Trainer counts them (an epoch's last optimizer step takes the micro-batches that are left):
    (micro-batches per epoch, steps per epoch, total steps, epochs)."""
    micro_batches_per_epoch = math.ceil(sampler.num_samples / config["per_device_train_batch_size"])
    steps_per_epoch = max(math.ceil(micro_batches_per_epoch / config["gradient_accumulation_steps"]), 1)
    if config["max_steps"] > 0:
        total_steps = config["max_steps"]
        num_epochs = math.ceil(total_steps / steps_per_epoch)
    else:
        total_steps = math.ceil(config["num_train_epochs"] * steps_per_epoch)
        num_epochs = math.ceil(config["num_train_epochs"])
    return micro_batches_per_epoch, steps_per_epoch, total_steps, num_epochs


def start_engine(config, model, output_dir, total_steps):
    """(The DeepSpeed engine, its config, warmup steps): the "auto" entries filled by transformers from the
    TrainingArguments the Trainer would run with (a value written out that disagrees with the config is refused)."""
    args = training_arguments(config, output_dir, resolve_dtype(config["dtype"], model.device.type), False)
    warmup_steps = args.get_warmup_steps(total_steps)
    # DeepSpeed refuses 0 warmup steps: transformers 5.25 fills and checks max(1, warmup), 5.17 the warmup itself.
    args.warmup_steps = max(1, warmup_steps)
    resolved = HfTrainerDeepSpeedConfig(config["deepspeed"])
    resolved.trainer_config_process(args)
    resolved.trainer_config_finalize(args, model, total_steps)
    ds_config = resolved.config
    if left := list(unresolved_autos(ds_config)):
        raise ValueError(f"{config['deepspeed']}: no value for the \"auto\" entries {left}; write numbers there")
    if dist.get_rank() == 0:
        print(f"DeepSpeed config ({config['deepspeed']}, resolved):\n{json.dumps(ds_config, indent=2)}")
    # No "scheduler": the Trainer's schedule, which unlike DeepSpeed's WarmupDecayLR takes warmup 0.
    trainer_schedule = None if "scheduler" in ds_config else (
        lambda optimizer: transformers.get_scheduler(config["lr_scheduler_type"], optimizer, warmup_steps, total_steps))
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config,
                                           lr_scheduler=trainer_schedule)
    return engine, ds_config, warmup_steps


def save_checkpoint(state, output_dir, method, record, save_total_limit):
    """checkpoint-N/ as the Trainer lays it out under DeepSpeed, marked complete once every rank has written its
    part; only then are checkpoints beyond save_total_limit removed."""
    folder = output_dir / f"checkpoint-{state.global_step}"
    state.save(folder)
    if method in ("lora", "ptuning"):  # the adapter or prefix of step N (else the DeepSpeed state holds the weights)
        with gathered_trainable_parameters(state.engine.module):
            if state.master and method == "ptuning":
                write_partial_checkpoint(folder, prefix_state(state.engine.module), state.engine.module.config)
            elif state.master:
                state.engine.module.save_pretrained(str(folder), safe_serialization=True)
    if state.master:
        trainer_state = {"global_step": state.global_step, "epoch": state.epoch_progress(),
                         "log_history": state.log_history}
        (folder / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        write_run_record(folder, record)  # the run's train_args.json, before the marker
    dist.barrier()  # every rank's part is written
    if state.master:
        mark_complete(folder)
        rotate_checkpoints(output_dir, save_total_limit)
    dist.barrier()


def batch_loss(engine, batch, num_items_in_batch=None):
    """The loss as train_trainer.py's Trainer computes it: the ChatGLM models' own (chunked), transformers' own models
    (GLM-4) through target_losses (no full-vocabulary logits)."""
    if is_native(engine):
        return native_batch_loss(engine, batch, num_items_in_batch)
    return engine(**batch, num_items_in_batch=num_items_in_batch).loss


def evaluator(engine, config, train_data, eval_data, collate, device):
    """A function giving the eval loss as train_trainer.py's Trainer computes it (utils.trainer.evaluation_loss: length
    batches of as many tokens, the prompt prefix every sample shares run once), or None without dev data."""
    if eval_data is None:
        return None
    prefix = eval_prefix_length(engine, eval_data, collate)
    eval_tokens = eval_batch_tokens(config["pack_tokens"], config["per_device_train_batch_size"], train_data)

    def evaluate():
        engine.eval()
        with torch.no_grad():
            loss = evaluation_loss(engine, eval_data, collate, prefix, eval_tokens,
                                   config["per_device_eval_batch_size"], device, dist.get_rank(),
                                   dist.get_world_size(), lambda tensor: all_reduce_sum(tensor, device))
        engine.train()
        return loss

    return evaluate


def train_step(state, micro_batches):
    """One optimizer step over `micro_batches`: the loss is summed over their target tokens and divided by the target
    tokens of all of them on all ranks (as the Trainer does with num_items_in_batch), so accumulation and data
    parallelism give the gradient of one large batch. Returns the learning rate the step used."""
    engine, device = state.engine, state.device
    num_targets = state.sum(sum(int(b["labels"][:, 1:].ne(-100).sum()) for b in micro_batches))
    learning_rate = engine.get_lr()[0]
    step_loss = torch.zeros((), device=device)
    for index, batch in enumerate(micro_batches):
        batch = {key: value.to(device) for key, value in batch.items()}
        engine.set_gradient_accumulation_boundary(index == len(micro_batches) - 1)
        with without_per_shape_plans(active=is_native(engine)):  # the backward too, as the Trainer's steps
            loss = batch_loss(engine, batch, num_targets)
            # DeepSpeed averages gradients over ranks; the loss is already normalised over all of them.
            engine.backward(loss * state.world_size, scale_wrt_gas=False)
        engine.step()
        step_loss += loss.detach()
        state.tokens_since_log += int(batch["attention_mask"].ne(0).sum())  # packed rows: segment ids
    state.global_step += 1
    state.batches_done += len(micro_batches)
    state.steps_since_log += 1
    state.loss_since_log += step_loss
    state.session_loss += step_loss
    return learning_rate


def train(state, config, train_loader, evaluate, plan, save):
    """The training loop from where `state` stands to the planned end, evaluating with `evaluate` (None: no dev data);
    returns the last eval loss (None if none)."""
    _, _, total_steps, num_epochs = plan
    state.engine.train()
    progress = tqdm(total=total_steps, initial=state.global_step, desc="training", disable=not state.master,
                    dynamic_ncols=True)
    # A run resumed from its last checkpoint trains no step: its metrics keep the last eval loss it logged.
    eval_loss = next((entry["eval_loss"] for entry in reversed(state.log_history) if "eval_loss" in entry), None)
    log_started = time.time()
    while state.global_step < total_steps and state.epoch < num_epochs:
        train_loader.sampler.set_epoch(state.epoch)
        train_loader.sampler.skip = state.batches_done * train_loader.batch_size
        batches = iter(train_loader)
        while state.global_step < total_steps:
            micro_batches = list(itertools.islice(batches, config["gradient_accumulation_steps"]))
            if not micro_batches:
                break
            learning_rate = train_step(state, micro_batches)
            progress.update(1)
            final = state.global_step >= total_steps
            if state.global_step == 1 or state.every(config["logging_steps"]) or final:
                mean_loss = state.log_training(learning_rate, time.time() - log_started)
                progress.set_postfix(loss=f"{mean_loss:.4f}")
                log_started = time.time()
            paused = time.time()  # evaluation and saving do not count in the next line's tokens/s
            if evaluate is not None and (state.every(config["eval_steps"]) or final):
                eval_loss = evaluate()
                state.log({"eval_loss": round(eval_loss, 6)})
            if state.every(config["save_steps"]) or (final and config["save_steps"] > 0):
                save()
            log_started += time.time() - paused
        if state.global_step < total_steps:
            state.epoch, state.batches_done = state.epoch + 1, 0
    progress.close()
    return eval_loss


def save_final(state, config, method, output_dir, train_args):
    """The adapter, prefix or model folder with `train_args` (every rank gathers ZeRO-3 shards); rank 0 returns what
    it wrote, as a line."""
    module = state.engine.module
    if method in ("full", "freeze"):  # one weight at a time
        full_state = gathered_state_dict(module, keep=state.master)
        if state.master:
            folder = save_full_model(full_state, module.model_version, config["model_dir"], output_dir, train_args)
            return f"model: {folder}"
        return None
    with gathered_trainable_parameters(state.engine.module):
        if state.master and method == "ptuning":
            return f"P-tuning v2 prefix: {save_prefix(module, output_dir, train_args)}"
        if state.master:
            return f"adapter: {save_adapter(module, output_dir, train_args)}"
    return None


def finish(state, config, method, output_dir, record, eval_loss, session):
    """The final output with the run's record and metrics, the loss curve; the engine released.
    session: (start time, step and tokens seen when this session started)."""
    started, start_step, tokens_at_start = session
    train_runtime = time.time() - started
    metrics = {
        "train_runtime": round(train_runtime, 2),
        "train_loss": state.train_loss(),  # over every step, earlier sessions included
        "train_steps_per_second": round((state.global_step - start_step) / train_runtime, 3),
        "epoch": round(state.epoch_progress(), 4),
        "global_step": state.global_step,
        "num_input_tokens_seen": state.tokens_seen,
        "train_tokens_per_second": round((state.tokens_seen - tokens_at_start) / train_runtime, 1),  # this run's tokens
        **memory_stats(state.device),
    }
    if eval_loss is not None:
        metrics["eval_loss"] = eval_loss
    saved = save_final(state, config, method, output_dir, {**record, "metrics": metrics,
                                                           "wall_seconds": round(train_runtime, 1)})
    if state.writer:
        state.writer.close()
    if state.master:
        plot_loss(state.log_history, output_dir / "loss.png")
        RunFolder(output_dir).finish()
        print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, indent=2))
        print(f"{saved}\nloss curve: {output_dir / 'loss.png'}"
              + (f"\nTensorBoard: tensorboard --logdir {output_dir / 'runs'}" if state.writer else ""))
    state.engine.destroy()  # its gradient hooks hold the model and the process groups (as in utils/trainer)


def run_training(config):
    output_dir = checkpoint_dir(config["output_dir"], config["data_name"], "train_deepspeed")
    set_env_from_mpi()
    resume, (train_file, dev_file) = check_run_start(config, "train_deepspeed.py", output_dir)
    device = start_process_group(config["local_rank"])
    master, world_size = dist.get_rank() == 0, dist.get_world_size()
    method = config["method"]  # checked by check_run_start
    # Said once, by rank 0; DeepSpeed keeps the fp32 master copies of what trains.
    with contextlib.redirect_stdout(sys.stdout if master else io.StringIO()):
        model, tokenizer = load_model_to_train(config, resolve_dtype(config["dtype"], device.type), str(device),
                                               master_fp32=False)
    train_data, eval_data, train_loader, collate = load_data(config, train_file, dev_file, model, tokenizer, master)
    prepare_output_dir_once(output_dir, resume, config["overwrite_output_dir"])
    plan = plan_steps(config, train_loader.sampler)
    micro_batches_per_epoch, steps_per_epoch, total_steps, _ = plan
    engine, ds_config, warmup_steps = start_engine(config, model, output_dir, total_steps)
    # The run record (train_args.json) of every checkpoint and of the final output, which adds the metrics.
    record = run_record("train_deepspeed.py", config, model.model_version, train_data, eval_data, world_size, ds_config,
                        deepspeed=deepspeed.__version__)
    if master:
        print(f"ZeRO stage {engine.zero_optimization_stage()}, {world_size} process(es), {total_steps} steps "
              f"({steps_per_epoch} per epoch, warmup {warmup_steps}), "
              f"{train_loader.batch_size * config['gradient_accumulation_steps'] * world_size} examples per step")
    state = TrainingState(engine, micro_batches_per_epoch, device)
    if resume:  # weights, optimizer and schedule, where training stands, the RNG of each rank
        state.restore(resume)
        if master:
            print(f"{resumed_line(resume, state.global_step, total_steps)}: epoch {state.epoch}, "
                  f"{state.batches_done} micro-batches into it")
    if master and "tensorboard" in config["report_to"].split(","):
        state.writer = SummaryWriter(str(output_dir / "runs"), purge_step=state.global_step if resume else None)
    session = time.time(), state.global_step, state.tokens_seen
    evaluate = evaluator(engine, config, train_data, eval_data, collate, device)
    eval_loss = train(state, config, train_loader, evaluate, plan,
                      save=lambda: save_checkpoint(state, output_dir, method, record, config["save_total_limit"]))
    finish(state, config, method, output_dir, record, eval_loss, session)


def main(config):
    run_training(config)
    leave_process_group()  # once the run's model and engine are gone: the process groups they hold end with them


if __name__ == "__main__":
    main(parse_config(DEFAULTS, description=__doc__))
