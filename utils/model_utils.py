"""Load a ChatGLM model folder with this toolkit's own model/tokenizer code.

Official model folders ship `.py` files that no longer run on transformers 5.x, so we never execute them: the version
is read from config.json and the classes come from `remote_scripts/<version>/`.
"""
import contextlib
import errno
import importlib.util
import json
import os
import stat
import sys
from pathlib import Path
from types import MethodType

import torch

from utils import decode_engine
from utils.errors import UserError
from utils.log_filters import missing_keys_expected

REPO_ROOT = Path(__file__).resolve().parents[1]
REMOTE_SCRIPTS = REPO_ROOT / "remote_scripts"
VERSIONS = ("chatglm-6b", "chatglm2-6b", "chatglm3-6b")
TOKENIZER_FILES = {"chatglm-6b": "ice_text.model", "chatglm2-6b": "tokenizer.model", "chatglm3-6b": "tokenizer.model"}
WEIGHT_PATTERNS = ("model.safetensors", "model-*.safetensors", "pytorch_model.bin", "pytorch_model-*.bin")
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


class ModelFolderError(UserError, ValueError):
    """A model folder is missing a file or its files disagree; the message names the file and the fix."""


def check_folder(path, option=None):
    """`path` (given by `option`, e.g. --model_dir) is a folder: otherwise one line saying what it is instead (missing,
    a file, a symbolic link that loops or points nowhere, unreadable)."""
    path = Path(path)
    name = f"{option}={path}" if option else str(path)
    try:
        mode = path.stat().st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ModelFolderError(f"{name}: a symbolic link that loops (it leads back to itself)") from err
        if err.errno == errno.EACCES:
            raise ModelFolderError(f"{name}: cannot be read (permission denied)") from err
        if path.is_symlink():
            raise ModelFolderError(f"{name}: a symbolic link to {os.readlink(path)}, which does not exist") from err
        raise ModelFolderError(f"{name}: no such folder") from err
    if not stat.S_ISDIR(mode):
        what = "a file" if stat.S_ISREG(mode) else "a pipe, socket or device"
        raise ModelFolderError(f"{name}: {what}, not a folder")


def read_config(model_dir) -> dict:
    config_path = Path(model_dir) / "config.json"
    check_folder(model_dir)
    if not config_path.is_file():
        raise ModelFolderError(
            f"{config_path}: not found. A model folder needs the config.json of its checkpoint "
            "(e.g. from THUDM/chatglm2-6b) next to the weights."
        )
    try:
        return json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelFolderError(f"{config_path}: line {err.lineno}: not valid JSON ({err.msg})") from err


def detect_model_version(config: dict, source="config.json") -> str:
    """Which of ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B a config.json describes.

    v1 has GLM-specific fields; v2 and v3 share the network and differ only in their name (the long-context variants
    share seq_length with v2, so the name is what counts; seq_length 8192 is the fallback hint for v3)."""
    if config.get("model_type") not in (None, "chatglm"):
        raise ModelFolderError(
            f"{source}: model_type is {config.get('model_type')!r}, which is neither ChatGLM (model_type 'chatglm') "
            "nor a model type that this transformers version knows."
        )
    v1_fields = ("position_encoding_2d", "inner_hidden_size", "gmask_token_id", "max_sequence_length")
    if any(field in config for field in v1_fields):
        return "chatglm-6b"
    v2_fields = ("padded_vocab_size", "multi_query_attention", "kv_channels", "rmsnorm")
    if all(field in config for field in v2_fields):
        name = str(config.get("_name_or_path", "")).lower()
        if "chatglm3" in name:
            return "chatglm3-6b"
        if "chatglm2" in name:
            return "chatglm2-6b"
        return "chatglm3-6b" if config.get("seq_length") == 8192 else "chatglm2-6b"
    raise ModelFolderError(
        f"{source}: cannot tell the ChatGLM version: expected either the ChatGLM-6B fields {v1_fields} or all of the "
        f"ChatGLM2/3 fields {v2_fields}. Use the config.json that came with the checkpoint."
    )


