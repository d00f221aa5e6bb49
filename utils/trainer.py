"""The Trainer path of train_trainer.py and train_qlora.py: TrainingArguments from a config, the training data sets
and the packing decision, a transformers.Trainer on its public hooks (checkpoints marked complete, the loss over a
resumed run, tokens/s and peak memory, divergence), and finishing a run (metrics, export, loss plot)."""
import contextlib
import json
import logging
import os
import time
from pathlib import Path

import torch
import transformers
from accelerate.utils import extract_model_from_parallel
from peft.helpers import disable_input_dtype_casting
from transformers import DynamicCache, HfArgumentParser, TrainingArguments
from transformers.trainer_pt_utils import nested_gather
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, EvalLoopOutput, TrainOutput, speed_metrics

from utils.config_utils import ConfigError
from utils.dataset import (EncodedDataset, InstructionDataset, PackedDataset, PaddingCollator, TextDataset,
                           format_example, packed_inputs_hook)
from utils.decode_engine import NativeSteps
from utils.errors import UserError
from utils.graphed_blocks import graph_length_multiple
from utils.log_filters import DropMessage
from utils.run_dirs import RunFolder, checkpoint_record, mark_complete, rotate_checkpoints
from utils.run_record import resumed_line, run_record, write_run_record
from utils.sdpa_backends import without_per_shape_plans
from utils.training_methods import (gathered_state_dict, gathered_trainable_parameters, check_only_float_weights_train,
                                    save_adapter, save_full_model, save_prefix, write_partial_checkpoint)

# The options of the training scripts that are TrainingArguments fields of the same name and meaning.
TRAINING_ARGUMENT_KEYS = ("num_train_epochs", "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
                          "gradient_accumulation_steps", "learning_rate", "weight_decay", "warmup_steps",
                          "lr_scheduler_type", "max_grad_norm", "logging_steps", "eval_steps", "save_total_limit",
                          "seed")
# fp32 logits of one chunk of target_losses: the ChatGLM models' own chunks (1,024 rows of 65,024 tokens,
# remote_scripts/*/modeling_chatglm.py). A chunk's backward holds about three times this beside every saved activation
# (the peak of a training step): GLM-4's 151,552 tokens get 384 rows, not 1,024 (1.1 GiB less).
LOSS_CHUNK_BYTES = 1024 * 65024 * 4
# transformers' report of a partial checkpoint (P-tuning, freeze tuning): the frozen weights come from the base.
PARTIAL_LOAD_REPORT = "There were missing keys in the checkpoint model loaded"


def training_arguments(config, output_dir, compute_dtype, has_eval, deepspeed=None, extra=None, source=None):
    """The TrainingArguments of a run: the config's keys of the same name, then `extra` (TrainingArguments fields
    from train_qlora.py's --train_args_json that the config lacks, e.g. optim), then what the script owns. An unknown
    or bad field is a ConfigError naming `source` (where `extra` came from)."""
    values = {key: config[key] for key in TRAINING_ARGUMENT_KEYS}
    values.update(logging_first_step=True, eval_strategy="steps", save_steps=max(config["save_steps"], 1),
                  save_strategy="steps" if config["save_steps"] > 0 else "no",
                  report_to=[r for r in config["report_to"].split(",") if r and r != "none"])
    values.update(extra or {})
    # Mixed precision: trained weights (LoRA, a prefix, all of them with --method=full) fp32, compute in the half type.
    values.update(output_dir=str(output_dir), fp16=compute_dtype == torch.float16, bf16=compute_dtype == torch.bfloat16,
                  deepspeed=deepspeed, remove_unused_columns=False, label_names=["labels"],
                  use_cpu=not torch.cuda.is_available(),
                  include_num_input_tokens_seen="no")  # counted by Trainer.training_step: packed rows hold segment ids
    if not has_eval:
        values["eval_strategy"] = "no"
    try:
        (args,) = HfArgumentParser(TrainingArguments).parse_dict(values)
    except ValueError as err:
        raise ConfigError(f"{source or 'the training options'}: {err}") from err
    return args


