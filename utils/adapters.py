"""The run folder as the hand-off from training to every later script: an adapter folder (`<run>/adapter_model`, or
`<run>/prefix_model` for P-tuning v2) holds the PEFT adapter (or the prefix) and train_args.json, the record of the
run that made it (its config, model version, data); a freeze or full run's model folder (`<run>/model`) holds the
record too, and is a run of its own when given by --model_dir.

- read_run_record: that record ({} for an adapter made elsewhere), its fields checked.
- choose_lora_path: --lora_path as given; none for a run's model folder; else the newest run of --data_name (said).
- take_run_settings: the run's base model, lengths, data set ... for the options a script's command line did not set.
- check_lora_on_base: refuse what --lora_path names unless it is an adapter or prefix made for the base, before any
  weight is read; trained_on says which model the adapter was made for, and from where that is known.
- results_folder: where the results of scoring a run go (that run's folder, never another run's).
"""
import json
import re
import time
from pathlib import Path, PurePath

import torch
from safetensors import safe_open

from utils.config_utils import Config
from utils.model_utils import (
    PREFIX_KEY,
    ModelFolderError,
    check_folder,
    check_prefix_tensor_names,
    detect_model_version,
    load_model_with_adapter,
    prefix_checkpoint_config,
    prefix_weights_file,
    read_config,
    remote_module,
)

ADAPTER_DIR = "adapter_model"
PREFIX_DIR = "prefix_model"  # what --method=ptuning writes
RUN_RECORD = "train_args.json"
LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>A|B|embedding_A|embedding_B)(\.[^.]+)?(\.weight)?$")
CHECKPOINT_NAME = re.compile(r"checkpoint-\d+")
# The fields of a run record that the later scripts read, and their JSON types (a config value may also be null).
RECORD_FIELDS = {"script": str, "config": dict, "model_version": (str, type(None))}
RECORD_CONFIG_FIELDS = {"model_dir": str, "data_name": str, "train_file": str, "train_data_path": str, "max_source_length": int}
JSON_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object",
                   list: "a list", type(None): "null"}


def read_json(path):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelFolderError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ModelFolderError(f"{path}: cannot be read ({err.strerror if isinstance(err, OSError) else err})") from err


def read_adapter_config(lora_path) -> dict:
    """adapter_config.json of a PEFT adapter folder, a JSON object."""
    path = Path(lora_path) / "adapter_config.json"
    adapter_config = read_json(path)
    if not isinstance(adapter_config, dict):
        raise ModelFolderError(f"{path}: expected a JSON object (a PEFT adapter's settings), got "
                               f"{json.dumps(adapter_config, ensure_ascii=False)[:80]}")
    return adapter_config


def check_json_type(path, field, value, expected):
    """One line naming the file and the field when `value` is not of the JSON type(s) `expected`."""
    expected = expected if isinstance(expected, tuple) else (expected,)
    if isinstance(value, bool) and bool not in expected or not isinstance(value, expected):
        wanted = " or ".join(JSON_TYPE_NAMES.get(t, t.__name__) for t in expected)
        raise ModelFolderError(f"{path}: field '{field}': expected {wanted}, got {json.dumps(value, ensure_ascii=False)[:80]}")


def read_run_record(folder) -> dict:
    """train_args.json of an adapter, prefix or run model folder, or {} where there is none (made elsewhere). The
    fields that the later scripts read must have their types: anything else is one line naming the file and field."""
    path = Path(folder) / RUN_RECORD
    if not path.is_file():
        return {}
    record = read_json(path)
    if not isinstance(record, dict):
        raise ModelFolderError(f"{path}: expected a JSON object (the record of a training run), got "
                               f"{json.dumps(record, ensure_ascii=False)[:80]}")
    for field, expected in RECORD_FIELDS.items():
        if field in record:
            check_json_type(path, field, record[field], expected)
    for field, expected in RECORD_CONFIG_FIELDS.items():
        if field in record.get("config", {}):
            check_json_type(path, f"config.{field}", record["config"][field], (expected, type(None)))
    return record


