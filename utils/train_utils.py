"""Pieces the training scripts share: output folders that are never overwritten by accident, LoRA and P-tuning setup
(and the bitsandbytes 4-/8-bit base of train_qlora.py), the adapter export (PEFT format + train_args.json), the
P-tuning prefix export (official layout), or, for full fine-tuning, the model export (an official-layout model folder
+ train_args.json), the loss plot and a Trainer that logs peak memory."""
import contextlib
import copy
import json
import os
import re
import time
from pathlib import Path
from unittest import mock

import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers.trainer_pt_utils import nested_gather

from utils.adapters import ADAPTER_DIR, PREFIX_DIR
from utils.config_utils import ConfigError, flatten
from utils.dataset import InstructionDataset, PackedDataset, TextDataset, format_example, packed_inputs_hook
from utils.errors import UserError
from utils.model_folder import folder_config, write_model_folder, write_native_model_folder
from utils.model_loading import DTYPES, PREFIX_KEY, detect_model_version, read_config, remote_module
from utils.run_dirs import RunFolder, checkpoint_record, mark_complete, rotate_checkpoints, staged_folder
from utils.run_record import resumed_line, run_record, write_run_record

FULL_MODEL_DIR = "model"  # where --method=full writes the fine-tuned model folder
# lora: train LoRA adapters on frozen weights; ptuning: train a P-tuning v2 prefix (the official ChatGLM method) on
# frozen weights; freeze: train the last blocks only; full: train every weight (for 6B models, with DeepSpeed ZeRO-3)
METHODS = ("lora", "ptuning", "freeze", "full")
METHOD_HELP = {"lora": "LoRA adapters", "ptuning": "a P-tuning v2 prefix", "freeze": "the last blocks", "full": "every weight"}
FULL_MODEL_SHARD_BYTES = 2 * 10**9
CHATGLM_LINEAR_LAYERS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


NO_DEV_FILE = "none"  # --dev_file=none: train without evaluation


def data_paths(data_name, train_file="", dev_file="", data_format="instruction"):
    """train/dev files: explicit paths, or data/<data_name>/instruct_data/{train,dev}.txt (process.py's output;
    text_data/ for data_format text, build_small_model.py's corpus). The dev file is None for --dev_file=none."""
    default = Path("data") / data_name / ("text_data" if data_format == "text" else "instruct_data")
    dev = None if dev_file.lower() == NO_DEV_FILE else Path(dev_file or default / "dev.txt")
    return Path(train_file or default / "train.txt"), dev


def check_data_file(path, option, given, data_name):
    """A data file must be a regular file; `given`: named on the command line (else it is the default of
    --data_name, which process.py writes)."""
    shown = f"{option}={path}" if given else str(path)
    if not path.exists():
        hint = "" if given else (f"; make it with process.py first (python process.py --data_name {data_name} ..., see "
                                 f"README), or give {option}")
        raise ConfigError(f"{shown}: not found{hint}")
    if path.is_dir():
        raise ConfigError(f"{shown}: a folder, not a data file (one JSON record a line)")
    if not path.is_file():
        raise ConfigError(f"{shown}: not a regular file (a FIFO, socket or device); give a data file (one JSON record a line)")


def training_data_files(config, data_format="instruction"):
    """The train file and the dev file (None: no evaluation), checked before anything loads. An explicit --dev_file
    must exist as a file; --dev_file=none trains without evaluation; the default dev file is used if it exists."""
    train_file, dev_file = data_paths(config["data_name"], config["train_file"], config["dev_file"], data_format)
    check_data_file(train_file, "--train_file", bool(config["train_file"]), config["data_name"])
    if dev_file is not None and (config["dev_file"] or dev_file.exists()):
        check_data_file(dev_file, "--dev_file", bool(config["dev_file"]), config["data_name"])
    elif dev_file is None:
        print("--dev_file=none: training without evaluation")
    else:
        print(f"{dev_file}: not found, training without evaluation (--dev_file names another, --dev_file=none says none)")
        dev_file = None
    return train_file, dev_file