def remote_module(version: str, name: str):
    """`remote_scripts/<version>/<name>.py` imported as a submodule of its folder (the files use relative imports)."""
    if version not in VERSIONS:
        raise ValueError(f"unknown ChatGLM version {version!r}; expected one of {VERSIONS}")
    package = "chatglm_remote_" + version.replace("-", "_")
    if package not in sys.modules:
        folder = REMOTE_SCRIPTS / version
        spec = importlib.util.spec_from_file_location(package, folder / "__init__.py", submodule_search_locations=[str(folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[package] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{package}.{name}")


def find_weight_files(model_dir) -> list:
    model_dir = Path(model_dir)
    for pattern in WEIGHT_PATTERNS:
        found = sorted(model_dir.glob(pattern))
        if found:
            return found
    raise ModelFolderError(
        f"{model_dir}: no weights found. Put the checkpoint's model.safetensors (or model-*-of-*.safetensors with "
        "model.safetensors.index.json, or pytorch_model*.bin with its index) into this folder."
    )


def resolve_dtype(dtype, device: str):
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if str(device).startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def load_tokenizer(model_dir, version=None):
    model_dir = Path(model_dir)
    version = version or detect_model_version(read_config(model_dir), str(model_dir / "config.json"))
    vocab_file = model_dir / TOKENIZER_FILES[version]
    if not vocab_file.is_file():
        raise ModelFolderError(
            f"{vocab_file}: not found. {version} needs its sentencepiece file {TOKENIZER_FILES[version]} "
            "(from the official checkpoint) in the model folder."
        )
    return remote_module(version, "tokenization_chatglm").ChatGLMTokenizer.from_pretrained(str(model_dir))


def device_map(device, quantization_config):
    """from_pretrained's device_map for one device. The CPU is named only for a quantized model: transformers puts a
    bitsandbytes model without a device_map on the GPU whenever there is one."""
    if device != "cpu":
        return device
    return {"": "cpu"} if quantization_config is not None else None


def load_native_model_and_tokenizer(model_dir, dtype, device, quantization_config=None):
    """A model that transformers supports itself (e.g. GLM-4, Llama): AutoModelForCausalLM + AutoTokenizer.
    Its prompts come from the tokenizer's chat template (model_version None)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, device_map=device_map(device, quantization_config), quantization_config=quantization_config
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad id; padding is masked out anyway
    model.model_version = None
    return model.eval(), tokenizer


def load_model_and_tokenizer(model_dir, dtype="auto", device="auto", version=None, quantization_config=None, **model_kwargs):
    """Model + tokenizer from an official-layout folder, built with our remote_scripts for its version; other
    model types that transformers knows load through its Auto classes.

    dtype: auto (bf16/fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16. device: auto, cpu, cuda, cuda:N.
    quantization_config: e.g. a transformers BitsAndBytesConfig (QLoRA). Extra keyword arguments go to the
    config (e.g. pre_seq_len=128 for P-tuning v2)."""
    model_dir = Path(model_dir)
    config_dict = read_config(model_dir)
    if version is None and config_dict.get("model_type") not in (None, "chatglm"):
        from transformers import CONFIG_MAPPING

        if config_dict["model_type"] in CONFIG_MAPPING:
            device = resolve_device(device)
            return load_native_model_and_tokenizer(model_dir, resolve_dtype(dtype, device), device, quantization_config)
    version = version or detect_model_version(config_dict, str(model_dir / "config.json"))
    find_weight_files(model_dir)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    tokenizer = load_tokenizer(model_dir, version)
    config = remote_module(version, "configuration_chatglm").ChatGLMConfig.from_pretrained(str(model_dir), **model_kwargs)
    if len(tokenizer) > config.vocab_size:
        raise ModelFolderError(
            f"{model_dir / TOKENIZER_FILES[version]}: the tokenizer has {len(tokenizer)} tokens but config.json's "
            f"vocab_size/padded_vocab_size is {config.vocab_size}; tokenizer and weights come from different models."
        )
    model_class = remote_module(version, "modeling_chatglm").ChatGLMForConditionalGeneration
    # A prefix asked for here is trained, or loaded from its checkpoint, right after: its keys missing from the
    # base's weights are no news (transformers' load report would say "Consider training").
    expected = missing_keys_expected(PREFIX_KEY) if model_kwargs.get("pre_seq_len") else contextlib.nullcontext()
    with expected:
        model = model_class.from_pretrained(
            str(model_dir), config=config, dtype=dtype, device_map=device_map(device, quantization_config),
            quantization_config=quantization_config,
        )
    model.model_version = version
    model.stream_generate = MethodType(decode_engine.stream_generate, model)  # chat() and stream_chat() too
    return model.eval(), tokenizer


def load_model_with_adapter(model_dir, lora_path=None, dtype="auto", device="auto", fold=True):
    """Model + tokenizer for inference: the folder alone when lora_path is empty or "none" (a base model, or a merged
    or merged-and-quantized folder of merge_lora_and_quantize.py), else the base with what lora_path holds on top:
    - a PEFT adapter (adapter_config.json), folded into the weights (fold_adapter) unless fold=False (a PeftModel
      then: predict.py's --before_after scores the base with the adapter disabled first);
    - a P-tuning v2 checkpoint (ours, or the official ptuning/ scripts' output): the base built with its prefix
      length and its prefix encoder's weights (load_prefix_checkpoint).
    A missing adapter, a folder that is no adapter, or one trained on another base (utils.adapters.check_lora_on_base)
    is reported before the base is loaded."""
    use_adapter = bool(lora_path) and str(lora_path).lower() != "none"
    prefix = None
    if use_adapter:
        from utils.adapters import check_lora_on_base

        prefix = check_lora_on_base(lora_path, model_dir)
    model, tokenizer = load_model_and_tokenizer(model_dir, dtype=dtype, device=device, **(prefix or {}))
    if prefix is not None:
        load_prefix_checkpoint(model, lora_path)
    elif use_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(lora_path)).eval()
        if fold:
            model = fold_adapter(model)
    return model, tokenizer


# --- P-tuning v2 checkpoints: the prefix encoder's weights under the official names, and a config.json carrying
# pre_seq_len / prefix_projection (what THUDM's ptuning/ scripts save and load, also in our safetensors form).
PREFIX_KEY = "transformer.prefix_encoder."
PREFIX_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def prefix_weights_file(path):
    """The weights file of a P-tuning checkpoint folder (ours: model.safetensors; the official: pytorch_model.bin),
    or None."""
    return next((Path(path) / name for name in PREFIX_WEIGHT_FILES if (Path(path) / name).is_file()), None)


def prefix_checkpoint_config(path):
    """{"pre_seq_len", "prefix_projection"} of a P-tuning v2 checkpoint folder, or None for any other folder (one
    without a config.json that sets pre_seq_len, or without a weights file)."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file() or prefix_weights_file(path) is None:
        return None
    config = read_config(path)
    if not config.get("pre_seq_len"):
        return None
    return {"pre_seq_len": int(config["pre_seq_len"]), "prefix_projection": bool(config.get("prefix_projection", False))}


def check_prefix_tensor_names(file, names):
    """A P-tuning checkpoint's weights file holds the prefix encoder's tensors and nothing else (a folder holding a
    whole model, a merged one too, is no prefix to put on a base)."""
    others = sorted(name for name in names if not name.startswith(PREFIX_KEY))
    if others or not names:
        raise ModelFolderError(
            f"{file}: expected only the prefix encoder's weights ({PREFIX_KEY}*) of a P-tuning v2 checkpoint, "
            f"found {others[:3] or 'nothing'}{' ...' if len(others) > 3 else ''}; a whole model folder goes in --model_dir"
            " (with --lora_path=none)"
        )


def read_prefix_weights(path) -> dict:
    """The prefix encoder's tensors of a P-tuning checkpoint, under the names the encoder itself uses (embedding.weight,
    trans.0.weight, ...). A legacy .bin is read with weights_only=True. Other tensors in the file are an error: a
    folder holding a whole model is not a P-tuning checkpoint to put on a base."""
    file = prefix_weights_file(path)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(file))
    else:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    check_prefix_tensor_names(file, state)
    return {name[len(PREFIX_KEY):]: tensor for name, tensor in state.items()}


def load_prefix_checkpoint(model, path):
    """Put the prefix encoder of the P-tuning checkpoint `path` into `model` (built with its pre_seq_len and
    prefix_projection), kept in fp32 as it was trained. Names and shapes must match exactly."""
    encoder = model.transformer.prefix_encoder
    state = read_prefix_weights(path)
    expected = {name: tuple(tensor.shape) for name, tensor in encoder.state_dict().items()}
    found = {name: tuple(tensor.shape) for name, tensor in state.items()}
    if found != expected:
        raise ModelFolderError(f"{path}: prefix encoder tensors {found} do not fit the model's {expected}")
    encoder.float()
    with torch.no_grad():
        for name, tensor in encoder.state_dict().items():
            tensor.copy_(state[name])
    return model


@contextlib.contextmanager
def adapter_disabled(model):
    """The base model's behaviour inside the block: a PeftModel's adapter disabled, or a P-tuning model's prefix
    switched off (prefix length 0 while inside)."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
        return
    transformer = model.transformer
    pre_seq_len = transformer.pre_seq_len
    transformer.pre_seq_len = 0
    try:
        yield
    finally:
        transformer.pre_seq_len = pre_seq_len


def fold_adapter(model):
    """The base model of a PeftModel with its LoRA weights added into the base weights (W + scale * B A, computed in
    the adapter's fp32 and rounded once to the weights' dtype) and the PEFT layers removed: generation then runs at
    the base model's speed (PEFT's extra matmuls and Python per layer cost several times the base's decode step).
    The base weights are changed in place. A base whose weights are quantized (int8/int4 folders) keeps the adapter
    as PEFT layers: adding the adapter to quantized weights would round it away. A model that is no PeftModel (a
    P-tuning prefix has nothing to fold) is returned as it is."""
    if not hasattr(model, "merge_and_unload"):
        return model
    quantized = [name for name, p in model.named_parameters() if not p.is_floating_point()]
    if quantized:
        print(f"adapter kept as separate layers: the base weights are quantized ({quantized[0]}, ...)")
        return model
    return model.merge_and_unload()