def settings_from_run(config, run_folder, keys):
    """Set each of `keys` that the command line did not give (config.given, see utils/config_utils.py) to the value
    the run recorded in its train_args.json, so that `--lora_path` (or a run's model folder) alone brings the run's
    base and lengths along. A recorded value must have the option's type. Returns {key: value} of what was taken."""
    trained = read_run_record(run_folder).get("config", {})
    given = config.given if isinstance(config, Config) else set(config)  # a plain dict: every key was chosen
    taken = {}
    for key in keys:
        if key in given or key not in trained or trained[key] in ("", None) or trained[key] == config.get(key):
            continue
        if config.get(key) is not None:
            check_json_type(Path(run_folder) / RUN_RECORD, f"config.{key}", trained[key], type(config[key]))
        config[key] = taken[key] = trained[key]
    if "model_dir" in taken and not Path(taken["model_dir"]).is_dir():
        raise ModelFolderError(
            f"{run_folder} was trained on {taken['model_dir']} (model_dir in its train_args.json), which is not a folder "
            "here; pass the base with --model_dir"
        )
    return taken


def uses_adapter(lora_path):
    return bool(lora_path) and str(lora_path).lower() != "none"


def is_run_model_folder(path):
    """A model folder written by a freeze or full run (config.json and the run's train_args.json): a run of its own."""
    return (bool(path) and (Path(path) / "config.json").is_file() and (Path(path) / RUN_RECORD).is_file()
            and not is_run_checkpoint(path) and not holds_prefix_only(path))


def is_run_checkpoint(folder):
    """A checkpoint-N folder that a training run wrote (its completion marker, or the Trainer's state)."""
    return (Path(folder) / "checkpoint_complete.json").is_file() or (Path(folder) / "trainer_state.json").is_file()


def lora_path_kind(lora_path):
    """"adapter" (PEFT: adapter_config.json) or "prefix" (a P-tuning v2 checkpoint) for what --lora_path names;
    anything else is one line saying what the path is and where it goes instead."""
    check_folder(lora_path, "--lora_path")
    folder = Path(lora_path)
    if (folder / "adapter_config.json").is_file():
        return "adapter"
    if prefix_checkpoint_config(folder) is not None:
        return "prefix"
    if (folder / "config.json").is_file() and is_run_checkpoint(folder):
        raise ModelFolderError(
            f"--lora_path={lora_path}: a checkpoint of a freeze or full run (the trained tensors only), which no script "
            f"loads; its run's model folder ({folder.parent / 'model'}) goes in --model_dir, with --lora_path=none")
    if (folder / "config.json").is_file():
        raise ModelFolderError(f"--lora_path={lora_path}: a model folder (config.json without pre_seq_len), not an adapter; "
                               "pass it with --model_dir (and --lora_path=none)")
    what = "an empty folder" if not any(folder.iterdir()) else "no adapter_config.json (a LoRA adapter) nor a P-tuning checkpoint (config.json with pre_seq_len)"
    raise ModelFolderError(f"--lora_path={lora_path}: {what}. It takes <run>/adapter_model or <run>/prefix_model "
                           "(or a checkpoint-N of such a run); train one first (python train_trainer.py) or pass --lora_path=none.")


def newest_run(data_name, checkpoint_root="checkpoint"):
    """(the adapter or P-tuning prefix of the newest run of `data_name`, the model folder of a freeze or full run newer
    than it) in checkpoint/<data_name>/*/ by the time their files were written, each None where there is none."""
    root = Path(checkpoint_root, data_name)
    adapters = sorted([*root.glob(f"*/{ADAPTER_DIR}/adapter_config.json"), *root.glob(f"*/{PREFIX_DIR}/config.json")],
                      key=lambda p: p.stat().st_mtime)
    models = sorted(root.glob(f"*/model/{RUN_RECORD}"), key=lambda p: p.stat().st_mtime)
    adapter = adapters[-1] if adapters else None
    newer_model = models[-1].parent if models and (not adapter or models[-1].stat().st_mtime > adapter.stat().st_mtime) else None
    return (adapter.parent if adapter else None), newer_model


