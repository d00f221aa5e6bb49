"""The hand-off from training to every later script: what a script takes on top of its --model_dir (--lora_path:
<run>/adapter_model or <run>/prefix_model; or --model_dir itself where it is a run's model/) is read once into a
TrainedPath, which the run's settings, the checks before the base loads, loading, folding and merging use."""
import contextlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import torch
from safetensors import safe_open

from utils.config_utils import Config
from utils.data_io import iter_json_lines
from utils.model_loading import (PREFIX_KEY, QUANTIZATION_KEYS, ModelFolderError, chatglm_version, check_folder,
                                 load_model_and_tokenizer, read_config, read_json, remote_module)
from utils.run_dirs import COMPLETE_MARKER
from utils.run_record import RUN_RECORD, check_json_type, read_run_record

ADAPTER_DIR = "adapter_model"
PREFIX_DIR = "prefix_model"  # what --method=ptuning writes
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # ours; the official ptuning/ scripts'
LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>A|B|embedding_A|embedding_B)(\.[^.]+)?(\.weight)?$")


@dataclass(frozen=True)
class TrainedPath:
    """kind: "adapter" (PEFT LoRA), "prefix" (P-tuning v2), "model" (a run's model folder as --model_dir) or "none"."""
    kind: str
    path: Path = None
    record: dict = field(default_factory=dict)  # train_args.json; {} for what was made elsewhere
    own_config: dict = field(default_factory=dict)  # adapter_config.json (adapter), config.json (prefix)
    weights: Path = None  # adapter_model.* or the prefix's weights file, where there is one

    @property
    def prefix(self):
        """{"pre_seq_len", "prefix_projection"} that the base is built with for a prefix, else {}."""
        if self.kind != "prefix":
            return {}
        return {"pre_seq_len": int(self.own_config["pre_seq_len"]),
                "prefix_projection": bool(self.own_config.get("prefix_projection"))}

    def base(self):
        name, where = self.record.get("config", {}).get("model_dir"), f"model_dir in its {RUN_RECORD}"
        if not name and self.kind == "adapter":
            name = self.own_config.get("base_model_name_or_path")
            where = "base_model_name_or_path in its adapter_config.json"
        if name and not Path(name).is_dir():
            raise ModelFolderError(f"{self.path} was made on {name} ({where}), which is not a folder here; pass the base "
                                   "with --model_dir")
        return name or None


def uses_adapter(lora_path):
    return bool(lora_path) and str(lora_path).lower() != "none"


def first_file(folder, names):
    return next((Path(folder) / name for name in names if (Path(folder) / name).is_file()), None)


def prefix_checkpoint_config(folder):
    """config.json of a P-tuning v2 checkpoint (it sets pre_seq_len, beside a weights file), else None."""
    if not (Path(folder) / "config.json").is_file() or first_file(folder, PREFIX_WEIGHT_FILES) is None:
        return None
    config = read_config(folder)
    return config if config.get("pre_seq_len") else None


def is_run_checkpoint(folder):
    return (Path(folder) / COMPLETE_MARKER).is_file() or (Path(folder) / "trainer_state.json").is_file()


def holds_prefix_only(folder):
    """A P-tuning v2 checkpoint (the prefix encoder's tensors alone), not a model folder that carries its prefix."""
    if prefix_checkpoint_config(folder) is None:
        return False
    shapes = read_weights(first_file(folder, PREFIX_WEIGHT_FILES), shapes_only=True)
    return all(name.startswith(PREFIX_KEY) for name in shapes)


def is_run_model_folder(path):
    """A model folder written by a freeze or full run: a run of its own."""
    return (bool(path) and (Path(path) / "config.json").is_file() and (Path(path) / RUN_RECORD).is_file()
            and not is_run_checkpoint(path) and not holds_prefix_only(path))


