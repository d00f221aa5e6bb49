"""The run record, train_args.json: what a training run was given and trained on (script, config, model version,
data, processes, versions), in every checkpoint-N and, with the run's metrics, in its final adapter, prefix or model
folder. Built, written and read (its fields checked) here; check_resume_matches holds a resumed run's options to it."""
import json
import os
from pathlib import Path

import torch
import transformers

from utils.config_utils import Config, ConfigError, flatten, set_flat
from utils.data_io import write_atomic
from utils.model_loading import ModelFolderError, chatglm_version, read_config, read_json

RUN_RECORD = "train_args.json"
# The fields of a run record that the later scripts read, and their JSON types (a config value may also be null).
RECORD_FIELDS = {"script": str, "config": dict, "model_version": (str, type(None))}
RECORD_CONFIG_FIELDS = {"model_dir": str, "data_name": str, "train_file": str, "train_data_path": str,
                        "max_source_length": int}
JSON_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object",
                   list: "a list", type(None): "null"}

# Options a resumed run may be given anew: they change how it logs, evaluates, saves or reads its data, not what it
# trains (activation checkpointing trades memory for time, with the same gradients); --train_args_json's file may move
# (its contents are compared key by key). Every other training option must equal the run's record.
RESUMABLE = frozenset({"logging_steps", "eval_steps", "save_steps", "save_total_limit", "report_to", "dev_file",
                       "per_device_eval_batch_size", "show_example", "skip_bad_lines", "gradient_checkpointing", "graph_blocks",
                       "recompute_mlp_blocks", "train_args_json"})
# Where and how this session resumes: neither compared nor taken from the record.
SESSION = frozenset({"output_dir", "resume_from_checkpoint", "overwrite_output_dir", "local_rank"})
# TrainingArguments of train_qlora.py's --train_args_json file that may change on resume, as above.
RESUMABLE_TRAINING_ARGUMENTS = frozenset({
    "output_dir", "logging_steps", "logging_first_step", "logging_strategy", "logging_dir", "eval_steps",
    "eval_strategy", "save_steps", "save_strategy", "save_total_limit", "report_to", "per_device_eval_batch_size",
    "dataloader_num_workers", "disable_tqdm"})
# Resolved before the resume check runs (train_trainer.py picks its DeepSpeed config first), so never taken from the
# record: a difference is refused whether given or not.
NOT_TAKEN = frozenset({"deepspeed"})


def run_record(script, config, model_version, train_data, eval_data, world_size, deepspeed_config,
               training_arguments=None, **versions):
    """A run's record without its final metrics; training_arguments: train_qlora.py's file; versions: more libraries'"""
    record = {"script": script, "config": config, "model_version": model_version,
              "data": {"train": train_data.stats, "dev": eval_data.stats if eval_data is not None else None},
              "world_size": world_size, "deepspeed_config": deepspeed_config,
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__, **versions}}
    if training_arguments is not None:
        record["training_arguments"] = training_arguments
    return record


def check_json_type(path, field, value, expected, what=None):
    """One line naming the file and the field when `value` is not of the JSON type(s) `expected`."""
    expected = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool) and bool not in expected or not isinstance(value, expected):
        wanted = what or " or ".join(JSON_TYPE_NAMES.get(t, t.__name__) for t in expected)
        field = f"field '{field}': " if field else ""
        raise ModelFolderError(f"{path}: {field}expected {wanted}, got {json.dumps(value, ensure_ascii=False)[:80]}")


def read_run_record(folder) -> dict:
    """train_args.json of a folder, {} where there is none; the fields that the later scripts read have their types."""
    path = Path(folder) / RUN_RECORD
    if not path.is_file():
        return {}
    record = read_json(path)
    check_json_type(path, None, record, dict, "a JSON object (the record of a training run)")
    for field, expected in RECORD_FIELDS.items():
        if field in record:
            check_json_type(path, field, record[field], expected)
    for field, expected in RECORD_CONFIG_FIELDS.items():
        if field in record.get("config", {}):
            check_json_type(path, f"config.{field}", record["config"][field], (expected, type(None)))
    return record


def write_run_record(folder, record):
    write_atomic(Path(folder) / RUN_RECORD, json.dumps(record, indent=2, ensure_ascii=False, default=str))


def resumed_line(checkpoint, step, total_steps):  # what every training script prints when it resumes
    return f"resumed from {checkpoint} (step {step} of {total_steps})"


def folder_version(model_dir):
    """(the ChatGLM version of a model folder, or None for a model of transformers' own classes; its name)."""
    config = read_config(model_dir)
    version = chatglm_version(config, str(Path(model_dir) / "config.json"))
    return version, version or config["model_type"]


def recorded_name(version, model_dir):
    try:
        return version or folder_version(model_dir)[1]
    except Exception:  # noqa: BLE001 - only for the message: the folder of the run may be gone or changed
        return "a model of transformers' own classes"


