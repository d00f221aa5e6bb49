"""Base models: read a model folder, tell its version and load it. Official ChatGLM folders ship `.py` files that no
longer run on transformers 5.x, so we never execute them: the classes come from `remote_scripts/<version>/`; model
types that transformers knows (GLM-4) load through its Auto classes. Adapters and prefixes are utils/adapters.py's."""
import contextlib
import errno
import json
import os
import pickle
import stat
import sys
import time
from pathlib import Path
from types import MethodType

import torch

from utils import decode_engine
from utils.errors import UserError
from utils.glm_layers import fuse_norms_and_mlps
from utils.log_filters import missing_keys_expected
from utils.remote_code import REMOTE_SCRIPTS, VERSIONS, remote_module  # noqa: F401 - also imported from here

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = {"chatglm-6b": "ice_text.model", "chatglm2-6b": "tokenizer.model", "chatglm3-6b": "tokenizer.model"}
# The weights of a folder as transformers reads them: the single file, else the shards its index names.
WEIGHT_FILES = (("model.safetensors", "model.safetensors.index.json"),
                ("pytorch_model.bin", "pytorch_model.bin.index.json"))
PREFIX_KEY = "transformer.prefix_encoder."  # the P-tuning v2 prefix encoder's weights, under the official names
# config.json's keys of ChatGLM's own quantization: the blocks' bits (official) and the output layer's (ours).
QUANTIZATION_KEYS = ("quantization_bit", "output_layer_quantization_bit")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class ModelFolderError(UserError, ValueError):
    """A model folder is missing a file or its files disagree; the message names the file and the fix."""


def check_folder(path, option=None):
    """`path` (given by `option`, e.g. --model_dir) is a folder, else one line saying what it is instead."""
    path = Path(path)
    name = f"{option}={path}" if option else str(path)
    try:
        mode = path.stat().st_mode
    except OSError as err:
        reason = {errno.ELOOP: "a symbolic link that loops (it leads back to itself)",
                  errno.EACCES: "cannot be read (permission denied)"}.get(err.errno)
        if reason is None:
            reason = f"a symbolic link to {os.readlink(path)}, which does not exist" if path.is_symlink() else "no such folder"
        raise ModelFolderError(f"{name}: {reason}") from err
    if not stat.S_ISDIR(mode):
        what = "a file" if stat.S_ISREG(mode) else "a pipe, socket or device"
        raise ModelFolderError(f"{name}: {what}, not a folder")