def load_datasets(train_file, dev_file, tokenizer, version, data_format="instruction", max_source_length=256,
                  max_target_length=128, block_size=512, skip_bad_lines=False, loss_on_all_turns=False,
                  show_example=False):
    """Encoded train and dev sets (dev None without a dev file), their counts printed: instruction records cut to
    max_source_length / max_target_length, or for data_format "text" causal-LM blocks of block_size tokens."""
    def load(path):
        if data_format == "text":
            data = TextDataset(path, tokenizer, block_size, skip_bad_lines)
        else:
            data = InstructionDataset(path, tokenizer, version, max_source_length, max_target_length, skip_bad_lines,
                                      loss_on_all_turns)
        print(data.describe())
        return data

    train_data = load(train_file)
    if show_example:
        print(f"the first sample of {train_file}: " + format_example(train_data[0], tokenizer))
    return train_data, None if dev_file is None else load(dev_file)


def causal_lm(model):
    """The causal LM inside the wrappers of a run (DeepSpeed, DDP, PEFT)."""
    model = extract_model_from_parallel(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_native(model):
    """Whether `model` is of transformers' own classes (GLM-4...), not our ChatGLM code nor other remote code."""
    lm = causal_lm(model)
    return getattr(lm, "model_version", None) is None and type(lm).__module__.startswith("transformers.models.")


def can_pack(model):
    """Whether packed rows train `model` as the unpacked examples: the ChatGLM models read the segment ids in the
    mask; transformers' own models get restarting position_ids (packed_inputs_hook). Others might attend across."""
    return getattr(model, "model_version", None) in ("chatglm-6b", "chatglm2-6b", "chatglm3-6b") or is_native(model)


def chunk_losses(head, hidden_states, targets):
    return torch.nn.functional.cross_entropy(head(hidden_states).float(), targets, reduction="none")


def loss_rows(count, head):
    """Rows that target_losses's chunks cover: the targets, at least one chunk. Under DeepSpeed ZeRO-3 each call of
    the output layer gathers its weight from all ranks, so each rank covers the most rows any rank has (the extra
    chunks are empty), as the ChatGLM model files' causal_lm_loss does."""
    rows = max(count, 1)
    weight = getattr(head, "weight", None)
    if hasattr(weight, "ds_id") and torch.distributed.is_initialized():
        most = torch.tensor([rows], device=weight.device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        rows = int(most)
    return rows


def loss_chunk_rows(head):
    """Rows of a loss chunk for the output layer `head`: LOSS_CHUNK_BYTES of fp32 logits, a multiple of 64 rows."""
    return max(64, LOSS_CHUNK_BYTES // (4 * head.out_features) // 64 * 64)


def causal_prompts(model):
    """Whether the model's prompt tokens attend causally (each to those before it alone), so that a prompt prefix's
    keys and values do not depend on what follows: ChatGLM2/3 and transformers' own models, not ChatGLM-6B (its prompt
    attends both ways) nor a P-tuning prefix's model (its cache begins with the prefix)."""
    lm = causal_lm(model)
    version = getattr(lm, "model_version", None)
    return (version in ("chatglm2-6b", "chatglm3-6b") or is_native(lm)) and not getattr(lm.config, "pre_seq_len", None)


def shared_prefix_length(examples):
    """How many first tokens every example shares, ending before any target's prediction (target i is predicted at
    position i - 1) and leaving each example one token at least: evaluation computes them once (a fixed instruction
    prompt: 43 of MSRA's 85 tokens per sample on ChatGLM2)."""
    first, length = examples[0]["input_ids"], len(examples[0]["input_ids"])
    for example in examples:
        ids, labels = example["input_ids"], example["labels"]
        first_target = next((i for i, label in enumerate(labels) if label != -100), len(labels))
        limit = min(length, len(ids) - 1, first_target - 1)
        length = 0
        while length < limit and ids[length] == first[length]:
            length += 1
        if not length:
            break
    return length


def prefix_cache(model, prefix_ids, device):
    """Every layer's keys and values for prefix_ids (one row): a DynamicCache, which the forward pass fills."""
    input_ids, cache, lm = torch.tensor([prefix_ids], device=device), DynamicCache(), causal_lm(model)
    with without_per_shape_plans(active=is_native(lm)):
        model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True, logits_to_keep=1,
              **{NativeSteps.cache_kwarg_of(lm): cache})
    return cache


def repeated_rows(cache, rows):
    """A DynamicCache holding `cache`'s one row for each of `rows` rows (expanded views; a layer's update copies)."""
    repeated = DynamicCache()
    for index, layer in enumerate(cache.layers):
        repeated.update(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1), index)
    return repeated


def target_losses(model, inputs, chunk_rows=None, past_key_values=None):
    """(the fp32 cross-entropy of each target token of a batch, the batch row of each); position i predicts
    labels[i + 1], -100 is none. The model runs with logits for its last position only; its final hidden states, caught
    at the network below the output layer, go through the output layer at the targets' positions only, `chunk_rows` at
    a time (default: loss_chunk_rows), so that no logits beyond one chunk's exist. Under autograd each chunk is
    checkpointed (its logits are made again in backward). past_key_values: a cache the batch continues (its
    attention_mask then covers the cached tokens too)."""
    lm = causal_lm(model)
    caught = []
    hook = lm.base_model.register_forward_hook(lambda module, args, output: caught.append(output[0]))
    # transformers' models slice [:, -1:] for 1, a strided view, and F.linear then reads a frozen output layer once
    # per row (a batched product): an index keeps one product. (Our model files copy the rows themselves.)
    native = is_native(lm)
    last = torch.tensor([inputs["input_ids"].shape[1] - 1]) if native else 1
    try:  # (transformers' models: length batches are new shapes all the time)
        with without_per_shape_plans(active=native):
            model(**{key: value for key, value in inputs.items() if key != "labels"}, logits_to_keep=last,
                  **({NativeSteps.cache_kwarg_of(lm): past_key_values, "use_cache": True} if past_key_values
                     else {"use_cache": False}))
    finally:
        hook.remove()
    head, hidden_states = lm.get_output_embeddings(), caught[-1]
    targets = inputs["labels"][:, 1:].to(hidden_states.device)
    keep = targets != -100
    hidden_states, targets = hidden_states[:, :-1][keep], targets[keep]
    parts, chunk_rows = [], chunk_rows or loss_chunk_rows(head)
    # At least one chunk, even an empty one: a batch without targets still gives a loss on the graph.
    for start in range(0, loss_rows(len(targets), head), chunk_rows):
        chunk = (head, hidden_states[start:start + chunk_rows], targets[start:start + chunk_rows])
        grad = torch.is_grad_enabled()
        parts.append(torch.utils.checkpoint.checkpoint(chunk_losses, *chunk, use_reentrant=False) if grad
                     else chunk_losses(*chunk))
    return torch.cat(parts), keep.nonzero()[:, 0]


def native_batch_loss(model, inputs, num_items_in_batch=None, chunk_rows=None):
    """The loss of a batch of transformers' own models (GLM-4) as training computes it: target_losses summed over the
    targets, over num_items_in_batch (the targets of the whole step: accumulation, all ranks), else their count. No
    full-vocabulary fp32 logits exist (151,552 wide on GLM-4); the ChatGLM models chunk their own loss."""
    losses, _ = target_losses(model, inputs, chunk_rows)
    return losses.sum() / (len(losses) if num_items_in_batch is None else num_items_in_batch)


def length_batches(lengths, tokens):
    """Sample indices in batches of similar length, longest first, each of at most `tokens` tokens with its padding
    (a longer sample: a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, start = [], 0
    while start < len(order):
        size = max(1, tokens // lengths[order[start]])
        batches.append(order[start:start + size])
        start += size
    return batches


def batch_loss_mean(sums, counts, batch_size):
    """The Trainer's eval_loss from each sample's summed target loss and target count: the mean over the samples of
    their batch's loss per target token, batches of `batch_size` consecutive samples; a batch without targets is left
    out (its loss is NaN)."""
    total, samples = 0.0, 0
    for start in range(0, len(sums), batch_size):
        batch_sums, batch_counts = sums[start:start + batch_size], counts[start:start + batch_size]
        if sum(batch_counts):
            total += sum(batch_sums) / sum(batch_counts) * len(batch_sums)
            samples += len(batch_sums)
    return total / samples if samples else float("nan")


def eval_prefix_length(model, data, collator):
    """The prompt tokens every sample of `data` begins with, for evaluation to run once (shared_prefix_length); 0 where
    it cannot: prompts that attend both ways (causal_prompts), or a collator other than the training one (padding on
    the right, so that positions follow the cached tokens)."""
    if not (causal_prompts(model) and isinstance(collator, PaddingCollator) and collator.padding_side == "right"):
        return 0
    return shared_prefix_length(data.examples)


def eval_batch_tokens(pack_tokens, train_batch_size, train_data):
    """Tokens of an evaluation batch: packed, a training step's (train_batch_size rows of pack_tokens: without
    activations kept for backward it fits wherever the step does, and larger batches keep the GPU busier; H200, MSRA
    dev: 7.8 s at 2,560, 7.0 at 8,192), else pack_tokens."""
    return pack_tokens * (train_batch_size if isinstance(train_data, PackedDataset) else 1)


def evaluation_loss(model, data, collator, prefix, eval_tokens, batch_size, device, process_index=0, world=1,
                    reduce_sum=None):
    """eval_loss of encoded samples as transformers' Trainer defines it (batch_loss_mean over batches of batch_size x
    world consecutive samples), computed otherwise: in batches of similar length of up to eval_tokens tokens (of what
    follows the prefix), the output layer on the targets only (target_losses), and the first `prefix` tokens, which
    every sample shares (eval_prefix_length), run once, each batch continuing their cache. Process process_index of
    `world` runs every world-th batch; every process runs as many forwards (ZeRO-3 gathers the weights in each: one
    short of a batch repeats the first and leaves it out); reduce_sum sums a tensor over the processes. Call it under
    no_grad and the run's precision (autocast)."""
    batches = length_batches([len(example["input_ids"]) - prefix for example in data], eval_tokens)
    sums, counts = (torch.zeros(len(data), dtype=torch.float64, device=device) for _ in range(2))
    shared = prefix_cache(model, data[0]["input_ids"][:prefix], device) if prefix else None
    for step in range(process_index, -(-len(batches) // world) * world, world):
        batch = batches[step % len(batches)]
        features = [data[i] for i in batch]
        if prefix:
            features = [{key: example[key][prefix:] for key in ("input_ids", "labels")} for example in features]
        inputs = {key: value.to(device) for key, value in collator(features).items()}
        past = None
        if prefix:
            mask = inputs["attention_mask"]
            inputs["attention_mask"] = torch.cat((mask.new_ones(len(batch), prefix), mask), dim=1)
            past = repeated_rows(shared, len(batch))
        # The batch's targets in one chunk (at most eval_tokens rows): every process calls the output layer as often,
        # as ZeRO-3's gathering of its weights needs.
        losses, rows = target_losses(model, inputs, inputs["input_ids"].numel(), past_key_values=past)
        if step < len(batches):
            samples = torch.tensor(batch, device=device)[rows]
            sums.index_add_(0, samples, losses.double())
            counts.index_add_(0, samples, torch.ones_like(sums[samples]))
    if world > 1:
        sums, counts = reduce_sum(sums), reduce_sum(counts)
    return batch_loss_mean(sums.tolist(), counts.tolist(), batch_size * world)


def prepare_packing(model, train_data, packing, pack_tokens, seed, log=print):
    """(train data, group_by_length): with packing, rows of at most pack_tokens tokens; a model that cannot pack
    trains on the unpacked examples in batches grouped by length instead, and the log says so."""
    if not packing:
        return train_data, False
    if not can_pack(model):
        log(f"packing: {type(model).__name__} cannot isolate packed samples from one another; training unpacked, in "
            "batches grouped by length instead")
        return train_data, True
    if getattr(model, "model_version", None) is None:
        model.register_forward_pre_hook(packed_inputs_hook, with_kwargs=True)
    packed = PackedDataset(train_data, pack_tokens, seed)
    log(packed.describe())
    return packed, False


def plot_loss(log_history, path):
    """Training (and eval) loss against the step, as a PNG; a crash never leaves half a picture where the last was."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        points = [(entry["step"], entry[key]) for entry in log_history if key in entry]
        if points:
            axes.plot(*zip(*points), marker="." if len(points) < 50 else None, label=label)
    axes.set(xlabel="step", ylabel="loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    partial = Path(path).with_name(f".{Path(path).name}.partial")
    figure.savefig(partial, dpi=100, format="png")
    plt.close(figure)
    os.replace(partial, path)


def peak_memory_gib():
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


class TrainingDiverged(UserError, RuntimeError):
    pass


def check_weights_finite(model, step):
    """Stops a run whose trained weights hold NaN or inf: no later step repairs them, and the Trainer's log would
    print loss 0 (it leaves non-finite losses out) until a useless adapter is saved."""
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad and p.numel()]
    if not trained:
        return
    # One sum per tensor (NaN/inf carry through it) and one host sync for all of them.
    finite = torch.stack([torch.isfinite(p.sum(dtype=torch.float32)).to(trained[0][1].device) for _, p in trained])
    if not finite.all():
        broken = [name for (name, _), ok in zip(trained, finite.tolist()) if not ok]
        raise TrainingDiverged(
            f"training diverged at step {step}: {len(broken)} trained weight tensors hold NaN/inf (first: "
            f"{broken[0]}). The run stops without writing its final weights; lower --learning_rate (or the LoRA alpha) "
            "and train again.")


def load_trained_tensors(model, checkpoint):
    """A P-tuning or freeze-tuning checkpoint (trained tensors only) into `model`, checked against what it trains."""
    from safetensors.torch import load_file

    state = load_file(str(Path(checkpoint) / "model.safetensors"))
    parameters = dict(model.named_parameters())
    trained = {name for name, param in parameters.items() if param.requires_grad}
    if set(state) != trained:
        raise ConfigError(f"--resume_from_checkpoint: {checkpoint} holds {sorted(set(state) - trained)[:3]} / lacks "
                          f"{sorted(trained - set(state))[:3]} of the parameters this run trains; resume with the "
                          "settings it was made with")
    for name, tensor in state.items():
        if tensor.shape != parameters[name].shape:
            raise ConfigError(f"--resume_from_checkpoint: {checkpoint} holds {name} of shape {list(tensor.shape)}, "
                              f"this run trains it as {list(parameters[name].shape)}; resume with the settings it was "
                              "made with")
    with torch.no_grad():
        for name, tensor in state.items():
            parameters[name].copy_(tensor)


@contextlib.contextmanager
def quantized_base_may_train(model, trainable_only):
    """transformers' Trainer refuses a quantized model that is no PeftModel (validate_quantization_for_training reads
    `model.is_quantized`), but P-tuning on a k-bit base trains a float prefix beside the frozen weights. No public hook
    lets it through: after our own check the model shows itself unquantized while the Trainer is built, here only
    (tests/test_qlora.py fails loudly if a transformers release checks otherwise)."""
    if not (trainable_only and getattr(model, "is_quantized", False)):
        yield
        return
    check_only_float_weights_train(model)
    model.is_quantized = False
    try:
        yield
    finally:
        model.is_quantized = True


class NothingLeftToTrain(Exception):
    pass


class RunCallback(transformers.TrainerCallback):
    """At the start, a resumed run says where it resumed and re-applies this run's logging, eval and save frequencies
    (else taken from the checkpoint); before a step, the planned end (the Trainer checks it only after a step, so a run
    resumed at its last step would train one too many); after a checkpoint is written, Trainer.mark_checkpoint."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.tokens_at_start = state.num_input_tokens_seen
        self.trainer.train_began = time.perf_counter()
        if self.trainer.resumed_from is not None:
            state.compute_steps(args, state.max_steps)
            if state.is_world_process_zero:
                print(resumed_line(self.trainer.resumed_from, state.global_step, state.max_steps), flush=True)

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            raise NothingLeftToTrain

    def on_step_end(self, args, state, control, **kwargs):
        # The first step holds the one-time costs (compiles, autotuning, the allocator's growth): its seconds say
        # how much of a short run they take. The step's losses were read back, so its backward has run.
        if self.trainer.first_step_seconds is None:
            self.trainer.first_step_seconds = round(time.perf_counter() - self.trainer.train_began, 2)

    def on_save(self, args, state, control, **kwargs):
        self.trainer.mark_checkpoint()


class Trainer(transformers.Trainer):
    """transformers.Trainer that counts real tokens (packed rows hold segment ids in attention_mask) and logs tokens/s,
    the steady rate after the first log line and peak memory; stops with TrainingDiverged on NaN/inf weights; writes
    the run record into each checkpoint, marks it complete, and only then rotates old ones (the Trainer's own rotation
    is off), so --resume_from_checkpoint=auto never picks a cut-off checkpoint; reports train_loss over every step of
    a resumed run; trains no extra step when resumed at the end. trainable_only (P-tuning, freeze): checkpoints hold
    the trained tensors only. run_info: run_record's script, config, model_version (and training_arguments).
    eval_tokens: the tokens of one evaluation batch (evaluation_loop)."""
    loss_chunk_rows = None  # target_losses's default
    share_eval_prefix = True  # evaluation computes the prompt prefix every sample shares once (shared_prefix_length)

    def __init__(self, *args, run_info, trainable_only=False, eval_tokens=2560, **kwargs):
        with quantized_base_may_train(kwargs["model"], trainable_only):
            super().__init__(*args, **kwargs)
        self.trainable_only, self.run_info, self.eval_tokens = trainable_only, run_info, eval_tokens
        self.keep_checkpoints = self.args.save_total_limit or 0
        self.args.save_total_limit = None
        self.loss_sum = torch.zeros((), device=self.args.device)  # this session's step losses, summed on the device
        self.loss_sum_at_start, self.tokens_at_start, self.resumed_from = 0.0, 0, None
        self.first_training_log = None  # (wall clock, tokens seen) at the first training log line of this session
        self.steady_tokens_per_second = None  # real tokens/s from that line to the latest one
        self.train_began = None  # perf_counter at this session's start (RunCallback)
        self.first_step_seconds = None  # from then to the end of this session's first step
        self.eval_prefix = None  # (the evaluation data set, the length of the prompt prefix its samples share)
        self.add_callback(RunCallback(self))

    def run_record(self):
        deepspeed = self.accelerator.state.deepspeed_plugin.deepspeed_config if self.is_deepspeed_enabled else None
        return run_record(**self.run_info, train_data=self.train_dataset, eval_data=self.eval_dataset,
                          world_size=self.args.world_size, deepspeed_config=deepspeed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """transformers' own models (GLM-4): the loss from target_losses, so that training holds no full-vocabulary
        fp32 logits (151,552 wide on GLM-4), scaled as the Trainer scales their own loss. The ChatGLM models chunk
        their loss themselves."""
        if return_outputs or not is_native(model):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = native_batch_loss(model, inputs, num_items_in_batch, self.loss_chunk_rows)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes
        return loss

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """The loss alone (no compute_metrics) of encoded samples: evaluation_loss, the Trainer's own figure computed
        in length batches of eval_tokens tokens with the shared prompt prefix run once. Anything else: the Trainer's own
        loop."""
        data = dataloader.dataset
        if not prediction_loss_only or not isinstance(data, EncodedDataset):
            return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                           metric_key_prefix)
        # Under the training's autocast (accelerate applies it to a prepared model's forward; evaluate() may come
        # before any), with LoRA's inputs uncast as in training.
        self.model_wrapped.eval()
        with torch.no_grad(), self.compute_loss_context_manager(), self.accelerator.autocast(), self.lora_inputs_uncast():
            loss = evaluation_loss(self.model_wrapped, data, self.data_collator, self.shared_eval_prefix(data),
                                   self.eval_tokens, self.args.eval_batch_size, self.args.device,
                                   self.args.process_index, self.args.world_size,
                                   lambda tensor: self.accelerator.reduce(tensor, "sum"))
        return EvalLoopOutput(predictions=None, label_ids=None, metrics={f"{metric_key_prefix}_loss": loss},
                              num_samples=len(data))

    def shared_eval_prefix(self, data):
        """eval_prefix_length of `data`, counted once per data set (0 with share_eval_prefix off)."""
        if not self.share_eval_prefix:
            return 0
        if self.eval_prefix is None or self.eval_prefix[0] is not data:
            self.eval_prefix = (data, eval_prefix_length(self.model, data, self.data_collator))
        return self.eval_prefix[1]

    def training_step(self, model, inputs, num_items_in_batch=None):
        tokens = inputs["attention_mask"].ne(0).sum() if "attention_mask" in inputs else inputs["input_ids"].numel()
        # transformers' models: the backward pass too (gradient checkpointing runs the forward again in it)
        with without_per_shape_plans(active=is_native(model)):
            loss = super().training_step(model, inputs, num_items_in_batch)
        self.loss_sum += torch.where(torch.isfinite(loss), loss, 0.0)  # the log leaves non-finite losses out too
        tokens = torch.as_tensor(tokens, device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()
        return loss

    def log(self, logs, start_time=None):
        logs["num_input_tokens_seen"] = self.state.num_input_tokens_seen
        if start_time is not None:
            session_tokens = self.state.num_input_tokens_seen - self.tokens_at_start
            logs.update(speed_metrics("train", start_time, num_tokens=session_tokens))
        if torch.cuda.is_available():
            logs["peak_memory_gib"] = peak_memory_gib()
        if "loss" in logs:
            check_weights_finite(self.model, self.state.global_step)
            now, seen = time.perf_counter(), self.state.num_input_tokens_seen
            if self.first_training_log is None:
                self.first_training_log = (now, seen)
            elif now > self.first_training_log[0]:
                first_time, first_seen = self.first_training_log
                self.steady_tokens_per_second = round((seen - first_seen) / (now - first_time), 1)
        super().log(logs, start_time)

    def train(self, resume_from_checkpoint=None, **kwargs):
        started = time.time()
        if resume_from_checkpoint:
            record = checkpoint_record(resume_from_checkpoint)
            self.loss_sum_at_start = record["train_loss_sum"]
            self.resumed_from = resume_from_checkpoint
            if self.trainable_only and not self.is_deepspeed_enabled:  # checked here, with our one-line errors
                load_trained_tensors(self.model, resume_from_checkpoint)
        quiet = DropMessage(PARTIAL_LOAD_REPORT)  # the Trainer loads the partial checkpoint again and names the rest
        logging.getLogger("transformers.trainer").addFilter(quiet)
        try:
            with self.lora_inputs_uncast():
                output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        except NothingLeftToTrain:  # the checkpoint's weights are loaded; finish as the Trainer would
            metrics = speed_metrics("train", started, num_samples=0, num_steps=0)
            self.log(metrics)
            self.control = self.callback_handler.on_train_end(self.args, self.state, self.control)
            output = TrainOutput(self.state.global_step, 0.0, metrics)
        finally:
            logging.getLogger("transformers.trainer").removeFilter(quiet)
        # Over every step of the run, from our own sum (the Trainer's training_loss averages this session, or, in
        # transformers 5.17, the whole run over this session's loss alone).
        session_sum = nested_gather(self.loss_sum, self.args.parallel_mode).mean().item()
        loss = (self.loss_sum_at_start + session_sum) / max(output.global_step, 1)
        output.metrics["train_loss"] = loss
        return TrainOutput(output.global_step, loss, output.metrics)

    def lora_inputs_uncast(self):
        """Under mixed precision, peft's LoRA layers take their half-precision input as it is, instead of casting it
        to their fp32 weights' dtype for autocast to cast back for the product: per LoRA layer two copies of its input
        fewer in the forward pass, two of its gradient in the backward pass, and no fp32 copy saved for backward
        (GLM-4-9B, LoRA on q, k, v with dropout 0.1: 24 KiB per token and block; benchmarks/saved_activations.py).
        Autocast makes the products from the same half-precision values either way (LoRA dropout then runs on the
        half-precision input; CUDA's kernel scales it in fp32 as before). Only where accelerate autocasts (native_amp):
        not in fp32, not under DeepSpeed (which runs the whole model in its own precision), not fp16 on a CPU."""
        return disable_input_dtype_casting(self.model, active=self.accelerator.native_amp)

    def final_evaluation(self):
        """The metrics of the evaluation at the last step: the Trainer's own when it ran one there (transformers 5
        evaluates at the last step), else one run now (every process takes part), so the end is evaluated once."""
        evaluations = [entry for entry in self.state.log_history if "eval_loss" in entry]
        if evaluations and evaluations[-1]["step"] == self.state.global_step:
            return {key: value for key, value in evaluations[-1].items() if key != "step"}
        return self.evaluate()

    def save_model(self, output_dir=None, _internal_call=False):
        if not self.trainable_only:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir or self.args.output_dir
        # Under DeepSpeed every process takes part in gathering the state.
        source = (self.accelerator.get_state_dict(self.deepspeed) if self.is_deepspeed_enabled
                  else dict(self.model.named_parameters()))
        if self.args.should_save:
            trained = {name for name, param in self.model.named_parameters() if param.requires_grad}
            state = {name: tensor.detach().to("cpu", copy=True) for name, tensor in source.items() if name in trained}
            write_partial_checkpoint(output_dir, state, self.model.config)
            torch.save(self.args, os.path.join(output_dir, transformers.trainer.TRAINING_ARGS_NAME))

    def mark_checkpoint(self):
        """After the Trainer wrote a checkpoint: its run record, its marker with the loss summed over every step so
        far (averaged over processes as the log does; all take part), then the rotation."""
        loss_sum = self.loss_sum_at_start + nested_gather(self.loss_sum, self.args.parallel_mode).mean().item()
        self.accelerator.wait_for_everyone()  # every process has written its part of the checkpoint
        if self.args.should_save:
            folder = Path(self.args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            write_run_record(folder, self.run_record())
            mark_complete(folder, {"train_loss_sum": loss_sum})
            rotate_checkpoints(Path(self.args.output_dir), self.keep_checkpoints)
        self.accelerator.wait_for_everyone()


def finish_trainer_run(trainer, train_result, final_eval, output_dir, started, full_state=None):
    """On the main process after train() and evaluate(): the final metrics, the adapter or prefix (or, given the
    gathered `full_state`, the model folder) with train_args.json, the loss plot; prints where they are."""
    metrics = {**train_result.metrics, **final_eval}
    # tokens/s of this session (a resumed run counts only its own tokens); before the first log step there is none,
    # so fall back to all tokens over this session's runtime.
    rates = [entry["train_tokens_per_second"] for entry in trainer.state.log_history
             if "train_tokens_per_second" in entry]
    rate = rates[-1] if rates else metrics["num_input_tokens_seen"] / metrics["train_runtime"]
    metrics["train_tokens_per_second"] = round(rate, 1)
    if trainer.steady_tokens_per_second is not None:
        metrics["steady_tokens_per_second"] = trainer.steady_tokens_per_second
    if trainer.first_step_seconds is not None:
        metrics["first_step_seconds"] = trainer.first_step_seconds
    metrics["peak_memory_gib"] = peak_memory_gib()
    train_args = {**trainer.run_record(), "metrics": metrics, "wall_seconds": round(time.time() - started, 1)}
    config, model_version = train_args["config"], train_args["model_version"]
    if full_state is not None:
        saved = f"model: {save_full_model(full_state, model_version, config['model_dir'], output_dir, train_args)}"
    elif config.get("method") == "ptuning":
        saved = f"P-tuning v2 prefix: {save_prefix(trainer.model, output_dir, train_args)}"
    else:
        saved = f"adapter: {save_adapter(trainer.model, output_dir, train_args)}"
    plot_loss(trainer.state.log_history, Path(output_dir) / "loss.png")
    RunFolder(output_dir).finish()
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, indent=2))
    print(f"{saved}\nloss curve: {Path(output_dir) / 'loss.png'}\n"
          f"TensorBoard: tensorboard --logdir {Path(output_dir) / 'runs'}")
    return metrics


def train_and_finish(config, run_info, model, tokenizer, data_files, args, resume, compute_dtype):
    """A run once its model is set up: data, packing, the output folder made ready (config, model and data are
    good), training, the final evaluation, the export."""
    method, output_dir = config["method"], Path(args.output_dir)
    train_data, eval_data = load_datasets(
        *data_files, tokenizer, model.model_version, config["data_format"], config["max_source_length"],
        config["max_target_length"], config["block_size"], config["skip_bad_lines"], config["loss_on_all_turns"],
        config["show_example"])
    train_data, group_by_length = prepare_packing(model, train_data, config["packing"], config["pack_tokens"],
                                                  config["seed"])
    if group_by_length:
        args.train_sampling_strategy = "group_by_length"
    if int(os.environ.get("RANK", "0")) == 0:  # one process moves an overwritten run aside
        RunFolder(output_dir, resume, config["overwrite_output_dir"]).prepare()
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(output_dir / "runs"))
    trainer = Trainer(model=model, args=args, train_dataset=train_data, eval_dataset=eval_data,
                      data_collator=PaddingCollator(tokenizer.pad_token_id, multiple=graph_length_multiple(model)),
                      trainable_only=method in ("ptuning", "freeze"),
                      eval_tokens=eval_batch_tokens(config["pack_tokens"], args.per_device_train_batch_size,
                                                    train_data),
                      run_info={**run_info, "config": config, "model_version": model.model_version})
    started = time.time()
    result = trainer.train(resume_from_checkpoint=resume)
    final_eval = trainer.final_evaluation() if eval_data is not None else {}
    if method in ("full", "freeze"):  # every process takes part in gathering ZeRO-3 shards; saved in the compute dtype
        state = gathered_state_dict(trainer.model, keep=trainer.is_world_process_zero(), dtype=compute_dtype)
        if trainer.is_world_process_zero():
            finish_trainer_run(trainer, result, final_eval, output_dir, started, state)
    else:
        with gathered_trainable_parameters(trainer.model):  # ZeRO-3: whole LoRA weights for the save, gathered by all
            if trainer.is_world_process_zero():
                finish_trainer_run(trainer, result, final_eval, output_dir, started)
    # DeepSpeed's engine holds itself, the model and the process groups in a cycle through C++ (its gradient hooks)
    # that no garbage collection frees: released here, so that the groups end before the process does
    # (distributed.leave_process_group says why).
    trainer.accelerator.free_memory()