def as_recorded(value):
    """A config value as train_args.json holds it (tuples become lists, other objects their text)."""
    return json.loads(json.dumps(value, ensure_ascii=False, default=str))


def as_option(value):
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def check_resume_matches(checkpoint, config, script):
    """Before a resumed run loads its model, `config` against the record in `checkpoint`: an option not given takes the
    run's value; a given one that differs stops (unless RESUMABLE), as does another base, script or process count."""
    if not checkpoint:
        return
    record_path = Path(checkpoint) / RUN_RECORD
    if not record_path.is_file():
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"resume: {checkpoint} holds no {RUN_RECORD} (a checkpoint of an older version): the options are "
                  "not checked against the run's")
        return
    record = read_run_record(checkpoint)  # a JSON object whose fields have their types
    run = f"the run in {checkpoint}"
    if record.get("script") not in (None, script):
        raise ConfigError(f"--resume_from_checkpoint: {run} was trained by {record['script']}, not {script}; resume "
                          f"it with {record['script']}, or start a new run")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if record.get("world_size") not in (None, world_size):
        raise ConfigError(f"--resume_from_checkpoint: {run} trained on {record['world_size']} process(es), this resume "
                          f"has {world_size}; resume with {record['world_size']}, or start a new run")

    given = config.given if isinstance(config, Config) else set(flatten(config))  # a plain dict: every key was chosen
    trained, current = flatten(record.get("config", {})), flatten(config)
    taken, differing = {}, []
    for key, value in current.items():
        if key in SESSION or key not in trained or as_recorded(value) == trained[key]:
            continue
        if key == "model_dir" and key in given and (not Path(trained[key]).is_dir() or (
                os.path.isdir(value) and os.path.samefile(value, trained[key]))):
            continue  # the same folder by another path, or the run's folder is gone: the version check below decides
        if key in given and key in RESUMABLE:
            continue  # takes effect
        if key in given or key in NOT_TAKEN:
            differing.append(key)
        else:
            taken[key] = trained[key]
    if differing:
        key = "model_dir" if "model_dir" in differing else differing[0]
        if key == "model_dir":
            gives = f"{folder_version(current[key])[1]} ({current[key]})" if Path(current[key]).is_dir() else current[key]
            values = (f"was trained on {recorded_name(record.get('model_version'), trained[key])} ({trained[key]}), "
                      f"this resume gives {gives}")
        else:
            values = f"was trained with {as_option(trained[key])}, this resume gives {as_option(as_recorded(current[key]))}"
        how = (f"resume with --{key}={trained[key]}" if key in NOT_TAKEN
               else f"resume without --{key} (it takes the run's value)")
        others = [f"--{k}" for k in differing if k != key]
        also = f" (also different: {', '.join(others)})" if others else ""
        raise ConfigError(f"--{key}: {run} {values}; start a new run, or {how}{also}")
    for key, value in taken.items():
        set_flat(config, key, value)
    if taken and int(os.environ.get("RANK", "0")) == 0:
        print(f"resume: the run's settings from {record_path}: " + " ".join(f"--{k}={as_option(v)}" for k, v in taken.items()))

    if "model_dir" in config:
        model_dir = config["model_dir"]
        if not Path(model_dir).is_dir():
            raise ConfigError(f"--model_dir: {run} was trained on {model_dir}, which is not a folder here; pass the "
                              "model folder with --model_dir")
        version, name = folder_version(model_dir)
        if "model_version" in record and version != record["model_version"]:
            trained_dir = trained.get("model_dir", model_dir)
            raise ConfigError(f"--model_dir: {run} was trained on {recorded_name(record['model_version'], trained_dir)} "
                              f"({trained_dir}), this resume gives {name} ({model_dir}); start a new run, or resume with "
                              "the run's base model")
    check_training_arguments(record, config, run)


def check_training_arguments(record, config, run):
    """train_qlora.py: its --train_args_json file against the TrainingArguments the run recorded."""
    path = config.get("train_args_json") or ""
    if "training_arguments" not in record or not Path(path).is_file():
        return  # not train_qlora.py, or its file is missing (the script reports that)
    try:
        current = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return  # the script reports it with its line
    trained = record["training_arguments"]
    for key in sorted(set(current) | set(trained)) if isinstance(current, dict) else ():
        if key in RESUMABLE_TRAINING_ARGUMENTS or current.get(key) == trained.get(key):
            continue
        gives = json.dumps(current[key], ensure_ascii=False) if key in current else "nothing (the default)"
        had = json.dumps(trained[key], ensure_ascii=False) if key in trained else "nothing (the default)"
        raise ConfigError(f"--train_args_json: {path}: '{key}': {run} was trained with {had}, this resume gives {gives}; "
                          f"start a new run, or resume with the run's '{key}'")
