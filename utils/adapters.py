"""The run folder as the hand-off from training to every later script: an adapter folder (`<run>/adapter_model`, or
`<run>/prefix_model` for P-tuning v2) holds the PEFT adapter (or the prefix) and train_args.json, the record of the
run that made it (its config, model version, data).

- read_run_record: that record ({} for an adapter made elsewhere).
- settings_from_run: the run's base model, lengths, ... for the options a script's command line did not set.
- check_adapter_fits_base: refuse an adapter on a base it was not trained on, before any weight is read.
- default_adapter: the adapter a script uses when none is named (the newest of checkpoint/<data_name>/*/).
"""
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from utils.config_utils import Config
from utils.model_utils import (
    PREFIX_KEY,
    ModelFolderError,
    detect_model_version,
    load_model_with_adapter,
    prefix_checkpoint_config,
    prefix_weights_file,
    read_config,
    remote_module,
)

ADAPTER_DIR = "adapter_model"
PREFIX_DIR = "prefix_model"  # what --method=ptuning writes
LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>A|B|embedding_A|embedding_B)(\.[^.]+)?(\.weight)?$")


def read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelFolderError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from err


def read_run_record(lora_path) -> dict:
    """train_args.json of an adapter folder, or {} where there is none (an adapter trained elsewhere)."""
    path = Path(lora_path) / "train_args.json"
    return read_json(path) if path.is_file() else {}


def settings_from_run(config, lora_path, keys):
    """Set each of `keys` that the command line did not give (config.given, see utils/config_utils.py) to the value
    the run recorded in its train_args.json, so that `--lora_path` alone brings the run's base and lengths along.
    Returns {key: value} of what was taken (printed by the caller)."""
    trained = read_run_record(lora_path).get("config", {})
    given = config.given if isinstance(config, Config) else set(config)  # a plain dict: every key was chosen
    taken = {}
    for key in keys:
        if key in given or key not in trained or trained[key] in ("", None) or trained[key] == config.get(key):
            continue
        config[key] = taken[key] = trained[key]
    if "model_dir" in taken and not Path(taken["model_dir"]).is_dir():
        raise ModelFolderError(
            f"{lora_path} was trained on {taken['model_dir']} (model_dir in its train_args.json), which is not a folder "
            "here; pass the base with --model_dir"
        )
    return taken


def uses_adapter(lora_path):
    return bool(lora_path) and str(lora_path).lower() != "none"


def is_trained_folder(path):
    """A LoRA adapter (adapter_config.json) or a P-tuning v2 checkpoint: what --lora_path takes."""
    return (Path(path) / "adapter_config.json").is_file() or prefix_checkpoint_config(path) is not None


def take_run_settings(config, keys=("model_dir",)):
    """For a script given --lora_path: the run's settings for `keys` that the command line left out
    (settings_from_run), said on one line. Nothing for "none" or a folder without adapter_config.json (the loader
    reports that)."""
    lora_path = config["lora_path"]
    if not uses_adapter(lora_path) or not is_trained_folder(lora_path):
        return {}
    taken = settings_from_run(config, lora_path, keys)
    if taken:
        print(f"from the run of {lora_path} (its train_args.json): " + " ".join(f"--{k}={v}" for k, v in taken.items()), flush=True)
    return taken


def load_run(config, keys=("model_dir",), fold=True):
    """Model + tokenizer for a script's --model_dir and --lora_path (and --dtype, --device): the run's settings for
    `keys` first (take_run_settings), then utils.model_utils.load_model_with_adapter, which refuses an adapter on
    another base before reading weights. The one way the inference scripts load what they serve."""
    take_run_settings(config, keys)
    lora_path = config["lora_path"] if uses_adapter(config["lora_path"]) else None
    return load_model_with_adapter(config["model_dir"], lora_path, dtype=config["dtype"], device=config["device"], fold=fold)


def run_instruction(lora_path):
    """The instruction of the records the adapter was trained on (the first record of the run's train file), or None
    where the run or its train file is not known here."""
    from utils.data_io import iter_json_lines
    from utils.train_utils import data_paths  # where the training scripts found the file (imports the training stack)

    trained = read_run_record(lora_path).get("config", {}) if uses_adapter(lora_path) else {}
    if not trained.get("data_name"):
        return None
    train_file = str(trained.get("train_file") or trained.get("train_data_path") or "").split(",")[0]
    train_file, _ = data_paths(trained["data_name"], train_file)
    if not train_file.is_file():
        return None
    for _, record in iter_json_lines(train_file):
        return record.get("instruct")
    return None


def default_adapter(data_name, checkpoint_root="checkpoint"):
    """The adapter (or P-tuning prefix) of the newest training run of `data_name` (checkpoint/<data_name>/<script>/
    adapter_model or prefix_model, by the time it was written); train_trainer's adapter path where there is none yet
    (for the error message)."""
    root = Path(checkpoint_root, data_name)
    found = [*root.glob(f"*/{ADAPTER_DIR}/adapter_config.json"), *root.glob(f"*/{PREFIX_DIR}/config.json")]
    found.sort(key=lambda p: p.stat().st_mtime)
    return str(found[-1].parent if found else Path(checkpoint_root) / data_name / "train_trainer" / ADAPTER_DIR)