def choose_lora_path(config):
    """--lora_path as predict.py and chat_ner.py use it, said on one line when not given: "none" where --model_dir is
    a run's model folder (that run is what is used: no other run's adapter goes on it), else the newest adapter run of
    --data_name."""
    if config["lora_path"]:
        return config["lora_path"]
    if is_run_model_folder(config["model_dir"]):
        config["lora_path"] = "none"
        print(f"--lora_path=none: {config['model_dir']} is the model folder of a run (its train_args.json), used alone", flush=True)
        return "none"
    adapter, newer_model = newest_run(config["data_name"])
    newer = f"; a newer run's model folder, {newer_model}, goes in --model_dir" if newer_model else ""
    if adapter is None:
        raise ModelFolderError(
            f"--lora_path: no adapter run of {config['data_name']} yet (checkpoint/{config['data_name']}/*/{ADAPTER_DIR} or "
            f"{PREFIX_DIR}){newer}; train one first (python train_trainer.py --data_name={config['data_name']}) or pass "
            "--lora_path=none for the base alone")
    config["lora_path"] = adapter = str(adapter)
    written = time.strftime("%Y-%m-%d %H:%M", time.localtime(Path(adapter).stat().st_mtime))
    print(f"--lora_path: the newest run of {config['data_name']}: {adapter} (written {written}){newer}; "
          "--lora_path=none for the base alone", flush=True)
    return adapter


def scored_run(config):
    """The folder whose train_args.json describes what a script uses: --lora_path's adapter or prefix folder, or,
    without one, --model_dir where it is a run's model folder; None for a base model alone."""
    if uses_adapter(config["lora_path"]):
        return Path(config["lora_path"])
    return Path(config["model_dir"]) if is_run_model_folder(config["model_dir"]) else None


def results_folder(run_folder):
    """Where the results of scoring `run_folder` (an adapter, prefix or model folder) go: its run's folder; for a
    checkpoint-N, <run>/predict-checkpoint-N (a checkpoint folder itself may be rotated away, and the run folder holds
    the final adapter's results)."""
    run_folder = Path(run_folder)
    if CHECKPOINT_NAME.fullmatch(run_folder.name):
        return run_folder.parent / f"predict-{run_folder.name}"
    return run_folder.parent


def take_run_settings(config, keys=("model_dir",)):
    """For a script given --lora_path (or a run's model folder as --model_dir): the run's settings for `keys` that the
    command line left out (settings_from_run), said on one line. The path is checked first (lora_path_kind)."""
    if uses_adapter(config["lora_path"]):
        lora_path_kind(config["lora_path"])
    run_folder = scored_run(config)
    if run_folder is None:
        return {}
    taken = settings_from_run(config, run_folder, keys)
    if taken:
        print(f"from the run of {run_folder} (its train_args.json): " + " ".join(f"--{k}={v}" for k, v in taken.items()), flush=True)
    return taken


def holds_prefix_only(folder):
    """A P-tuning v2 checkpoint (the prefix encoder's tensors alone), not a model folder that carries its prefix."""
    if prefix_checkpoint_config(folder) is None:
        return False
    return all(name.startswith(PREFIX_KEY) for name in adapter_shapes(prefix_weights_file(folder)))