# Whole-number options and what they count; each must be at least 1 (where the script has it).
COUNT_OPTIONS = {
    "max_source_length": "tokens of a prompt", "max_target_length": "tokens of an answer",
    "block_size": "tokens per text block", "pack_tokens": "tokens per packed row",
    "per_device_train_batch_size": "samples (or packed rows) per step and device",
    "per_device_eval_batch_size": "samples per evaluation batch", "gradient_accumulation_steps": "micro-batches per step",
    "logging_steps": "steps between log lines", "eval_steps": "steps between evaluations", "lora_r": "the LoRA rank",
}
# What each reporter of --report_to needs installed (pip name), where it differs from the reporter's name.
REPORTER_PACKAGES = {"azure_ml": "azureml-core", "comet_ml": "comet-ml", "flyte": "flytekit", "kubeflow": "kubeflow"}


def check_model_dir(model_dir):
    """The model folder's config.json (read before anything loads); a folder that is not there is named as such."""
    if not Path(model_dir).is_dir():
        what = "not a folder" if Path(model_dir).exists() else "no such folder"
        raise ConfigError(f"--model_dir={model_dir}: {what}; give a model folder (config.json, tokenizer and weights; "
                          "see model_hub/README.md)")
    return read_config(model_dir)


def meta_model(model_dir, model_config):
    """The model of `model_dir` built on the meta device from its config.json (no weights are read), for the names of
    its modules and parameters."""
    if model_config.get("model_type") not in (None, "chatglm"):  # transformers' own classes (GLM-4)
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)))
    version = detect_model_version(model_config, str(Path(model_dir) / "config.json"))
    config = remote_module(version, "configuration_chatglm").ChatGLMConfig(
        **{k: v for k, v in model_config.items() if k != "quantization_bit"})
    with torch.device("meta"):
        return remote_module(version, "modeling_chatglm").ChatGLMForConditionalGeneration(config)


def check_lora_targets(spec, model, model_dir):
    """Every name of --lora_target_modules must be a linear layer of the model (peft's matching: the module's name,
    or its last components)."""
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    chatglm = model.config.model_type == "chatglm"
    targets = lora_target_modules(spec, chatglm)
    if targets == "all-linear":
        return
    unknown = [t for t in targets if not any(name == t or name.endswith("." + t) for name in linear)]
    if not targets or unknown:
        names = sorted({name.rsplit(".", 1)[-1] for name in linear})
        what = f"{unknown} is no linear layer of {model_dir}" if unknown else "names no layer"
        raise ConfigError(f"--lora_target_modules={spec!r}: {what}; use all, or a comma list of {', '.join(names)}")


def check_report_to(report_to, script, option="--report_to"):
    """Each reporter must be one the script knows and its package installed."""
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    known = ["tensorboard"] if script == "train_deepspeed.py" else sorted(INTEGRATION_TO_CALLBACK)
    installed = get_available_reporting_integrations()
    for name in (r.strip() for r in report_to.split(",")):
        if name in ("", "none") or (name == "all" and script != "train_deepspeed.py"):
            continue
        if name not in known:
            raise ConfigError(f"{option}={report_to!r}: {name!r} is not a reporter {script} knows; use none or a "
                              f"comma list of {', '.join(known)}")
        if name not in installed:
            package = REPORTER_PACKAGES.get(name, name)
            raise ConfigError(f"{option}={report_to!r}: {name} needs the package {package}, which is not installed "
                              f"(pip install {package}), or use none")