def adapter_weights_file(lora_path):
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (Path(lora_path) / name).is_file():
            return Path(lora_path) / name
    raise ModelFolderError(f"{lora_path}: no adapter_model.safetensors (or adapter_model.bin); is this a PEFT adapter folder?")


def adapter_shapes(weights_file):
    """Tensor name -> shape of the adapter, without reading the tensors."""
    if Path(weights_file).suffix == ".safetensors":
        with safe_open(str(weights_file), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    state = torch.load(str(weights_file), map_location="meta", weights_only=True)
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def base_layer_shapes(version, base_config):
    """Module name -> (out_features, in_features) of every linear / embedding layer of the base, built on the meta
    device from its config (no weights are read)."""
    # Built unquantized: a quantized folder's layers have the float layers' shapes.
    config = remote_module(version, "configuration_chatglm").ChatGLMConfig(**{k: v for k, v in base_config.items() if k != "quantization_bit"})
    with torch.device("meta"):
        model = remote_module(version, "modeling_chatglm").ChatGLMForConditionalGeneration(config)
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            shapes[name] = (module.out_features, module.in_features)
        elif isinstance(module, torch.nn.Embedding):
            shapes[name] = (module.num_embeddings, module.embedding_dim)
    return shapes


def check_adapter_fits_base(lora_path, model_dir, version, base_config):
    """Refuse an adapter trained on another base, naming both: another version in its train_args.json, target modules
    or layers the base lacks, or lora_A / lora_B shapes that do not fit the base's layer sizes."""
    lora_path = Path(lora_path)
    adapter_config = read_json(lora_path / "adapter_config.json")
    trained_on = read_run_record(lora_path).get("model_version")
    if trained_on and trained_on != version:
        raise ModelFolderError(
            f"the adapter {lora_path} was trained on {trained_on} (train_args.json model_version) but the base {model_dir} "
            f"is {version}; pass its {trained_on} base with --model_dir"
        )
    layers = base_layer_shapes(version, base_config)
    targets = adapter_config.get("target_modules") or []
    if isinstance(targets, str):
        found = any(re.fullmatch(targets, name) for name in layers)
        targets_text = f"target_modules regex {targets!r}"
    else:
        found = all(any(name == t or name.endswith("." + t) for name in layers) for t in targets)
        targets_text = f"target_modules {sorted(targets)}"
    if targets and not found:
        raise ModelFolderError(
            f"the adapter {lora_path}: adapter_config.json {targets_text} does not match the layers of the base "
            f"{model_dir} ({version}); the adapter was made for another model"
        )
    problems = []
    for key, shape in adapter_shapes(adapter_weights_file(lora_path)).items():
        match = LORA_KEY.match(key)
        if not match:
            continue
        module, part = match.group("module"), match.group("part")
        if module not in layers:
            problems.append(f"{module}: the base has no such layer")
            continue
        out_features, in_features = layers[module]
        if part == "A" and shape[-1] != in_features:
            problems.append(f"{module}: lora_A {list(shape)} expects {shape[-1]} inputs, the base layer is [{out_features}, {in_features}]")
        elif part == "B" and shape[0] != out_features:
            problems.append(f"{module}: lora_B {list(shape)} gives {shape[0]} outputs, the base layer is [{out_features}, {in_features}]")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ModelFolderError(
            f"the adapter {lora_path} does not fit the base {model_dir} ({version}); it was trained on another base:\n  "
            + "\n  ".join(problems[:5]) + more
        )


def check_prefix_fits_base(prefix_path, model_dir, version, base_config):
    """Refuse a P-tuning v2 checkpoint made for another base, naming both: another version (its train_args.json, or
    its own config.json), or prefix encoder tensors whose shapes the base's layers, heads and widths do not give."""
    prefix_path = Path(prefix_path)
    own_config = read_config(prefix_path)
    trained_on = read_run_record(prefix_path).get("model_version") or detect_model_version(own_config, str(prefix_path / "config.json"))
    if trained_on != version:
        raise ModelFolderError(
            f"the P-tuning checkpoint {prefix_path} was made for {trained_on} but the base {model_dir} is {version}; "
            f"pass its {trained_on} base with --model_dir"
        )
    config = remote_module(version, "configuration_chatglm").ChatGLMConfig(
        **{k: v for k, v in base_config.items() if k != "quantization_bit"}, **prefix_checkpoint_config(prefix_path))
    with torch.device("meta"):
        encoder = remote_module(version, "modeling_chatglm").PrefixEncoder(config)
    expected = {PREFIX_KEY + name: tuple(t.shape) for name, t in encoder.state_dict().items()}
    shapes = adapter_shapes(prefix_weights_file(prefix_path))
    found = {name: shape for name, shape in shapes.items() if name.startswith(PREFIX_KEY)}
    if found != expected:
        raise ModelFolderError(
            f"the P-tuning checkpoint {prefix_path} does not fit the base {model_dir} ({version}): its prefix encoder is "
            f"{found}, the base's layers and heads give {expected}; it was made for another base"
        )
