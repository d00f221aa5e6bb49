"""What the training scripts share before anything loads: one DEFAULTS for the keys they have in common, the start
checks (the model folder, the data files, the options, in the order a user needs them, each refused with one line),
the data paths, and train_qlora.py's --train_args_json layered between DEFAULTS and the command line."""
import dataclasses
import json
from pathlib import Path

import torch

from utils.config_utils import ConfigError, flatten, set_flat
from utils.adapters import check_model_dir, meta_model
from utils.model_loading import DTYPES, chatglm_version
from utils.run_dirs import RunFolder, find_resume_checkpoint
from utils.run_record import check_resume_matches
from utils.training_methods import KBIT_BITS, freeze_selection, lora_target_modules

DEFAULTS = {
    "model_dir": "model_hub/chatglm2-small",  # the shipped small model; a 6B model: see README ("Run")
    "data_name": "demo_ner",
    "train_file": "",  # default: data/<data_name>/instruct_data/train.txt (text_data/ for data_format=text)
    "dev_file": "",  # default: data/<data_name>/instruct_data/dev.txt (likewise) if it exists; none: no evaluation
    "output_dir": "",  # default: checkpoint/<data_name>/<the script's name>
    "max_source_length": 256,
    "max_target_length": 128,
    "data_format": "instruction",  # instruction: {instruct, query, answer} records; text: {text} records (causal LM)
    "block_size": 512,  # data_format=text: tokens per training block
    "skip_bad_lines": False,
    "loss_on_all_turns": False,  # learn every history answer too (ChatGLM3 conversation records always do)
    "show_example": False,  # print the first training sample: its tokens, ids and which of them are in the loss
    "method": "lora",  # lora: LoRA adapters; ptuning: a P-tuning v2 prefix; freeze: the last blocks; full: every weight
    "lora": {"r": 32, "alpha": 64, "dropout": 0.05, "target_modules": "all"},  # all: the four linear layers of a block
    # method=ptuning (THUDM's P-tuning v2): keys and values of pre_seq_len positions in every layer (a two-layer MLP
    # makes them with prefix_projection). The official runs used pre_seq_len 128 and learning rate 2e-2.
    "pre_seq_len": 128,
    "prefix_projection": False,
    # method=freeze: the last trainable_layers blocks train (negative: the first ones), within them the parameters
    # named by trainable_modules ("all", or e.g. "mlp,self_attention"), plus those outside the blocks named by
    # extra_modules (e.g. "final_layernorm,output_layer"). The run writes a whole model folder.
    "freeze": {"trainable_layers": 2, "trainable_modules": "all", "extra_modules": ""},
    "dtype": "auto",  # weights: auto (bf16 on GPUs that have it, else fp16; fp32 on CPU), fp32, fp16, bf16
    "num_train_epochs": 8.0,
    "max_steps": -1,  # > 0 overrides num_train_epochs
    "per_device_train_batch_size": 16,  # with packing: rows of packed samples (up to pack_tokens tokens each)
    "packing": False,  # several samples a row, each attending to itself only: trains as unpacked, on fewer rows
    "pack_tokens": 2560,  # tokens per packed row (peak memory follows it; measured choices: docs/benchmarks.md)
    "per_device_eval_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "learning_rate": 3e-3,  # for the small model; 6B models: about 2e-4
    "weight_decay": 0.0,
    "warmup_steps": 0.05,  # a fraction of the total steps if < 1
    "lr_scheduler_type": "linear",
    "max_grad_norm": 1.0,
    "gradient_checkpointing": False,
    # With gradient_checkpointing on one CUDA process without DeepSpeed (ChatGLM2/3): the checkpointed blocks train as
    # CUDA graphs, one capture per batch shape (QLoRA's step is otherwise bound by the host launching its kernels)
    "graph_blocks": True,
    # The MLPs of the first N blocks make their largest activation again in backward instead of keeping it (GLM-4-9B,
    # LoRA on q, k, v: 45.5 KiB less per token and block, each ~0.4 % slower); between none and gradient_checkpointing
    "recompute_mlp_blocks": 0,
    "logging_steps": 10,
    "eval_steps": 100,
    "save_steps": 100,  # <= 0: no checkpoint-N folders (the final adapter / model is written all the same)
    "save_total_limit": 2,  # complete checkpoint-N folders kept (<= 0: all)
    "seed": 42,
    "resume_from_checkpoint": "",  # "auto" = the newest complete checkpoint-N in output_dir, or a path
    "overwrite_output_dir": False,  # replace a finished run (kept as <output_dir>.previous until this one has finished)
    "deepspeed": "",  # a DeepSpeed config (under a launcher, train_trainer.py defaults to deepspeed.json)
    "local_rank": -1,  # set by the deepspeed launcher
    "report_to": "tensorboard",
}
METHODS = ("lora", "ptuning", "freeze", "full")
METHOD_HELP = {"lora": "LoRA adapters", "ptuning": "a P-tuning v2 prefix", "freeze": "the last blocks",
               "full": "every weight"}