def check_model_dir(model_dir, option="--model_dir"):
    """`model_dir` is a model folder with a config.json, not a folder that goes elsewhere: an adapter or a P-tuning
    prefix (--lora_path), or a run's checkpoint-N (its run's model/ is the model folder)."""
    check_folder(model_dir, option)
    folder = Path(model_dir)
    if (folder / "adapter_config.json").is_file() or holds_prefix_only(folder):
        what = "a LoRA adapter" if (folder / "adapter_config.json").is_file() else "a P-tuning v2 prefix"
        raise ModelFolderError(f"{option}={model_dir}: {what}, not a model folder; it goes in --lora_path, with its base in {option}")
    if is_run_checkpoint(folder):
        raise ModelFolderError(f"{option}={model_dir}: a checkpoint of a run (a freeze run's holds the trained tensors only), "
                               f"not a model folder; its run's model folder, {folder.parent / 'model'}, goes in {option}")
    read_config(model_dir)


def check_run(config):
    """--model_dir is a model folder (check_model_dir) and --lora_path (unless none) an adapter or prefix made for it:
    checked before anything slow. Returns what check_lora_on_base does."""
    check_model_dir(config["model_dir"])
    return check_lora_on_base(config["lora_path"], config["model_dir"]) if uses_adapter(config["lora_path"]) else None


def load_run(config, keys=("model_dir",), fold=True):
    """Model + tokenizer for a script's --model_dir and --lora_path (and --dtype, --device): the run's settings for
    `keys` first (take_run_settings), the checks of check_run, then utils.model_utils.load_model_with_adapter. The
    one way the inference scripts load what they serve."""
    take_run_settings(config, keys)
    check_run(config)
    lora_path = config["lora_path"] if uses_adapter(config["lora_path"]) else None
    return load_model_with_adapter(config["model_dir"], lora_path, dtype=config["dtype"], device=config["device"], fold=fold)


def run_instruction(run_folder):
    """The instruction of the records the run was trained on (the first record of its train file), or None where the
    run or its train file is not known here."""
    from utils.data_io import iter_json_lines
    from utils.training_options import data_paths  # where the training scripts found the file (imports the training stack)

    trained = read_run_record(run_folder).get("config", {}) if run_folder else {}
    if not trained.get("data_name"):
        return None
    train_file = str(trained.get("train_file") or trained.get("train_data_path") or "").split(",")[0]
    train_file, _ = data_paths(trained["data_name"], train_file)
    if not train_file.is_file():
        return None
    for _, record in iter_json_lines(train_file):
        return record.get("instruct")
    return None


# --- Which model an adapter was made for. ChatGLM2-6B and ChatGLM3-6B have the same layers and shapes, so only what
# the adapter's files say tells them apart: the run record's model_version, and the base named in adapter_config.json
# (or, for a P-tuning checkpoint, in its config.json): that folder's config.json where it is here, else its name.
GLM4_MODEL_TYPES = ("glm", "glm4")
NAME_HINTS = (("chatglm3", "chatglm3-6b"), ("chatglm2", "chatglm2-6b"), ("chatglm-6b", "chatglm-6b"), ("chatglm_6b", "chatglm-6b"),
              ("glm-4", "GLM-4"), ("glm4", "GLM-4"))


def model_family(config, source="config.json"):
    """chatglm-6b / chatglm2-6b / chatglm3-6b for a ChatGLM config.json, GLM-4 for transformers' glm / glm4, else its
    model_type: what an adapter must have been made for."""
    model_type = config.get("model_type")
    if model_type in (None, "chatglm"):
        return detect_model_version(config, source)
    return "GLM-4" if model_type in GLM4_MODEL_TYPES else str(model_type)


def describe_base(config, source="config.json"):
    family = model_family(config, source)
    return f"{family} (model_type {config['model_type']!r})" if family == "GLM-4" else family


def family_from_name(name):
    """The model family a folder or hub name says (the last part of the path that names exactly one), or None."""
    for part in reversed(PurePath(str(name)).parts):
        found = {family for hint, family in NAME_HINTS if hint in part.lower()}
        if len(found) == 1:
            return found.pop()
        if found:
            return None  # names two: no guess
    return None