def read_lora_path(lora_path):
    """The adapter or P-tuning checkpoint that --lora_path names; anything else is one line saying where it goes."""
    check_folder(lora_path, "--lora_path")
    folder = Path(lora_path)
    if (folder / "adapter_config.json").is_file():
        settings = read_json(folder / "adapter_config.json")
        check_json_type(folder / "adapter_config.json", None, settings, dict, "a JSON object (PEFT settings)")
        return TrainedPath("adapter", folder, read_run_record(folder), settings, first_file(folder, ADAPTER_WEIGHT_FILES))
    if (settings := prefix_checkpoint_config(folder)) is not None:
        return TrainedPath("prefix", folder, read_run_record(folder), settings, first_file(folder, PREFIX_WEIGHT_FILES))
    if (folder / "config.json").is_file() and is_run_checkpoint(folder):
        raise ModelFolderError(
            f"--lora_path={lora_path}: a checkpoint of a freeze or full run (the trained tensors only), which no script "
            f"loads; its run's model folder ({folder.parent / 'model'}) goes in --model_dir, with --lora_path=none")
    if (folder / "config.json").is_file():
        raise ModelFolderError(f"--lora_path={lora_path}: a model folder (config.json without pre_seq_len), not an adapter; "
                               "pass it with --model_dir (and --lora_path=none)")
    what = "an empty folder" if not any(folder.iterdir()) else ("no adapter_config.json (a LoRA adapter) nor a P-tuning "
                                                                "checkpoint (config.json with pre_seq_len)")
    raise ModelFolderError(f"--lora_path={lora_path}: {what}. It takes <run>/adapter_model or <run>/prefix_model (or a "
                           "checkpoint-N of such a run); train one first (python train_trainer.py) or pass --lora_path=none.")


def read_trained_path(lora_path, model_dir=None):
    """The one reader of what a script uses: --lora_path unless empty or none, else --model_dir where it is a run's."""
    if uses_adapter(lora_path):
        return read_lora_path(lora_path)
    if is_run_model_folder(model_dir):
        return TrainedPath("model", Path(model_dir), read_run_record(model_dir))
    return TrainedPath("none")


# --- Choosing the run and taking its settings.

def newest_run(data_name, checkpoint_root="checkpoint"):
    """(the newest adapter or prefix run of `data_name`, a newer freeze or full run's model folder), None for none."""
    root = Path(checkpoint_root, data_name)
    adapters = sorted([*root.glob(f"*/{ADAPTER_DIR}/adapter_config.json"), *root.glob(f"*/{PREFIX_DIR}/config.json")],
                      key=lambda p: p.stat().st_mtime)
    models = sorted(root.glob(f"*/model/{RUN_RECORD}"), key=lambda p: p.stat().st_mtime)
    adapter = adapters[-1] if adapters else None
    newer_model = models[-1].parent if models and (not adapter or models[-1].stat().st_mtime > adapter.stat().st_mtime) else None
    return (adapter.parent if adapter else None), newer_model


def choose_lora_path(config):
    """--lora_path; when not given (said on one line): none on a run's model folder, else --data_name's newest run."""
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


# The run record's names of options that the generating scripts call otherwise.
RECORDED_AS = {"max_input_tokens": "max_source_length"}


def take_run_settings(config, keys=("model_dir",)):
    """The config's TrainedPath; its run's values (of the option's type) set, and said, for the `keys` not given."""
    trained = read_trained_path(config["lora_path"], config["model_dir"])
    if trained.kind == "none":
        return trained
    recorded = {**trained.record.get("config", {}), "model_dir": None}
    given = config.given if isinstance(config, Config) else set(config)  # a plain dict: every key was chosen
    taken = {}
    for key in (k for k in keys if k not in given):
        value = trained.base() if key == "model_dir" and trained.kind != "model" else recorded.get(RECORDED_AS.get(key, key))
        if value in ("", None) or value == config.get(key):
            continue
        if config.get(key) is not None:
            check_json_type(trained.path / RUN_RECORD, f"config.{key}", value, type(config[key]))
        config[key] = taken[key] = value
    if taken:
        print(f"from the run of {trained.path}: " + " ".join(f"--{k}={v}" for k, v in taken.items()), flush=True)
    return trained


def run_instruction(record):
    """The instruction of the first record a run (its record) trained on, or None where its train file is not here."""
    trained = record.get("config", {})
    if not trained.get("data_name"):
        return None
    train_file = str(trained.get("train_file") or trained.get("train_data_path") or "").split(",")[0]
    train_file = Path(train_file or Path("data", trained["data_name"], "instruct_data", "train.txt"))
    for _, record in iter_json_lines(train_file) if train_file.is_file() else ():
        return record.get("instruct")
    return None


