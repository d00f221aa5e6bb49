"""Make a small model folder in the official layout (config.json, weights, tokenizer file, our .py files).

The config keeps every field of the real config.json and shrinks only the sizes, so the same code paths run as for
the 6B models. Weights are random. Used by the tests, and to try the scripts without downloading 12 GB:

    python -m tools.tiny_models --version chatglm2-6b --tokenizer_dir path/to/chatglm2-6b --output_dir model_hub/tiny-chatglm2
"""
import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from utils.model_folder import MODEL_FILES
from utils.model_loading import REMOTE_SCRIPTS, TOKENIZER_FILES, VERSIONS, remote_module

TINY_SIZES = {
    # Widths are multiples of 64 like the real ones (4096, 13696, 16384): bitsandbytes packs 4-bit weights by such blocks.
    "chatglm-6b": dict(num_layers=2, hidden_size=64, num_attention_heads=4, inner_hidden_size=256),
    "chatglm2-6b": dict(num_layers=2, hidden_size=64, num_attention_heads=4, kv_channels=16, ffn_hidden_size=256),
}
TINY_SIZES["chatglm3-6b"] = TINY_SIZES["chatglm2-6b"]


def copy_remote_scripts(version, output_dir):
    """Our model/config/tokenizer code next to the weights, so that trust_remote_code loads it."""
    for name in MODEL_FILES:
        shutil.copy2(REMOTE_SCRIPTS / version / name, Path(output_dir) / name)


def build_random_model(version, config_dict, seed=0, dtype=torch.float32):
    """A randomly initialised model, built directly in `dtype` on the current default device (torch.device(...)
    as a context manager picks it: a 6B model initialises in seconds on a GPU)."""
    config = remote_module(version, "configuration_chatglm").ChatGLMConfig(**config_dict)
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return remote_module(version, "modeling_chatglm").ChatGLMForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)


def save_sharded_bin(state_dict, output_dir, num_shards=2):
    """The legacy layout of the official checkpoints: pytorch_model-0000i-of-0000n.bin plus an index."""
    names = list(state_dict)
    per_shard = -(-len(names) // num_shards)
    weight_map = {}
    for shard in range(num_shards):
        file_name = f"pytorch_model-{shard + 1:05d}-of-{num_shards:05d}.bin"
        part = {name: state_dict[name].contiguous() for name in names[shard * per_shard:(shard + 1) * per_shard]}
        torch.save(part, Path(output_dir) / file_name)
        weight_map.update({name: file_name for name in part})
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (Path(output_dir) / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def make_tiny_model(version, output_dir, tokenizer_dir, seed=0, weights_format="safetensors", dtype=torch.float32,
                    full_size=False, device="cpu", **overrides):
    """Write a tiny `version` model folder to output_dir (or, with full_size, one of the real size, e.g. for GPU
    benchmarks with device="cuda"); returns its path. Refuses to overwrite a non-empty folder."""
    if version not in VERSIONS:
        raise ValueError(f"unknown version {version!r}; expected one of {VERSIONS}")
    output_dir, tokenizer_dir = Path(output_dir), Path(tokenizer_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir}: exists and is not empty; choose another --output_dir or remove it")
    config_dict = json.loads((tokenizer_dir / "config.json").read_text(encoding="utf-8"))
    if not full_size:
        config_dict.update(TINY_SIZES[version])
    config_dict.update(overrides)
    with torch.device(device):
        model = build_random_model(version, config_dict, seed=seed, dtype=dtype)

    output_dir.mkdir(parents=True, exist_ok=True)
    state_dict = {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}
    del model
    if weights_format == "safetensors":
        save_file(state_dict, str(output_dir / "model.safetensors"), metadata={"format": "pt"})
    elif weights_format == "bin":
        save_sharded_bin(state_dict, output_dir)
    else:
        raise ValueError(f"weights_format {weights_format!r}: expected safetensors or bin")
    config_dict["torch_dtype"] = str(dtype).replace("torch.", "")
    (output_dir / "config.json").write_text(json.dumps(config_dict, indent=2, ensure_ascii=False))
    for name in (TOKENIZER_FILES[version], "tokenizer_config.json"):
        shutil.copy2(tokenizer_dir / name, output_dir / name)
    copy_remote_scripts(version, output_dir)
    return output_dir


# GLM-4's special tokens in the order of the real tokenizer (ids 151329.. there), and its chat template's rendering
# of messages without tools: "[gMASK]<sop>" then, per message with content, "<|role|>{metadata}\n{content}"; a
# generation prompt is "<|assistant|>" alone (the model writes the "\n"). No token closes an assistant turn in the
# template: the next role token does, <|user|> at the end of a chat (the official finetuning appends it).
GLM4_SPECIAL_TOKENS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                       "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                       "<|end_of_video|>"]
GLM4_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}{% if item['content'] %}"
    "<|{{ item['role'] }}|>{{ item['metadata'] | default('') }}\n{{ item['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
GLM4_TINY_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                       initializer_range=0.3)  # large random weights: a tiny model learns in a few dozen steps


def train_glm4_tokenizer(texts, vocab_size=1500):
    """A byte-level BPE tokenizer (GLM-4's is one too) trained on `texts`, with GLM-4's special tokens and chat
    template: a stand-in for the real 151k vocabulary that tests can build in a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.add_special_tokens(GLM4_SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=GLM4_SPECIAL_TOKENS[1:], padding_side="left",
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = GLM4_CHAT_TEMPLATE
    return tokenizer


def make_tiny_glm4(output_dir, texts, model_type="glm", seed=0, dtype=torch.float32, device="cpu", **overrides):
    """A tiny GLM-4 folder as transformers' own classes load it: model_type "glm" (glm-4-9b-chat-hf layout,
    GlmForCausalLM) or "glm4" (GLM-4-0414, Glm4ForCausalLM); the real config's fields with small sizes, random
    weights, a tokenizer trained on `texts` (train_glm4_tokenizer). Its stop tokens are those of the real
    generation config: <|endoftext|>, <|user|>, <|observation|>. With the real sizes as overrides (and dtype / device
    for speed), a full-size model with random weights for GPU benchmarks."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir}: exists and is not empty; choose another --output_dir or remove it")
    tokenizer = train_glm4_tokenizer(texts)
    stop_ids = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "<|observation|>"])
    config = AutoConfig.for_model(model_type, eos_token_id=stop_ids, pad_token_id=stop_ids[0],
                                  **{"vocab_size": len(tokenizer), **GLM4_TINY_SIZES, **overrides})
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(eos_token_id=stop_ids, pad_token_id=stop_ids[0], do_sample=False)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", choices=VERSIONS, required=True)
    parser.add_argument("--tokenizer_dir", required=True, help="folder with the real config.json, tokenizer file and tokenizer_config.json")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights_format", choices=("safetensors", "bin"), default="safetensors")
    parser.add_argument("--full_size", action="store_true", help="the real size of the config (random weights)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--device", default="cpu", help="where to initialise the weights (cuda is much faster at 6B)")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    path = make_tiny_model(args.version, args.output_dir, args.tokenizer_dir, seed=args.seed, weights_format=args.weights_format,
                           dtype=dtype, full_size=args.full_size, device=args.device)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