def family_of_base(name, where):
    """(family, where it is read) of a base named `name` by the field `where` (file and field): the folder's
    config.json where it is here, else what its name says; None where neither tells."""
    if not isinstance(name, str) or not name:
        return None
    if (Path(name) / "config.json").is_file():
        try:
            return model_family(read_config(name), str(Path(name) / "config.json")), f"{where}={name}, that folder's config.json"
        except ModelFolderError:
            pass
    family = family_from_name(name)
    return (family, f"{where}={name}, the name (no such model folder here)") if family else None


def trained_on(lora_path):
    """[(family, where that is read)] of the model the adapter or P-tuning checkpoint `lora_path` was made for: the run
    record's model_version (or its model_dir's config.json), and the base its own files name (adapter_config.json's
    base_model_name_or_path, a prefix config.json's _name_or_path): that folder's config.json, or where the folder is
    not here, its name; a name is read only where no file says. Empty where nothing says (an adapter made elsewhere)."""
    lora_path = Path(lora_path)
    record_path = lora_path / RUN_RECORD
    record = read_run_record(lora_path)
    found = []
    if record.get("model_version"):
        found.append((record["model_version"], f"{record_path} model_version"))
    elif (Path(record.get("config", {}).get("model_dir") or "") / "config.json").is_file():
        found += filter(None, [family_of_base(record["config"]["model_dir"], f"{record_path} config.model_dir")])
    if (lora_path / "adapter_config.json").is_file():
        named = read_adapter_config(lora_path).get("base_model_name_or_path")
        where = f"{lora_path / 'adapter_config.json'} base_model_name_or_path"
    else:
        own = read_config(lora_path)
        named, where = own.get("_name_or_path"), f"{lora_path / 'config.json'} _name_or_path"
        if not named and any(field in own for field in ("position_encoding_2d", "inner_hidden_size")):
            found.append(("chatglm-6b", f"{lora_path / 'config.json'}: the ChatGLM-6B fields"))
    base = family_of_base(named, where)
    if base and (not found or isinstance(named, str) and (Path(named) / "config.json").is_file()):
        found.append(base)
    return found


def check_trained_on_base(lora_path, model_dir, base_config, what):
    """Refuse `what` (the adapter / the P-tuning checkpoint) at lora_path when its files say it was made for another
    model than the base's, naming both and where the adapter's is read."""
    base = model_family(base_config, str(Path(model_dir) / "config.json"))
    for family, source in trained_on(lora_path):
        if family != base:
            verb = "was trained on" if what == "adapter" else "was made for"
            raise ModelFolderError(
                f"the {what} {lora_path} {verb} {family} (read from {source}) but the base {model_dir} is "
                f"{describe_base(base_config)}; pass its {family} base with --model_dir"
            )


def check_lora_on_base(lora_path, model_dir):
    """Everything that needs no weights, before the base loads: lora_path is an adapter or a P-tuning checkpoint
    (lora_path_kind), made for the base's model (trained_on) and fitting its layers and sizes. Returns the prefix's
    {"pre_seq_len", "prefix_projection"} for a P-tuning checkpoint, None for an adapter."""
    kind = lora_path_kind(lora_path)
    check_folder(model_dir, "--model_dir")
    base_config = read_config(model_dir)
    chatglm = base_config.get("model_type") in (None, "chatglm")
    check_trained_on_base(lora_path, model_dir, base_config, "adapter" if kind == "adapter" else "P-tuning checkpoint")
    if kind == "adapter":
        version = detect_model_version(base_config, str(Path(model_dir) / "config.json")) if chatglm else None
        check_adapter_fits_base(lora_path, model_dir, version, base_config)
        return None
    if not chatglm:
        raise ModelFolderError(f"{lora_path}: a P-tuning v2 checkpoint, which only the ChatGLM models take; {model_dir} is "
                               f"{describe_base(base_config)}")
    check_prefix_fits_base(lora_path, model_dir, detect_model_version(base_config, str(Path(model_dir) / "config.json")), base_config)
    return prefix_checkpoint_config(lora_path)