# --- Which model an adapter was made for. ChatGLM2-6B and ChatGLM3-6B have the same layers, so only the adapter's files
# tell them apart: the run record's model_version, and the base its own config names (that folder's config, else name).
GLM4_MODEL_TYPES = ("glm", "glm4")
NAME_HINTS = (("chatglm3", "chatglm3-6b"), ("chatglm2", "chatglm2-6b"), ("chatglm-6b", "chatglm-6b"), ("chatglm_6b", "chatglm-6b"),
              ("glm-4", "GLM-4"), ("glm4", "GLM-4"))


def model_family(config, source="config.json"):
    """chatglm-6b / chatglm2-6b / chatglm3-6b, GLM-4 for transformers' glm / glm4, else the model_type."""
    version = chatglm_version(config, source)
    return version or ("GLM-4" if config["model_type"] in GLM4_MODEL_TYPES else str(config["model_type"]))


def describe_base(config, source="config.json"):
    family = model_family(config, source)
    return f"{family} (model_type {config['model_type']!r})" if family == "GLM-4" else family


def family_from_name(name):
    """The model family a folder or hub name says (the last part of the path that names exactly one), or None."""
    for part in reversed(PurePath(str(name)).parts):
        found = {family for hint, family in NAME_HINTS if hint in part.lower()}
        if found:
            return found.pop() if len(found) == 1 else None  # names two: no guess
    return None


def family_of_base(name, where):
    """(family, where it is read) of the base `name` (named by `where`) from its config.json, else its name; or None."""
    if not isinstance(name, str) or not name:
        return None
    with contextlib.suppress(ModelFolderError):  # a config.json that does not tell: the name may
        if (Path(name) / "config.json").is_file():
            return model_family(read_config(name), str(Path(name) / "config.json")), f"{where}={name}, that folder's config.json"
    family = family_from_name(name)
    return (family, f"{where}={name}, the name (no such model folder here)") if family else None


def trained_on(trained):
    """[(family, where that is read)] of the model an adapter or prefix was made for (by name where no file says)."""
    record_path = trained.path / RUN_RECORD
    found = []
    if trained.record.get("model_version"):
        found.append((trained.record["model_version"], f"{record_path} model_version"))
    elif (Path(trained.record.get("config", {}).get("model_dir") or "") / "config.json").is_file():
        found += filter(None, [family_of_base(trained.record["config"]["model_dir"], f"{record_path} config.model_dir")])
    file, key = ("adapter_config.json", "base_model_name_or_path")
    if trained.kind != "adapter":
        file, key = "config.json", "_name_or_path"  # a P-tuning checkpoint's
    named = trained.own_config.get(key)
    if not named and any(field in trained.own_config for field in ("position_encoding_2d", "inner_hidden_size")):
        found.append(("chatglm-6b", f"{trained.path / file}: the ChatGLM-6B fields"))  # a v1 prefix's config.json
    base = family_of_base(named, f"{trained.path / file} {key}")
    if base and (not found or isinstance(named, str) and (Path(named) / "config.json").is_file()):
        found.append(base)
    return found


def check_trained_on_base(trained, model_dir, base_config):
    """Refuse an adapter or P-tuning checkpoint whose files say it was made for another model than the base's."""
    base = model_family(base_config, str(Path(model_dir) / "config.json"))
    what, verb = ("adapter", "was trained on") if trained.kind == "adapter" else ("P-tuning checkpoint", "was made for")
    for family, source in trained_on(trained):
        if family != base:
            raise ModelFolderError(
                f"the {what} {trained.path} {verb} {family} (read from {source}) but the base {model_dir} is "
                f"{describe_base(base_config)}; pass its {family} base with --model_dir")


def check_lora_on_base(trained, model_dir):
    """Before the base loads: `model_dir` is a model folder, and an adapter or prefix was made for it and fits it."""
    base_config = check_model_dir(model_dir)
    if trained.kind in ("adapter", "prefix"):
        check_trained_on_base(trained, model_dir, base_config)
        fits = check_adapter_fits_base if trained.kind == "adapter" else check_prefix_fits_base
        fits(trained, model_dir, chatglm_version(base_config, str(Path(model_dir) / "config.json")), base_config)