DATA_FORMATS = ("instruction", "text")
NO_DEV_FILE = "none"  # --dev_file=none: train without evaluation
# Options with a range, and what a value out of it is told: whole numbers of at least 1 (what each counts), then others.
COUNT_OPTIONS = {
    "max_source_length": "tokens of a prompt", "max_target_length": "tokens of an answer",
    "block_size": "tokens per text block", "pack_tokens": "tokens per packed row",
    "per_device_train_batch_size": "samples (or packed rows) per step and device",
    "per_device_eval_batch_size": "samples per evaluation batch",
    "gradient_accumulation_steps": "micro-batches per step",
    "logging_steps": "steps between log lines", "eval_steps": "steps between evaluations", "lora_r": "the LoRA rank",
}
RANGES = {
    **{key: (lambda v: v >= 1, f"must be a whole number of at least 1 ({what})")
       for key, what in COUNT_OPTIONS.items()},
    "lora_dropout": (lambda v: 0 <= v < 1, "a probability, at least 0 and below 1"),
    "lora_alpha": (lambda v: v > 0, "must be above 0 (the LoRA scale is alpha / r)"),
    **{key: (lambda v: v >= 0, "must be 0 or more")
       for key in ("learning_rate", "warmup_steps", "weight_decay", "max_grad_norm", "recompute_mlp_blocks")},
    "seed": (lambda v: 0 <= v < 2**32, f"use a whole number from 0 to {2**32 - 1}"),
}
# What each reporter of --report_to needs installed (pip name), where it differs from the reporter's name.
REPORTER_PACKAGES = {"azure_ml": "azureml-core", "comet_ml": "comet-ml", "flyte": "flytekit", "kubeflow": "kubeflow"}


def data_paths(data_name, train_file="", dev_file="", data_format="instruction"):
    """train/dev files: explicit paths, or data/<data_name>/instruct_data/{train,dev}.txt (process.py's output;
    text_data/ for data_format text). The dev file is None for --dev_file=none."""
    default = Path("data") / data_name / ("text_data" if data_format == "text" else "instruct_data")
    dev = None if dev_file.lower() == NO_DEV_FILE else Path(dev_file or default / "dev.txt")
    return Path(train_file or default / "train.txt"), dev


def check_data_file(path, option, given, data_name):
    """A data file must be a regular file; `given`: named on the command line (else --data_name's default)."""
    shown = f"{option}={path}" if given else str(path)
    if not path.exists():
        hint = "" if given else (f"; make it with process.py first (python process.py --data_name {data_name} ..., see "
                                 f"README), or give {option}")
        raise ConfigError(f"{shown}: not found{hint}")
    if path.is_dir():
        raise ConfigError(f"{shown}: a folder, not a data file (one JSON record a line)")
    if not path.is_file():
        raise ConfigError(f"{shown}: not a regular file (a FIFO, socket or device); give a data file "
                          "(one JSON record a line)")