def adapter_weights_file(lora_path):
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (Path(lora_path) / name).is_file():
            return Path(lora_path) / name
    raise ModelFolderError(f"{lora_path}: no adapter_model.safetensors (or adapter_model.bin); is this a PEFT adapter folder?")


def adapter_shapes(weights_file):
    """Tensor name -> shape of the adapter, without reading the tensors."""
    try:
        if Path(weights_file).suffix == ".safetensors":
            with safe_open(str(weights_file), framework="pt") as handle:
                return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
        state = torch.load(str(weights_file), map_location="meta", weights_only=True)
    except Exception as err:  # safetensors' and pickle's errors for a cut-off or foreign file have no common base
        raise ModelFolderError(f"{weights_file}: cannot be read as a weights file ({str(err)[:200]})") from err
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def base_layer_shapes(version, base_config, model_dir):
    """Module name -> (out_features, in_features) of every linear / embedding layer of the base, built on the meta
    device from its config (no weights are read): our ChatGLM classes for a version, transformers' own otherwise."""
    with torch.device("meta"):
        if version is None:
            from transformers import AutoConfig, AutoModelForCausalLM

            config = AutoConfig.from_pretrained(str(model_dir))
            config.quantization_config = None  # a bitsandbytes folder's layers have the float layers' shapes
            model = AutoModelForCausalLM.from_config(config)
        else:
            # Built unquantized: a quantized folder's layers have the float layers' shapes.
            config = remote_module(version, "configuration_chatglm").ChatGLMConfig(
                **{k: v for k, v in base_config.items() if k != "quantization_bit"})
            model = remote_module(version, "modeling_chatglm").ChatGLMForConditionalGeneration(config)
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            shapes[name] = (module.out_features, module.in_features)
        elif isinstance(module, torch.nn.Embedding):
            shapes[name] = (module.num_embeddings, module.embedding_dim)
    return shapes


def check_adapter_fits_base(lora_path, model_dir, version, base_config):
    """Refuse an adapter whose target modules or layers the base lacks, or whose lora_A / lora_B shapes do not fit the
    base's layer sizes, naming both (version None: a model of transformers' own classes). Which model it was made
    for is check_trained_on_base's."""
    lora_path = Path(lora_path)
    adapter_config = read_adapter_config(lora_path)
    layers = base_layer_shapes(version, base_config, model_dir)
    name = version or describe_base(base_config)
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
            f"{model_dir} ({name}); the adapter was made for another model"
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
            f"the adapter {lora_path} does not fit the base {model_dir} ({name}); it was trained on another base:\n  "
            + "\n  ".join(problems[:5]) + more
        )


def check_prefix_fits_base(prefix_path, model_dir, version, base_config):
    """Refuse a P-tuning v2 checkpoint that holds other tensors than a prefix encoder (a whole model folder), or whose
    prefix encoder's shapes the base's layers, heads and widths do not give. Which model it was made for is
    check_trained_on_base's."""
    prefix_path = Path(prefix_path)
    shapes = adapter_shapes(prefix_weights_file(prefix_path))
    check_prefix_tensor_names(prefix_weights_file(prefix_path), shapes)
    config = remote_module(version, "configuration_chatglm").ChatGLMConfig(
        **{k: v for k, v in base_config.items() if k != "quantization_bit"}, **prefix_checkpoint_config(prefix_path))
    with torch.device("meta"):
        encoder = remote_module(version, "modeling_chatglm").PrefixEncoder(config)
    expected = {PREFIX_KEY + name: tuple(t.shape) for name, t in encoder.state_dict().items()}
    found = {name: shape for name, shape in shapes.items() if name.startswith(PREFIX_KEY)}
    if found != expected:
        raise ModelFolderError(
            f"the P-tuning checkpoint {prefix_path} does not fit the base {model_dir} ({version}): its prefix encoder is "
            f"{found}, the base's layers and heads give {expected}; it was made for another base"
        )