def check_training_options(config, model_config, script, methods=METHODS):
    """The options of a training script, before the model loads: values out of range, names the script or the model
    does not know (LoRA targets and freeze modules are looked up in the model built on the meta device)."""
    from transformers.trainer_utils import SchedulerType

    method = check_method(config["method"], methods, script)
    flat = flatten(config)
    for key, meaning in COUNT_OPTIONS.items():
        if key in flat and flat[key] < 1:
            raise ConfigError(f"--{key}={flat[key]}: must be a whole number of at least 1 ({meaning})")
    if flat.get("data_format", "instruction") not in DATA_FORMATS:
        raise ConfigError(f"--data_format={flat['data_format']!r}: use instruction or text")
    if config["dtype"] != "auto" and config["dtype"] not in DTYPES:
        raise ConfigError(f"--dtype={config['dtype']!r}: use auto, fp32, fp16 or bf16")
    if "quant_bits" in flat and flat["quant_bits"] not in KBIT_BITS:
        raise ConfigError(f"--quant_bits={flat['quant_bits']!r}: use 4 (NF4 with double quantization) or 8 (LLM.int8)")
    if not 0 <= flat["lora_dropout"] < 1:
        raise ConfigError(f"--lora_dropout={flat['lora_dropout']}: a probability, at least 0 and below 1")
    if flat["lora_alpha"] <= 0:
        raise ConfigError(f"--lora_alpha={flat['lora_alpha']}: must be above 0 (the LoRA scale is alpha / r)")
    if flat["pre_seq_len"] < 0 or (method == "ptuning" and flat["pre_seq_len"] == 0):
        raise ConfigError(f"--pre_seq_len={flat['pre_seq_len']}: P-tuning's prefix length must be at least 1 "
                          "(the official runs used 128)")
    if "num_train_epochs" in flat and flat["num_train_epochs"] <= 0 and flat["max_steps"] <= 0:
        raise ConfigError(f"--num_train_epochs={flat['num_train_epochs']}: must be above 0 (or set --max_steps above 0)")
    for key in ("learning_rate", "warmup_steps", "weight_decay", "max_grad_norm"):
        if key in flat and flat[key] < 0:
            raise ConfigError(f"--{key}={flat[key]}: must be 0 or more")
    if "seed" in flat and not 0 <= flat["seed"] < 2**32:
        raise ConfigError(f"--seed={flat['seed']}: use a whole number from 0 to {2**32 - 1}")
    schedules = [s.value for s in SchedulerType]
    if "lr_scheduler_type" in flat and flat["lr_scheduler_type"] not in schedules:
        raise ConfigError(f"--lr_scheduler_type={flat['lr_scheduler_type']!r}: use one of {', '.join(schedules)}")
    if flat.get("deepspeed") and not Path(flat["deepspeed"]).is_file():
        raise ConfigError(f"--deepspeed={flat['deepspeed']}: no such file; give a DeepSpeed config such as deepspeed.json")
    if "report_to" in flat:
        check_report_to(flat["report_to"], script)
    chatglm = model_config.get("model_type") in (None, "chatglm")
    if method == "ptuning" and not chatglm:
        raise ConfigError(f"--method=ptuning: {config['model_dir']} is a {model_config.get('model_type')} model; "
                          "P-tuning v2 here is ChatGLM's own (use lora or freeze)")
    if method in ("lora", "freeze"):
        model = meta_model(config["model_dir"], model_config)
        if method == "lora":
            check_lora_targets(config["lora"]["target_modules"], model, config["model_dir"])
        else:
            freeze_selection((name for name, _ in model.named_parameters()), **config["freeze"])
    return method