def training_data_files(config, data_format="instruction"):
    """The train file and the dev file (None: no evaluation), checked. An explicit --dev_file must be a file; the
    default dev file is used if it exists."""
    train_file, dev_file = data_paths(config["data_name"], config["train_file"], config["dev_file"], data_format)
    check_data_file(train_file, "--train_file", bool(config["train_file"]), config["data_name"])
    if dev_file is not None and (config["dev_file"] or dev_file.exists()):
        check_data_file(dev_file, "--dev_file", bool(config["dev_file"]), config["data_name"])
    elif dev_file is None:
        print("--dev_file=none: training without evaluation")
    else:
        print(f"{dev_file}: not found, training without evaluation (--dev_file names another, --dev_file=none says "
              "none)")
        dev_file = None
    return train_file, dev_file


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
    for key, (valid, told) in RANGES.items():
        if key in flat and not valid(flat[key]):
            raise ConfigError(f"--{key}={flat[key]}: {told}")
    if flat.get("data_format", "instruction") not in DATA_FORMATS:
        raise ConfigError(f"--data_format={flat['data_format']!r}: use instruction or text")
    if config["dtype"] != "auto" and config["dtype"] not in DTYPES:
        raise ConfigError(f"--dtype={config['dtype']!r}: use auto, fp32, fp16 or bf16")
    if "quant_bits" in flat and flat["quant_bits"] not in KBIT_BITS:
        raise ConfigError(f"--quant_bits={flat['quant_bits']!r}: use 4 (NF4 with double quantization) or 8 (LLM.int8)")
    if flat["pre_seq_len"] < 0 or (method == "ptuning" and flat["pre_seq_len"] == 0):
        raise ConfigError(f"--pre_seq_len={flat['pre_seq_len']}: P-tuning's prefix length must be at least 1 "
                          "(the official runs used 128)")
    if "num_train_epochs" in flat and flat["num_train_epochs"] <= 0 and flat["max_steps"] <= 0:
        raise ConfigError(f"--num_train_epochs={flat['num_train_epochs']}: must be above 0 (or set --max_steps above "
                          "0)")
    schedules = [s.value for s in SchedulerType]
    if "lr_scheduler_type" in flat and flat["lr_scheduler_type"] not in schedules:
        raise ConfigError(f"--lr_scheduler_type={flat['lr_scheduler_type']!r}: use one of {', '.join(schedules)}")
    if flat.get("deepspeed") and not Path(flat["deepspeed"]).is_file():
        raise ConfigError(f"--deepspeed={flat['deepspeed']}: no such file; give a DeepSpeed config such as "
                          "deepspeed.json")
    if "report_to" in flat:
        check_report_to(flat["report_to"], script)
    chatglm = model_config.get("model_type") in (None, "chatglm")
    if method == "ptuning" and not chatglm:
        raise ConfigError(f"--method=ptuning: {config['model_dir']} is a {model_config.get('model_type')} model; "
                          "P-tuning v2 here is ChatGLM's own (use lora or freeze)")
    if method in ("lora", "freeze"):
        model = meta_model(chatglm_version(model_config), model_config, config["model_dir"])
        if method == "lora":
            check_lora_targets(config["lora"]["target_modules"], model, config["model_dir"])
        else:
            freeze_selection((name for name, _ in model.named_parameters()), **config["freeze"])
    return method


def read_json_object(path, option):
    """A JSON file that must hold one object (e.g. train_qlora.py's TrainingArguments), read before anything loads."""
    path = Path(path)
    if not path.is_file():
        what = "not a regular file" if path.exists() else "no such file"
        raise ConfigError(f"{option}={path}: {what}; give a JSON file holding one object ({{\"key\": value, ...}})")
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



def check_method(method, methods=METHODS, script=None):
    """`method` if it is one of `methods` (what the calling script trains), else a ConfigError naming the option and
    the choices (and, for a script that trains fewer, where the others are)."""
    if method not in methods:
        choices = [f"{m} ({METHOD_HELP[m]})" for m in methods]
        others = [m for m in METHODS if m not in methods]
        where = f"; {script} trains no {' or '.join(others)} (train_trainer.py does)" if script and others else ""
        raise ConfigError(f"--method={method!r}: use {', '.join(choices[:-1])} or {choices[-1]}{where}")
    return method


def layer_train_args_json(config):
    """train_qlora.py's --train_args_json (TrainingArguments fields) between DEFAULTS and the command line: a field
    the config has takes the file's value unless the command line gave it; the others (e.g. optim) are returned for
    training_arguments. Returns (those fields, the file's values for the run record; None without a file)."""
    from transformers import TrainingArguments

    path = config["train_args_json"]
    if not path:
        return {}, None
    values = read_json_object(path, "--train_args_json")
    report_to = values.get("report_to", "none")
    report_to = ",".join(report_to) if isinstance(report_to, list) else str(report_to)  # the option's form
    check_report_to(report_to, "train_qlora.py", f"--train_args_json={path}: report_to")
    flat, fields = flatten(config), {field.name for field in dataclasses.fields(TrainingArguments)}
    extra = {}
    for key, value in values.items():
        if key not in flat or key not in fields:
            extra[key] = value  # for TrainingArguments, which refuses what is none of its fields
        elif key not in getattr(config, "given", ()):
            set_flat(config, key, report_to if key == "report_to" else value)
    return extra, values


def check_run_start(config, script, output_dir, methods=METHODS):
    """Before anything slow, in the order a user needs them: a resumed run's own settings (its checkpoint's record),
    the model folder, the data files, the options, then the output folder, which rank 0 holds for all ranks (one run
    at a time writes there). Returns (the checkpoint to resume from or None, (train file, dev file or None))."""
    resume = find_resume_checkpoint(output_dir, config["resume_from_checkpoint"])
    check_resume_matches(resume, config, script)
    data_files = check_training_start(config, script, methods)
    RunFolder(output_dir, resume, config["overwrite_output_dir"]).check()
    return resume, data_files