def read_weights(file, shapes_only=False):
    """Tensor name -> tensor (a legacy .bin read weights_only), or -> shape, no tensor read."""
    try:
        if Path(file).suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                return {name: tuple(handle.get_slice(name).get_shape()) if shapes_only else handle.get_tensor(name)
                        for name in handle.keys()}
        state = torch.load(str(file), map_location="meta" if shapes_only else "cpu", weights_only=True)
    except Exception as err:  # safetensors' and pickle's errors for a cut-off or foreign file have no common base
        raise ModelFolderError(f"{file}: cannot be read as a weights file ({str(err)[:200]})") from err
    return {name: tuple(tensor.shape) for name, tensor in state.items()} if shapes_only else state


def meta_model(version, base_config, model_dir, part="ChatGLMForConditionalGeneration", **settings):
    """The base (or its `part`), unquantized, on the meta device; `settings` (a prefix's) go to the config."""
    with torch.device("meta"):
        if version is not None:
            config = remote_module(version, "configuration_chatglm").ChatGLMConfig(
                **{k: v for k, v in base_config.items() if k not in QUANTIZATION_KEYS}, **settings)
            return getattr(remote_module(version, "modeling_chatglm"), part)(config)
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(str(model_dir))
        config.quantization_config = None
        return AutoModelForCausalLM.from_config(config)


def base_layer_shapes(version, base_config, model_dir):
    """Module name -> weight shape (out_features, in_features) of every linear / embedding layer of the base."""
    modules = meta_model(version, base_config, model_dir).named_modules()
    return {name: tuple(m.weight.shape) for name, m in modules if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}


def check_adapter_fits_base(trained, model_dir, version, base_config):
    """Refuse an adapter whose target modules or layers the base lacks, or whose lora_A / lora_B do not fit them."""
    layers = base_layer_shapes(version, base_config, model_dir)
    name = version or describe_base(base_config)
    targets = trained.own_config.get("target_modules") or []
    if isinstance(targets, str):
        found, targets_text = any(re.fullmatch(targets, layer) for layer in layers), f"target_modules regex {targets!r}"
    else:
        found = all(any(layer == t or layer.endswith("." + t) for layer in layers) for t in targets)
        targets_text = f"target_modules {sorted(targets)}"
    if targets and not found:
        raise ModelFolderError(f"the adapter {trained.path}: adapter_config.json {targets_text} does not match the layers "
                               f"of the base {model_dir} ({name}); the adapter was made for another model")
    if trained.weights is None:
        raise ModelFolderError(f"{trained.path}: no adapter_model.safetensors (or adapter_model.bin); is this a PEFT "
                               "adapter folder?")
    problems = []
    for key, shape in read_weights(trained.weights, shapes_only=True).items():
        match = LORA_KEY.match(key)
        module, part = (match.group("module"), match.group("part")) if match else (None, None)
        if match and module not in layers:
            problems.append(f"{module}: the base has no such layer")
        elif part in ("A", "B"):
            out_features, in_features = layers[module]
            base_layer = f"the base layer is [{out_features}, {in_features}]"
            if part == "A" and shape[-1] != in_features:
                problems.append(f"{module}: lora_A {list(shape)} expects {shape[-1]} inputs, {base_layer}")
            elif part == "B" and shape[0] != out_features:
                problems.append(f"{module}: lora_B {list(shape)} gives {shape[0]} outputs, {base_layer}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ModelFolderError(f"the adapter {trained.path} does not fit the base {model_dir} ({name}); it was trained on "
                               "another base:\n  " + "\n  ".join(problems[:5]) + more)


def check_prefix_fits_base(trained, model_dir, version, base_config):
    """Refuse a P-tuning checkpoint with other tensors than a prefix encoder, or whose shapes the base does not give."""
    if version is None:
        raise ModelFolderError(f"{trained.path}: a P-tuning v2 checkpoint, which only the ChatGLM models take; {model_dir} "
                               f"is {describe_base(base_config)}")
    shapes = read_weights(trained.weights, shapes_only=True)
    others = sorted(name for name in shapes if not name.startswith(PREFIX_KEY))  # a whole model is no prefix
    if others or not shapes:
        more = " ..." if len(others) > 3 else ""
        raise ModelFolderError(f"{trained.weights}: expected only the prefix encoder's weights ({PREFIX_KEY}*) of a "
                               f"P-tuning v2 checkpoint, found {others[:3] or 'nothing'}{more}; a whole model folder "
                               "goes in --model_dir (with --lora_path=none)")
    encoder = meta_model(version, base_config, model_dir, "PrefixEncoder", **trained.prefix)
    expected = {PREFIX_KEY + name: tuple(t.shape) for name, t in encoder.state_dict().items()}
    if shapes != expected:
        raise ModelFolderError(
            f"the P-tuning checkpoint {trained.path} does not fit the base {model_dir} ({version}): its prefix encoder is "
            f"{shapes}, the base's layers and heads give {expected}; it was made for another base")