def read_json_object(path, option):
    """A JSON file that must hold one object (e.g. train_qlora.py's TrainingArguments), read before anything loads."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{option}={path}: {'not a regular file' if path.exists() else 'no such file'}; give a JSON file "
                          "holding one object ({\"key\": value, ...})")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{option}={path}: line {err.lineno}: not valid JSON ({err.msg})") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{option}={path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    if not isinstance(value, dict):
        raise ConfigError(f"{option}={path}: holds a JSON {type(value).__name__}; expected one object "
                          "({\"key\": value, ...})")
    return value


def check_training_start(config, script, methods=METHODS):
    """Before anything slow, in the order a user needs them: the model folder, the data files, the options. Returns
    the train file and the dev file (None: no evaluation)."""
    model_config = check_model_dir(config["model_dir"])
    files = training_data_files(config, config.get("data_format", "instruction"))
    check_training_options(config, model_config, script, methods)
    return files


def checkpoint_dir(output_dir, data_name, script):
    """output_dir if given, else checkpoint/<data_name>/<script>/."""
    return Path(output_dir or Path("checkpoint") / data_name / script)


def lora_target_modules(spec, chatglm=True):
    """'query_key_value' (the default of the seeds), 'all' (every linear layer of the blocks: ChatGLM's four, or on
    other models peft's "all-linear", every linear layer but the output layer), or a comma list."""
    if spec == "all":
        return list(CHATGLM_LINEAR_LAYERS) if chatglm else "all-linear"
    return [name.strip() for name in spec.split(",") if name.strip()]


def prepare_kbit_model(model, compute_dtype, gradient_checkpointing=True):
    """Ready a model with bitsandbytes 4-bit (or 8-bit) weights for LoRA or P-tuning training; our replacement for
    peft's prepare_model_for_kbit_training, which casts every parameter that is not quantized to fp32.

    For ChatGLM2/3 that cast puts the 65024 x 4096 word embeddings and output layer in fp32 (2 GiB instead of 1 GiB
    in bf16), and with them the residual stream and the output-layer matmul of every step. Nothing needs it: RMSNorm computes
    its statistics in fp32 and ChatGLM-6B's LayerNorm accumulates in fp32 internally, and the loss upcasts each chunk
    of logits to fp32. So here every unquantized parameter (embeddings, output layer, norms, biases) stays in
    `compute_dtype`, as in LoRA training on unquantized weights (train_trainer.py). Returns the model, which:

    - has every parameter frozen (add_lora then adds the trainable adapters, which peft keeps in fp32; or
      train_prefix_only unfreezes the prefix encoder, back in fp32);
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


def check_method(method, methods=METHODS, script=None):
    """`method` if it is one of `methods` (what the calling script trains), else a ConfigError naming the option and
    the choices (and, for a script that trains fewer, where the others are)."""
    if method not in methods:
        choices = [f"{m} ({METHOD_HELP[m]})" for m in methods]
        others = [m for m in METHODS if m not in methods]
        where = f"; {script} trains no {' or '.join(others)} (train_trainer.py does)" if script and others else ""
        raise ConfigError(f"--method={method!r}: use {', '.join(choices[:-1])} or {choices[-1]}{where}")
    return method


def prefix_settings(config):
    """The model-config keywords of --method=ptuning (pre_seq_len, prefix_projection) for load_model_and_tokenizer:
    the model is built with its prefix encoder, initialised as it loads."""
    return {"pre_seq_len": config["pre_seq_len"], "prefix_projection": config["prefix_projection"]}


def train_prefix_only(model, model_dir):
    """P-tuning v2 (THUDM's): the prefix encoder trains, in fp32 (also on a half-precision or k-bit base, as
    officially), and nothing else does. Refuses a model without one (P-tuning v2 here is ChatGLM's own)."""
    if not hasattr(getattr(model, "transformer", None), "pre_seq_len"):
        raise ConfigError(f"--method=ptuning: {model_dir} is not a ChatGLM model; P-tuning v2 here is ChatGLM's own")
    if not model.transformer.pre_seq_len:
        raise ConfigError("--method=ptuning needs --pre_seq_len > 0 (the prefix length; the official runs used 128)")
    model.freeze_all_but_prefix()  # again: prepare_kbit_model froze every parameter
    model.transformer.prefix_encoder.float()
    return model


# What bitsandbytes must leave unquantized once any module is named (naming some replaces transformers' default
# list, which is the output layer): ChatGLM-6B's lm_head, ChatGLM2/3's output_layer, and P-tuning's prefix encoder,
# which trains (with prefix_projection it holds two Linear layers that would otherwise be quantized and frozen).
PREFIX_SKIP_MODULES = ["lm_head", "transformer.output_layer", "transformer.prefix_encoder"]
KBIT_BITS = (4, 8)


def kbit_quantization_config(bits, compute_dtype, ptuning=False):
    """The bitsandbytes config of train_qlora.py's base: bits=4 is NF4 with double quantization (QLoRA), bits=8 is
    LLM.int8; both also run on CPU (bitsandbytes' CPU backend). With ptuning the prefix encoder stays a float module."""
    from transformers import BitsAndBytesConfig

    if bits not in KBIT_BITS:
        raise ConfigError(f"--quant_bits={bits!r}: use 4 (NF4 with double quantization) or 8 (LLM.int8)")
    skip = {"llm_int8_skip_modules": PREFIX_SKIP_MODULES} if ptuning else {}
    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, **skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute_dtype, **skip)


BLOCK_INDEX = re.compile(r"\.layers\.(\d+)\.")  # transformer.encoder.layers.N. (ChatGLM2/3), transformer.layers.N. (v1), model.layers.N.


def freeze_selection(parameter_names, trainable_layers, trainable_modules="all", extra_modules=""):
    """The names among `parameter_names` that freeze tuning trains (see freeze_all_but); an option that names a block
    the model lacks, or a module that matches nothing, is a ConfigError that says what there is. Also used before the
    model loads, on the names of the model built on the meta device."""
    parameter_names = list(parameter_names)
    blocks = sorted({int(m.group(1)) for name in parameter_names if (m := BLOCK_INDEX.search(name))})
    if not blocks or trainable_layers == 0 or abs(trainable_layers) > len(blocks):
        raise ConfigError(f"--freeze_trainable_layers={trainable_layers}: the model has {len(blocks)} blocks; give "
                          f"1..{len(blocks)} (the last N) or -1..-{len(blocks)} (the first N)")
    chosen = set(blocks[-trainable_layers:] if trainable_layers > 0 else blocks[:-trainable_layers])
    modules = [m.strip() for m in trainable_modules.split(",") if m.strip()]
    extras = [m.strip() for m in extra_modules.split(",") if m.strip()]
    inside = {name.split(".layers.", 1)[1].split(".", 1)[1] for name in parameter_names if BLOCK_INDEX.search(name)}
    unknown = [m for m in modules if m != "all" and not any(f".{m}." in f".{n}" for n in inside)]
    if not modules or unknown:
        what = f"{unknown} matches nothing in a block" if unknown else "names no module"
        raise ConfigError(f"--freeze_trainable_modules={trainable_modules!r}: {what}; use all, or names from a block's "
                          f"parameters {sorted(inside)}")
    outside = [name for name in parameter_names if not BLOCK_INDEX.search(name)]
    missing = [m for m in extras if not any(m in name for name in outside)]
    if missing:
        raise ConfigError(f"--freeze_extra_modules={extra_modules!r}: {missing} match no parameter outside the blocks; "
                          f"those are {outside}")
    trained = []
    for name in parameter_names:
        match = BLOCK_INDEX.search(name)
        if match:
            train = int(match.group(1)) in chosen and ("all" in modules or any(f".{m}." in name for m in modules))
        else:
            train = any(m in name for m in extras)
        if train:
            trained.append(name)
    return trained


def freeze_all_but(model, trainable_layers, trainable_modules="all", extra_modules=""):
    """Freeze tuning (as LLaMA-Factory's): only the last `trainable_layers` blocks train (the first ones for a
    negative number), within them only the parameters whose names contain one of the comma-separated
    `trainable_modules` ("all": the whole block), plus any parameter outside the blocks whose name contains one of
    `extra_modules` (e.g. "final_layernorm,output_layer"). Returns the trained parameter names; an option that selects
    nothing is an error that lists what there is."""
    trained = set(freeze_selection((name for name, _ in model.named_parameters()), trainable_layers, trainable_modules,
                                   extra_modules))
    for name, param in model.named_parameters():
        param.requires_grad_(name in trained)
    return [name for name, _ in model.named_parameters() if name in trained]


def prefix_state(model):
    """The trained prefix encoder's tensors under their official names (transformer.prefix_encoder.*), on the CPU."""
    return {name: param.detach().to("cpu", copy=True) for name, param in model.named_parameters()
            if name.startswith(PREFIX_KEY)}


def write_partial_checkpoint(folder, state, config):
    """The tensors a run trains (`state`) and the model's config.json: the layout of the official P-tuning v2
    checkpoints (for a prefix, config.json records pre_seq_len and prefix_projection), in safetensors; freeze
    tuning's checkpoints use it for the chosen blocks."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if getattr(config, "quantization_config", None) is not None:
        # A bitsandbytes base (train_qlora.py): how the run held the base is no part of the prefix, and a reader of
        # the official layout would take the folder for a quantized model. train_args.json records it.
        config = copy.copy(config)
        del config.quantization_config
    config.to_json_file(str(folder / "config.json"))


def save_prefix(model, output_dir, train_args: dict):
    """The P-tuning v2 checkpoint and the run's settings, in <output_dir>/prefix_model/; predict.py, chat_ner.py,
    the servers and merge_lora_and_quantize.py take it by --lora_path. Written aside and swapped in."""
    final = Path(output_dir) / PREFIX_DIR
    with staged_folder(final, replace=True) as staging:
        write_partial_checkpoint(staging, prefix_state(model), model.config)
        write_run_record(staging, train_args)
    return final


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
        target_modules=lora_target_modules(lora["target_modules"], chatglm=getattr(model, "model_version", None) is not None),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def save_adapter(model, output_dir, train_args: dict):
    """The adapter in PEFT format (adapter_config.json + adapter_model.safetensors) and the run's settings, in
    <output_dir>/adapter_model/. Written aside and swapped in, so a crash keeps the last good adapter."""
    final = Path(output_dir) / ADAPTER_DIR
    with staged_folder(final, replace=True) as staging:
        model.save_pretrained(str(staging), safe_serialization=True)
        write_run_record(staging, train_args)
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
    with staged_folder(final, replace=True) as staging:
        if model_version is None:  # a model of transformers' own classes (GLM-4): its own config and tokenizer files
            write_native_model_folder(staging, state, source_dir, FULL_MODEL_SHARD_BYTES)
        else:
            write_model_folder(staging, state, folder_config(read_config(source_dir), model_version, dtype), model_version,
                               source_dir, FULL_MODEL_SHARD_BYTES)
        write_run_record(staging, train_args)
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
    partial = Path(path).with_name(f".{Path(path).name}.partial")
    figure.savefig(partial, dpi=100, format="png")
    plt.close(figure)
    os.replace(partial, path)  # a crash never leaves half a picture where the last one was


def peak_memory_gib():
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


class TrainingDiverged(UserError, RuntimeError):
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


def check_only_float_weights_train(model):
    """Trainer's check of a k-bit model with trained tensors of its own (no PEFT wrapper): something trains, and it is
    all float (unquantized) parameters."""
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    quantized = [name for name, p in trained if not p.is_floating_point() or type(p).__name__ in ("Params4bit", "Int8Params")]
    if not trained or quantized:
        raise ValueError(f"a quantized model trains only float tensors beside its frozen quantized weights; "
                         f"{'nothing trains' if not trained else f'{quantized[0]} is quantized'}")


class _NothingLeftToTrain(Exception):
    pass


class _StopAtPlannedEnd(transformers.TrainerCallback):
    """The Trainer checks for the end of training only after a step: resumed from a checkpoint of the last step
    (killed during the final save) it would train one step too many. This stops it before that step."""

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            raise _NothingLeftToTrain


class _ResumedRun(transformers.TrainerCallback):
    """On a resumed run: says where it resumed from, and re-applies this run's logging, eval and save frequencies,
    which the Trainer otherwise takes from the checkpoint's trainer_state.json (utils/run_record.py lets them change)."""

    def __init__(self):
        self.checkpoint = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.checkpoint is not None:
            state.compute_steps(args, state.max_steps)
            if state.is_world_process_zero:
                print(resumed_line(self.checkpoint, state.global_step, state.max_steps), flush=True)


class Trainer(transformers.Trainer):
    """transformers.Trainer that
    - logs the peak GPU memory (tokens/s come from include_num_input_tokens_seen), and stops with TrainingDiverged once
      the trained weights are NaN/inf (checked at each training log line);
    - writes the run record (train_args.json, utils/run_record.py) into each checkpoint, marks the checkpoint
      complete once all of it is on disk, and only then rotates old ones out (the Trainer's own rotation, which could
      delete the last complete checkpoint before the new one is whole, is turned off), so
      --resume_from_checkpoint=auto never picks a checkpoint cut off by a crash (utils/run_dirs.py);
    - reports train_loss over all the steps of a resumed run (the Trainer averages over the resumed part only), from
      the loss sum recorded in each checkpoint's marker;
    - trains no extra step when resumed from the checkpoint of the last step.
    run_info: what run_record takes beside the data and processes (script, config, model_version, and
    train_qlora.py's training_arguments)."""

    def __init__(self, *args, run_info, trainable_only=False, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        validate = transformers.trainer.validate_quantization_for_training
        if trainable_only and getattr(model, "is_quantized", False):
            # transformers refuses a quantized model that is no PeftModel, assuming nothing in it could train; P-tuning
            # on a k-bit base (train_qlora.py) trains a float prefix encoder beside the frozen quantized weights.
            validate = check_only_float_weights_train
        with mock.patch.object(transformers.trainer, "validate_quantization_for_training", validate):
            super().__init__(*args, **kwargs)
        # P-tuning and freeze tuning: checkpoints hold the trained tensors (the prefix encoder, the chosen blocks),
        # not the frozen 6B weights, which resuming takes from the base again.
        self.trainable_only = trainable_only
        self.keep_checkpoints = self.args.save_total_limit or 0
        self.args.save_total_limit = None
        self.add_callback(_StopAtPlannedEnd)
        self.resumed_run = _ResumedRun()
        self.add_callback(self.resumed_run)
        self.run_info = run_info
        self.loss_sum_at_start = 0.0
        self.first_training_log = None  # (wall clock, tokens seen) at the first training log line of this session
        self.steady_tokens_per_second = None  # real tokens/s from that line to the latest one

    def run_record(self):
        """The run's train_args.json without its final metrics (utils/run_record.py)."""
        deepspeed_config = self.accelerator.state.deepspeed_plugin.deepspeed_config if self.is_deepspeed_enabled else None
        return run_record(**self.run_info, train_data=self.train_dataset, eval_data=self.eval_dataset,
                          world_size=self.args.world_size, deepspeed_config=deepspeed_config)

    def _track_num_input_tokens(self, inputs):
        # Packed rows carry segment ids (1, 2, 3, ...) in attention_mask: count tokens, not ids.
        if isinstance(inputs.get("attention_mask"), torch.Tensor) and inputs["attention_mask"].dim() == 2:
            inputs = {**inputs, "attention_mask": inputs["attention_mask"].ne(0)}
        super()._track_num_input_tokens(inputs)

    def log(self, logs, start_time=None):
        if torch.cuda.is_available():
            logs["peak_memory_gib"] = peak_memory_gib()
        if "loss" in logs:
            check_weights_finite(self.model, self.state.global_step)
            # The steady rate leaves out the steps before the first log line (compilation, allocator and cuBLAS set-up).
            now, seen = time.perf_counter(), self.state.num_input_tokens_seen
            if self.first_training_log is None:
                self.first_training_log = (now, seen)
            elif now > self.first_training_log[0]:
                self.steady_tokens_per_second = round((seen - self.first_training_log[1]) / (now - self.first_training_log[0]), 1)
        super().log(logs, start_time)

    def train(self, resume_from_checkpoint=None, **kwargs):
        step_at_start = 0
        if resume_from_checkpoint:
            record = checkpoint_record(resume_from_checkpoint)
            self.loss_sum_at_start, step_at_start = record["train_loss_sum"], record["step"]
            self.resumed_run.checkpoint = resume_from_checkpoint
        try:
            output = super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
        except _NothingLeftToTrain:  # the checkpoint's weights are loaded; finish as the Trainer would
            output = self._finalize_training(None, 0, time.time())
        loss = (self.loss_sum_at_start + output.training_loss * (output.global_step - step_at_start)) / max(output.global_step, 1)
        output.metrics["train_loss"] = loss
        return transformers.trainer_utils.TrainOutput(output.global_step, loss, output.metrics)

    def _save(self, output_dir=None, state_dict=None):
        if not self.trainable_only:
            return super()._save(output_dir, state_dict)
        if self.args.should_save:
            trained = {name for name, param in self.model.named_parameters() if param.requires_grad}
            source = state_dict if state_dict is not None else dict(self.model.named_parameters())
            state = {name: tensor.detach().to("cpu", copy=True) for name, tensor in source.items() if name in trained}
            # The official P-tuning layout: these tensors in model.safetensors, the model's config.json beside them.
            write_partial_checkpoint(output_dir or self.args.output_dir, state, self.model.config)
            torch.save(self.args, os.path.join(output_dir or self.args.output_dir, transformers.trainer.TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if not self.trainable_only:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file

        model = model or self.model
        state = load_file(str(Path(resume_from_checkpoint) / "model.safetensors"))
        trained = {name for name, param in model.named_parameters() if param.requires_grad}
        if set(state) != trained:
            raise ConfigError(f"--resume_from_checkpoint: {resume_from_checkpoint} holds {sorted(set(state) - trained)[:3]} / lacks "
                              f"{sorted(trained - set(state))[:3]} of the parameters this run trains; resume with the settings it was made with")
        parameters = dict(model.named_parameters())
        reshaped = [name for name, tensor in state.items() if tensor.shape != parameters[name].shape]
        if reshaped:
            raise ConfigError(f"--resume_from_checkpoint: {resume_from_checkpoint} holds {reshaped[0]} of shape "
                              f"{list(state[reshaped[0]].shape)}, this run trains it as {list(parameters[reshaped[0]].shape)}; "
                              "resume with the settings it was made with")
        with torch.no_grad():
            for name, tensor in state.items():
                parameters[name].copy_(tensor)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        # The loss summed over every step so far: this session's logged part, what is pending since the last log
        # line (averaged over processes as the log does; every process takes part), and what earlier sessions did.
        pending = nested_gather(self._tr_loss, self.args.parallel_mode).mean().item()
        loss_sum = self.loss_sum_at_start + self._total_loss_scalar + pending
        self.accelerator.wait_for_everyone()  # every process has written its part of the checkpoint
        if self.args.should_save:
            run_dir = Path(self._get_output_dir(trial=trial))
            folder = run_dir / f"checkpoint-{self.state.global_step}"
            # Here rather than in a callback's on_save, which runs after this method: the marker must come last.
            write_run_record(folder, self.run_record())
            mark_complete(folder, {"train_loss_sum": loss_sum})
            rotate_checkpoints(run_dir, self.keep_checkpoints)
        self.accelerator.wait_for_everyone()


DATA_FORMATS = ("instruction", "text")


def load_datasets(train_file, dev_file, tokenizer, version, data_format="instruction", max_source_length=256,
                  max_target_length=128, block_size=512, skip_bad_lines=False, loss_on_all_turns=False, show_example=False):
    """Encoded train and dev sets (dev is None when dev_file is None); prints their counts. data_format:
    "instruction" (records {instruct, query, answer}, or ChatGLM3 conversation records, cut to max_source_length /
    max_target_length; loss_on_all_turns: every answer of a record's history is learnt too) or "text" (records
    {text}, causal-LM blocks of block_size tokens). show_example: also print the first training sample's tokens."""
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
    if dev_file is None:
        return train_data, None
    return train_data, load(dev_file)


def can_pack(model):
    """Whether packed rows train `model` as the unpacked examples: the ChatGLM models read the segment ids in the
    mask themselves; models of transformers' own code get restarting position_ids (packed_inputs_hook), from which
    transformers builds a block-diagonal mask. Other (remote-code) models might attend across examples."""
    if getattr(model, "model_version", None) in ("chatglm-6b", "chatglm2-6b", "chatglm3-6b"):
        return True
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return type(base).__module__.startswith("transformers.models.")


def prepare_packing(model, train_data, packing, pack_tokens, seed, log=print):
    """packing: the training set as a PackedDataset of rows of at most pack_tokens tokens (prints how many
    samples went into how many rows), and for a native transformers model the hook that turns the rows' segment ids
    into restarting position_ids. Returns (train data, group_by_length): a model that cannot pack trains on the
    unpacked examples in batches grouped by length instead (less padding), and the log says so."""
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


def finish_trainer_run(trainer, train_result, final_eval, output_dir, started, full_state=None):
    """On the main process after Trainer.train() and a final evaluate() (which all processes must run): final
    metrics, the adapter with train_args.json (or, given the gathered `full_state` of a full fine-tuning, the model
    folder), the loss plot; prints where they are."""
    metrics = {**train_result.metrics, **final_eval}
    # The Trainer logs tokens/s of this session (a resumed run counts only its own tokens); before the first log
    # step there is none, so fall back to all tokens over this session's runtime.
    session_rates = [entry["train_tokens_per_second"] for entry in trainer.state.log_history if "train_tokens_per_second" in entry]
    metrics["train_tokens_per_second"] = round(session_rates[-1] if session_rates else metrics["num_input_tokens_seen"] / metrics["train_runtime"], 1)
    if trainer.steady_tokens_per_second is not None:
        metrics["steady_tokens_per_second"] = trainer.steady_tokens_per_second
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
    print(f"{saved}\nloss curve: {Path(output_dir) / 'loss.png'}\nTensorBoard: tensorboard --logdir {Path(output_dir) / 'runs'}")
    return metrics
