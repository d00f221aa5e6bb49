"""Pieces the training scripts share: output folders that are never overwritten by accident, LoRA setup (and the
k-bit preparation for QLoRA), the adapter export (PEFT format + train_args.json) or, for full fine-tuning, the model
export (an official-layout model folder + train_args.json), the loss plot and a Trainer that logs peak memory."""
import contextlib
import json
import shutil
import time
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model

from utils.data_io import write_atomic
from utils.dataset import InstructionDataset, TextDataset
from utils.model_folder import folder_config, staged_folder, write_model_folder
from utils.model_utils import read_config

ADAPTER_DIR = "adapter_model"
FULL_MODEL_DIR = "model"  # where --method=full writes the fine-tuned model folder
# lora: train LoRA adapters on frozen weights; full: train every weight (for 6B models, with DeepSpeed ZeRO-3)
METHODS = ("lora", "full")
FULL_MODEL_SHARD_BYTES = 2 * 10**9
CHATGLM_LINEAR_LAYERS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


def data_paths(config):
    """train/dev files: explicit paths, or data/<data_name>/instruct_data/{train,dev}.txt (process.py's output;
    text_data/ for --data_format=text, build_small_model.py's corpus)."""
    default = Path("data") / config["data_name"] / ("text_data" if config.get("data_format") == "text" else "instruct_data")
    return Path(config["train_file"] or default / "train.txt"), Path(config["dev_file"] or default / "dev.txt")


def checkpoint_dir(config, script):
    """checkpoint/<data_name>/<script>/ unless output_dir is given."""
    return Path(config["output_dir"] or Path("checkpoint") / config["data_name"] / script)


def last_checkpoint(output_dir):
    return transformers.trainer_utils.get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None


def find_resume_checkpoint(output_dir, resume_from_checkpoint):
    """The checkpoint to resume from: None for a fresh run, the latest checkpoint-N for "auto", or the given path."""
    if not resume_from_checkpoint:
        return None
    auto = resume_from_checkpoint in ("auto", "true", "latest")
    resume = last_checkpoint(output_dir) if auto else resume_from_checkpoint
    if not resume or not Path(resume).is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint={resume_from_checkpoint!r}: no checkpoint-* folder found in {output_dir}")
    return resume


def prepare_output_dir(output_dir, resume, overwrite):
    """Create output_dir. A folder that already holds a run is reused only when resuming, or emptied first when
    overwrite is set: a finished run is never overwritten by accident."""
    output_dir = Path(output_dir)
    if not resume and output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{output_dir} already holds a run. Resume it with --resume_from_checkpoint=auto, replace it with "
                "--overwrite_output_dir=true, or choose another --output_dir."
            )
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)


def lora_target_modules(spec):
    """'query_key_value' (the default of the seeds), 'all' (every linear layer of the blocks), or a comma list."""
    if spec == "all":
        return list(CHATGLM_LINEAR_LAYERS)
    return [name.strip() for name in spec.split(",") if name.strip()]


def prepare_kbit_model(model, compute_dtype, gradient_checkpointing=True):
    """Ready a model with bitsandbytes 4-bit (or 8-bit) weights for LoRA training; our replacement for peft's
    prepare_model_for_kbit_training, which casts every parameter that is not quantized to fp32.

    For ChatGLM2/3 that cast puts the 65024 x 4096 word embeddings and output layer in fp32 (2 GiB instead of 1 GiB
    in bf16), and with them the residual stream and the output-layer matmul of every step. Nothing needs it: RMSNorm computes
    its statistics in fp32 and ChatGLM-6B's LayerNorm accumulates in fp32 internally, and the loss upcasts each chunk
    of logits to fp32. So here every unquantized parameter (embeddings, output layer, norms, biases) stays in
    `compute_dtype`, as in LoRA training on unquantized weights (train_trainer.py). Returns the model, which:

    - has every parameter frozen (add_lora then adds the trainable adapters, which peft keeps in fp32);
    - with gradient_checkpointing, checkpoints its blocks with use_reentrant=False (peft's function passed none, so
      torch fell back to the deprecated reentrant variant) and makes the embedding output require grad, as
      train_trainer.py does (only the reentrant variant needs that: it gives no gradient to the LoRA weights of a
      block whose inputs need none).
    """
    for param in model.parameters():
        param.requires_grad_(False)
        # Quantized storage (Params4bit, possibly with a float quant_storage; Int8Params) is left as it is.
        if param.is_floating_point() and type(param).__name__ not in ("Params4bit", "Int8Params") and param.dtype != compute_dtype:
            param.data = param.data.to(compute_dtype)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def check_method(method):
    if method not in METHODS:
        raise ValueError(f"--method={method!r}: use lora (LoRA adapters) or full (every weight)")
    return method


