"""Writing a model folder in the official layout, loadable with transformers + torch alone (AutoModel / AutoTokenizer
with trust_remote_code=True): safetensors weights (sharded above a size), config.json with the official auto_map, the
tokenizer files, generation_config.json and the version's .py files; for transformers' own models (GLM-4), their own
layout (write_native_model_folder). Merges and full/freeze runs write with it, into utils.run_dirs.staged_folder."""
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from utils.model_loading import QUANTIZATION_KEYS, TOKENIZER_FILES, detect_model_version
from utils.remote_code import REMOTE_SCRIPTS, remote_module

MODEL_FILES = ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py", "quantization.py",
               "kernels.py")
GENERATION_CLASS = "modeling_chatglm.ChatGLMForConditionalGeneration"
AUTO_MAP = {"chatglm-6b": {"AutoConfig": "configuration_chatglm.ChatGLMConfig", "AutoModel": GENERATION_CLASS,
                           "AutoModelForSeq2SeqLM": GENERATION_CLASS}}
AUTO_MAP["chatglm2-6b"] = AUTO_MAP["chatglm3-6b"] = {
    **AUTO_MAP["chatglm-6b"], "AutoModelForCausalLM": GENERATION_CLASS,
    "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification"}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}


def unique_state_dict(model):
    """The state dict with tensors that share memory (v1's tied lm_head) copied apart: safetensors stores each alone."""
    seen, state = set(), {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        state[name] = tensor.clone() if key in seen else tensor.contiguous()
        seen.add(key)
    return state


def save_shards(state, folder, max_shard_bytes):
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json above max_shard_bytes
    (each tensor in one shard; a tensor larger than the limit gets a shard of its own). Returns the file names."""
    shards, shard_bytes = [[]], 0
    for name, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += size
    if len(shards) == 1:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{index:05d}-of-{len(shards):05d}.safetensors" for index in range(1, len(shards) + 1)]
    for file_name, shard in zip(names, shards):
        save_file({name: state[name] for name in shard}, str(folder / file_name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": {name: file_name for file_name, shard in zip(names, shards) for name in shard}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return names


def folder_config(base_config, version, dtype, qbits=0, output_layer_qbits=0):
    """The base's config.json with the official auto_map, quantization_bit, our output_layer_quantization_bit
    (ChatGLM2/3) and the saved dtype."""
    config = {**{key: value for key, value in base_config.items() if key not in ("dtype", *QUANTIZATION_KEYS)},
              "auto_map": AUTO_MAP[version], "quantization_bit": qbits, "torch_dtype": str(dtype).replace("torch.", "")}
    if output_layer_qbits:
        config["output_layer_quantization_bit"] = output_layer_qbits
    if detect_model_version(config) != version:  # v2/v3 are told apart by name: keep it explicit
        config["_name_or_path"] = f"THUDM/{version}"
    return config


def check_state_matches_config(state, config, version):
    """The state dict must be exactly what the model built from `config` expects (so AutoModel loads it strictly)."""
    model_config = remote_module(version, "configuration_chatglm").ChatGLMConfig(**config)
    with torch.device("meta"):
        expected = remote_module(version, "modeling_chatglm").ChatGLMForConditionalGeneration(model_config).state_dict()
    written = {name: (tuple(t.shape), t.dtype == torch.int8) for name, t in state.items()}
    wanted = {name: (tuple(t.shape), t.dtype == torch.int8) for name, t in expected.items()}
    if written != wanted:
        differ = sorted(set(written.items()) ^ set(wanted.items()))[:5]
        raise RuntimeError(f"internal error: the state dict does not match the model of its config.json: {differ}")


def write_model_folder(folder, state, config, version, source_dir, max_shard_bytes, scripts_dir=None):
    """Fill the empty `folder`: weights from `state`, config.json from `config`, the tokenizer (and generation_config.json)
    of `source_dir`, the .py files of `scripts_dir` (default: remote_scripts/<version>). Returns the weight files."""
    folder, source_dir = Path(folder), Path(source_dir)
    scripts_dir = Path(scripts_dir) if scripts_dir else REMOTE_SCRIPTS / version
    check_state_matches_config(state, config, version)
    files = save_shards(state, folder, max_shard_bytes)
    (folder / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    vocab = source_dir / TOKENIZER_FILES[version]
    shutil.copy2(vocab, folder / vocab.name)
    tokenizer_config_path = source_dir / "tokenizer_config.json"
    tokenizer_config = (json.loads(tokenizer_config_path.read_text(encoding="utf-8")) if tokenizer_config_path.is_file()
                        else {"tokenizer_class": "ChatGLMTokenizer"})
    tokenizer_config["auto_map"] = TOKENIZER_AUTO_MAP
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if (source_dir / "generation_config.json").is_file():
        shutil.copy2(source_dir / "generation_config.json", folder / "generation_config.json")
    for name in MODEL_FILES:
        shutil.copy2(scripts_dir / name, folder / name)
    return files


# What a native model folder holds besides its tokenizer and generation files: these are written anew.
NATIVE_WEIGHT_FILES = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?$")


def write_native_model_folder(folder, state, source_dir, max_shard_bytes):
    """Fill the empty `folder` for a model of transformers' own classes (GLM-4...): weights from `state`, the source's
    config.json with the saved dtype, and the source's other files (tokenizer, chat template...). Returns the weights."""
    folder, source_dir = Path(folder), Path(source_dir)
    files = save_shards(state, folder, max_shard_bytes)
    config = json.loads((source_dir / "config.json").read_text(encoding="utf-8"))
    config["dtype"] = str(next(t.dtype for t in state.values() if t.is_floating_point())).replace("torch.", "")
    config.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for path in source_dir.iterdir():
        if path.is_file() and path.name != "config.json" and not NATIVE_WEIGHT_FILES.match(path.name):
            shutil.copy2(path, folder / path.name)
    return files