def check_model_dir(model_dir, option="--model_dir"):
    """`model_dir` is a model folder, not an adapter or prefix (--lora_path) or a run's checkpoint-N (its model/ is)."""
    check_folder(model_dir, option)
    folder = Path(model_dir)
    if (folder / "adapter_config.json").is_file() or holds_prefix_only(folder):
        what = "a LoRA adapter" if (folder / "adapter_config.json").is_file() else "a P-tuning v2 prefix"
        raise ModelFolderError(f"{option}={model_dir}: {what}, not a model folder; it goes in --lora_path, with its base in {option}")
    if is_run_checkpoint(folder):
        raise ModelFolderError(f"{option}={model_dir}: a checkpoint of a run (a freeze run's holds the trained tensors only), "
                               f"not a model folder; its run's model folder, {folder.parent / 'model'}, goes in {option}")
    return read_config(model_dir)


# --- Loading onto the base.

def load_prefix_checkpoint(model, path):
    """The prefix encoder of the P-tuning checkpoint `path` put into `model` (built with its settings), in fp32; its
    tensor names were checked before the base loaded (check_lora_on_base)."""
    encoder, state = model.transformer.prefix_encoder, read_weights(first_file(path, PREFIX_WEIGHT_FILES))
    try:  # strict: every tensor of the encoder, each of its shape
        encoder.float().load_state_dict({name[len(PREFIX_KEY):]: tensor for name, tensor in state.items()})
    except RuntimeError as err:
        raise ModelFolderError(f"{path}: the prefix encoder's tensors do not fit the model's: {err}") from err
    return model


def fold_adapter(model):
    """A PeftModel's LoRA folded into its base weights (the base's speed); a quantized base keeps PEFT's layers."""
    if not hasattr(model, "merge_and_unload"):
        return model
    quantized = [name for name, p in model.named_parameters() if not p.is_floating_point()]
    if quantized:
        print(f"adapter kept as separate layers: the base weights are quantized ({quantized[0]}, ...)")
        return model
    return model.merge_and_unload()


def put_on_base(model, trained, fold=True):
    """`model` (built with trained.prefix) with `trained` on top; a LoRA adapter folded in unless fold=False."""
    if trained.kind == "prefix":
        return load_prefix_checkpoint(model, trained.path)
    if trained.kind != "adapter":
        return model
    from peft import PeftModel

    model = PeftModel.from_pretrained(model, str(trained.path)).eval()
    return fold_adapter(model) if fold else model


def load_trained(model_dir, trained, dtype="auto", device="auto", fold=True):
    model, tokenizer = load_model_and_tokenizer(model_dir, dtype=dtype, device=device, **trained.prefix)
    return put_on_base(model, trained, fold), tokenizer


def load_model_with_adapter(model_dir, lora_path=None, dtype="auto", device="auto", fold=True):
    """Model + tokenizer: the base with lora_path's adapter or prefix on top (checked first), or alone for none."""
    return load_run({"model_dir": model_dir, "lora_path": lora_path, "dtype": dtype, "device": device}, (), fold)


def load_run(config, keys=("model_dir",), fold=True, trained=None):
    """Model + tokenizer of a script's config, its run's settings for `keys` taken and checked first unless given."""
    if trained is None:
        trained = take_run_settings(config, keys)
        check_lora_on_base(trained, config["model_dir"])
    return load_trained(config["model_dir"], trained, config["dtype"], config["device"], fold)


@contextlib.contextmanager
def adapter_disabled(model):
    """The base model inside the block: a PeftModel's adapter disabled, or a P-tuning model's prefix length 0."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
        return
    pre_seq_len, model.transformer.pre_seq_len = model.transformer.pre_seq_len, 0
    try:
        yield
    finally:
        model.transformer.pre_seq_len = pre_seq_len