def print_trainable_parameters(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")


def add_lora(model, lora):
    """Wrap the model with LoRA adapters (kept in fp32 on half-precision weights by peft)."""
    config = LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora_target_modules(lora["target_modules"]),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def save_adapter(model, output_dir, train_args: dict):
    """The adapter in PEFT format (adapter_config.json + adapter_model.safetensors) and the run's settings, in
    <output_dir>/adapter_model/. Written next to the old one and swapped in, so a crash keeps the last good adapter."""
    final = Path(output_dir) / ADAPTER_DIR
    staging = final.with_name(ADAPTER_DIR + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging), safe_serialization=True)
    write_atomic(staging / "train_args.json", json.dumps(train_args, indent=2, ensure_ascii=False, default=str))
    if final.exists():
        shutil.rmtree(final)
    staging.rename(final)
    return final


def gathered_state_dict(model, keep, dtype=None):
    """The model's whole state dict on the CPU (cast to `dtype` if given) for the process that saves (`keep`), else
    None. Under DeepSpeed ZeRO-3 every process must call it: each weight is gathered from its shards in turn, so no
    GPU holds more than one whole weight beyond its shard. Tied weights (ChatGLM-6B's output layer) are copied apart,
    as safetensors stores each tensor on its own."""
    state, copies = {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in copies:
            context = contextlib.nullcontext()
            if hasattr(tensor, "ds_id"):  # a ZeRO-3 partitioned parameter
                import deepspeed

                context = deepspeed.zero.GatheredParameters([tensor], modifier_rank=None)
            with context:
                copy = tensor.detach().to("cpu", copy=True) if keep else None
            if copy is not None and dtype is not None and copy.is_floating_point():
                copy = copy.to(dtype)
            copies[id(tensor)] = copy
            state[name] = copy
        elif keep:
            state[name] = copies[id(tensor)].clone()
    return state if keep else None


def save_full_model(state, model_version, source_dir, output_dir, train_args: dict):
    """A fully fine-tuned model as a model folder in the official layout, <output_dir>/model/: the weights of `state`,
    the config.json, tokenizer and our .py files (from the base model folder `source_dir`), and train_args.json. It
    loads like any base model (--model_dir=<output_dir>/model). Written aside and swapped in, as the adapter is."""
    final = Path(output_dir) / FULL_MODEL_DIR
    dtype = next(t.dtype for t in state.values() if t.is_floating_point())
    config = folder_config(read_config(source_dir), model_version, dtype)
    with staged_folder(final, replace=True) as staging:
        write_model_folder(staging, state, config, model_version, source_dir, FULL_MODEL_SHARD_BYTES)
        write_atomic(staging / "train_args.json", json.dumps(train_args, indent=2, ensure_ascii=False, default=str))
    return final


def plot_loss(log_history, path):
    """Training (and eval) loss against the step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    figure, axes = plt.subplots(figsize=(6, 4))
    for points, label in ((train, "train loss"), (evals, "eval loss")):
        if points:
            axes.plot(*zip(*points), marker="." if len(points) < 50 else None, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def peak_memory_gib():
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


class TrainingDiverged(RuntimeError):
    pass


def check_weights_finite(model, step):
    """Stops a run whose trained weights hold NaN or inf: no later step can repair them, and the Trainer's log would
    go on printing loss 0 (it leaves non-finite losses out of its averages) until a useless adapter is saved."""
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad and p.numel()]
    if not trained:
        return
    # One sum per tensor (NaN/inf carry through it) and one host sync for all of them.
    finite = torch.stack([torch.isfinite(p.sum(dtype=torch.float32)).to(trained[0][1].device) for _, p in trained])
    if not finite.all():
        broken = [name for (name, _), ok in zip(trained, finite.tolist()) if not ok]
        raise TrainingDiverged(
            f"training diverged at step {step}: {len(broken)} trained weight tensors hold NaN/inf (first: {broken[0]}). "
            "The run stops without writing its final weights; lower --learning_rate (or the LoRA alpha) and train again.")


class Trainer(transformers.Trainer):
    """transformers.Trainer that also logs the peak GPU memory (tokens/s come from include_num_input_tokens_seen) and
    stops with TrainingDiverged once the trained weights are NaN/inf (checked at each training log line)."""

    def log(self, logs, start_time=None):
        if torch.cuda.is_available():
            logs["peak_memory_gib"] = peak_memory_gib()
        if "loss" in logs:
            check_weights_finite(self.model, self.state.global_step)
        super().log(logs, start_time)


DATA_FORMATS = ("instruction", "text")


def load_datasets(train_file, dev_file, tokenizer, version, config):
    """Encoded train and dev sets (dev is None when its file does not exist); prints their counts. config's
    data_format: "instruction" (records {instruct, query, answer}, cut to max_source_length / max_target_length) or
    "text" (records {text}, causal-LM blocks of block_size tokens)."""
    data_format = config.get("data_format", "instruction")
    if data_format not in DATA_FORMATS:
        raise ValueError(f"--data_format={data_format!r}: use instruction or text")

    def load(path):
        if data_format == "text":
            data = TextDataset(path, tokenizer, config["block_size"], config["skip_bad_lines"])
        else:
            data = InstructionDataset(path, tokenizer, version, config["max_source_length"], config["max_target_length"],
                                      config["skip_bad_lines"])
        print(data.describe())
        return data

    train_data = load(train_file)
    if not Path(dev_file).is_file():
        print(f"{dev_file}: not found, training without evaluation")
        return train_data, None
    return train_data, load(dev_file)


@contextlib.contextmanager
def gathered_trainable_parameters(model):
    """Under DeepSpeed ZeRO-3 every process must take part in gathering the partitioned trainable (LoRA) weights, so
    that rank 0 can save them whole; without ZeRO-3 partitioning this does nothing."""
    partitioned = [p for p in model.parameters() if p.requires_grad and hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def finish_trainer_run(trainer, train_result, final_eval, script, config, model_version, output_dir, started, full_state=None):
    """On the main process after Trainer.train() and a final evaluate() (which all processes must run): final
    metrics, the adapter with train_args.json (or, given the gathered `full_state` of a full fine-tuning, the model
    folder), the loss plot; prints where they are."""
    metrics = {**train_result.metrics, **final_eval}
    # The Trainer logs tokens/s of this session (a resumed run counts only its own tokens); before the first log
    # step there is none, so fall back to all tokens over this session's runtime.
    session_rates = [entry["train_tokens_per_second"] for entry in trainer.state.log_history if "train_tokens_per_second" in entry]
    metrics["train_tokens_per_second"] = round(session_rates[-1] if session_rates else metrics["num_input_tokens_seen"] / metrics["train_runtime"], 1)
    metrics["peak_memory_gib"] = peak_memory_gib()
    train_args = {
        "script": script,
        "config": config,
        "model_version": model_version,
        "data": {"train": trainer.train_dataset.stats, "dev": trainer.eval_dataset.stats if trainer.eval_dataset else None},
        "metrics": metrics,
        "world_size": trainer.args.world_size,
        "deepspeed_config": trainer.accelerator.state.deepspeed_plugin.deepspeed_config if trainer.is_deepspeed_enabled else None,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "wall_seconds": round(time.time() - started, 1),
    }
    if full_state is not None:
        saved = f"model: {save_full_model(full_state, model_version, config['model_dir'], output_dir, train_args)}"
    else:
        saved = f"adapter: {save_adapter(trainer.model, output_dir, train_args)}"
    plot_loss(trainer.state.log_history, Path(output_dir) / "loss.png")
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, indent=2))
    print(f"{saved}\nloss curve: {Path(output_dir) / 'loss.png'}\nTensorBoard: tensorboard --logdir {Path(output_dir) / 'runs'}")
    return metrics