def read_json(path):
    """A JSON file of a model or run folder; a bad one is one line naming the file (and the line)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ModelFolderError(f"{path}: line {err.lineno}: not valid JSON ({err.msg})") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ModelFolderError(f"{path}: cannot be read ({err.strerror if isinstance(err, OSError) else err})") from err


def read_config(model_dir) -> dict:
    config_path = Path(model_dir) / "config.json"
    check_folder(model_dir)
    if not config_path.is_file():
        raise ModelFolderError(f"{config_path}: not found. A model folder needs the config.json of its checkpoint "
                               "(e.g. from THUDM/chatglm2-6b) next to the weights.")
    return read_json(config_path)


def detect_model_version(config: dict, source="config.json") -> str:
    """Which of ChatGLM-6B / 2 / 3 a config.json describes: v1 has GLM-specific fields; v2 and v3 share the network and
    differ in their name only (seq_length 8192 is the fallback hint for v3: the long-context variants share v2's)."""
    if config.get("model_type") not in (None, "chatglm"):
        raise ModelFolderError(f"{source}: model_type is {config.get('model_type')!r}, which is neither ChatGLM (model_type "
                               "'chatglm') nor a model type that this transformers version knows.")
    v1_fields = ("position_encoding_2d", "inner_hidden_size", "gmask_token_id", "max_sequence_length")
    if any(field in config for field in v1_fields):
        return "chatglm-6b"
    v2_fields = ("padded_vocab_size", "multi_query_attention", "kv_channels", "rmsnorm")
    if all(field in config for field in v2_fields):
        name = str(config.get("_name_or_path", "")).lower()
        if "chatglm3" in name or "chatglm2" not in name and config.get("seq_length") == 8192:
            return "chatglm3-6b"
        return "chatglm2-6b"
    raise ModelFolderError(
        f"{source}: cannot tell the ChatGLM version: expected either the ChatGLM-6B fields {v1_fields} or all of the "
        f"ChatGLM2/3 fields {v2_fields}. Use the config.json that came with the checkpoint.")


def chatglm_version(config, source="config.json"):
    """The ChatGLM version of a config.json, or None for a model of transformers' own classes (GLM-4...)."""
    return detect_model_version(config, source) if config.get("model_type") in (None, "chatglm") else None


def weight_files(model_dir):
    """The weight files of a model folder, safetensors before the legacy .bin."""
    model_dir = Path(model_dir)
    for single, index in WEIGHT_FILES:
        if (model_dir / single).is_file():
            return [model_dir / single]
        if (model_dir / index).is_file():
            return [model_dir / name for name in dict.fromkeys(read_json(model_dir / index)["weight_map"].values())]
    raise ModelFolderError(
        f"{model_dir}: no weights found. Put the checkpoint's model.safetensors (or model-*-of-*.safetensors with "
        "model.safetensors.index.json, or pytorch_model*.bin with its index) into this folder.")


def read_weights(model_dir, device, dtype):
    """The weights of a model folder read straight onto `device`, each file's float matrices cast there to `dtype` as
    it is read (a folder of another precision never needs the memory of both; from_pretrained casts the small rest to
    what the model keeps them in, e.g. the rotary inv_freq in fp32): safetensors, else the legacy .bin (weights_only,
    memory-mapped)."""
    from safetensors.torch import load_file

    state = {}
    for file in weight_files(model_dir):
        if file.suffix == ".safetensors":
            shard = load_file(str(file), device=str(device))
        else:
            try:
                shard = torch.load(file, map_location=device, weights_only=True, mmap=True)
            except pickle.UnpicklingError as err:
                raise ModelFolderError(f"{file}: holds more than tensors, which is not loaded ({err})") from err
        state.update({name: t.to(dtype) if t.is_floating_point() and t.dim() > 1 else t for name, t in shard.items()})
    return state


def from_folder(model_class, model_dir, config, dtype, device, quantization_config):
    """model_class's model of a folder, its load time logged. Without a bitsandbytes config the weights are read
    straight onto the device in `dtype` (read_weights) and from_pretrained takes them as they are, on a model built on
    the meta device (nothing is initialised that is then overwritten); a bitsandbytes base is quantized by transformers
    as it reads the files."""
    started = time.perf_counter()
    if quantization_config is None:
        model = model_class.from_pretrained(None, config=config, state_dict=read_weights(model_dir, device, dtype),
                                            dtype=dtype, device_map=device_map(device, None))
        model.name_or_path = model.config._name_or_path = str(model_dir)  # what from_pretrained of a folder sets
        if (Path(model_dir) / "generation_config.json").is_file():
            from transformers import GenerationConfig

            model.generation_config = GenerationConfig.from_pretrained(str(model_dir))
    else:
        model = model_class.from_pretrained(str(model_dir), config=config, dtype=dtype,
                                            quantization_config=quantization_config,
                                            device_map=device_map(device, quantization_config))
    print(f"{model_dir}: loaded onto {device} in {time.perf_counter() - started:.1f} s", flush=True)
    return model


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
        raise ModelFolderError(f"{vocab_file}: not found. {version} needs its sentencepiece file {vocab_file.name} (from the "
                               "official checkpoint) in the model folder.")
    return remote_module(version, "tokenization_chatglm").ChatGLMTokenizer.from_pretrained(str(model_dir))


def device_map(device, quantization_config):
    """from_pretrained's device_map. The CPU is named for a quantized model only: transformers puts a bitsandbytes
    model without one on the GPU whenever there is one."""
    if device != "cpu":
        return device
    return {"": "cpu"} if quantization_config is not None else None


def load_native_model_and_tokenizer(model_dir, dtype, device, quantization_config=None):
    """A model of transformers' own classes (GLM-4, Llama...); its prompts come from its chat template (version None)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    config = AutoConfig.from_pretrained(str(model_dir))
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    model = from_folder(model_class, model_dir, config, dtype, device, quantization_config)
    fuse_norms_and_mlps(model, remote_module("chatglm2-6b", "kernels"))  # GLM-4: our kernels where they apply
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # batching needs a pad id; padding is masked out anyway
    model.model_version = None
    return model.eval(), tokenizer


def load_model_and_tokenizer(model_dir, dtype="auto", device="auto", version=None, quantization_config=None, **model_kwargs):
    """Model + tokenizer of a model folder. dtype: auto (bf16/fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16; device:
    auto, cpu, cuda, cuda:N; quantization_config: e.g. a BitsAndBytesConfig (QLoRA); keyword arguments go to the
    config (e.g. pre_seq_len=128 for P-tuning v2)."""
    model_dir, device = Path(model_dir), resolve_device(device)
    config_dict = read_config(model_dir)
    dtype = resolve_dtype(dtype, device)
    if version is None and config_dict.get("model_type") not in (None, "chatglm"):
        from transformers import CONFIG_MAPPING

        if config_dict["model_type"] in CONFIG_MAPPING:
            return load_native_model_and_tokenizer(model_dir, dtype, device, quantization_config)
    version = version or detect_model_version(config_dict, str(model_dir / "config.json"))
    weight_files(model_dir)  # a folder without weights is told before the tokenizer loads
    tokenizer = load_tokenizer(model_dir, version)
    config = remote_module(version, "configuration_chatglm").ChatGLMConfig.from_pretrained(str(model_dir), **model_kwargs)
    if len(tokenizer) > config.vocab_size:
        raise ModelFolderError(
            f"{model_dir / TOKENIZER_FILES[version]}: the tokenizer has {len(tokenizer)} tokens but config.json's "
            f"vocab_size/padded_vocab_size is {config.vocab_size}; tokenizer and weights come from different models.")
    model_class = remote_module(version, "modeling_chatglm").ChatGLMForConditionalGeneration
    # A prefix asked for here is trained, or loaded from its checkpoint, right after: its keys missing from the
    # base's weights are no news (transformers' load report would say "Consider training").
    with missing_keys_expected(PREFIX_KEY) if model_kwargs.get("pre_seq_len") else contextlib.nullcontext():
        model = from_folder(model_class, model_dir, config, dtype, device, quantization_config)
    model.model_version = version
    model.stream_generate = MethodType(decode_engine.stream_generate, model)  # chat() and stream_chat() too
    return model.eval(), tokenizer
