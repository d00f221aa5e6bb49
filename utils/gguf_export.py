"""GGUF export for llama.cpp and Ollama: one .gguf file (architecture, hyper-parameters, tensors, tokenizer, chat
template, as llama.cpp reads them for ChatGLM2/3 and GLM-4) and an Ollama Modelfile beside it.

Which model goes to which llama.cpp architecture: ChatGLM2-6B / ChatGLM3-6B (our remote_scripts classes) and GLM-4 of
transformers' GlmForCausalLM (model_type "glm") are llama.cpp's `chatglm`; Glm4ForCausalLM ("glm4") is its `glm4`.
ChatGLM-6B (v1) has none. The tensors are written one at a time (streaming): each is converted, quantized by gguf-py
and appended to the file before the next is read, so the model is never held twice in memory."""
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from utils.errors import UserError

T = gguf.MODEL_TENSOR
# --gguf TYPE -> (the file type llama.cpp reports, the type of the 2-D weights, the type of the output layer). As
# llama.cpp's own quantizer does, q4_0 keeps the output layer at a higher precision (q8_0 here: gguf-py has no q6_K).
GGUF_TYPES = {
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q8_0),
    "q4_0": (gguf.LlamaFileType.MOSTLY_Q4_0, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0),
}
CHATGLM_BLOCK, GLM_BLOCK = "transformer.encoder.layers.{bid}.", "model.layers.{bid}."
# llama.cpp's tensors and ours (without .weight / .bias): (llama.cpp, ChatGLM2/3, GLM-4 of transformers), as llama.cpp's
# tensor_mapping.py lists them; None where a layout has no such tensor.
TENSOR_TABLE = [
    (T.TOKEN_EMBD, "transformer.embedding.word_embeddings", "model.embed_tokens"),
    (T.OUTPUT_NORM, "transformer.encoder.final_layernorm", "model.norm"),
    (T.OUTPUT, "transformer.output_layer", "lm_head"),
    (T.ATTN_NORM, CHATGLM_BLOCK + "input_layernorm", GLM_BLOCK + "input_layernorm"),
    (T.ATTN_QKV, CHATGLM_BLOCK + "self_attention.query_key_value", None),
    (T.ATTN_Q, None, GLM_BLOCK + "self_attn.q_proj"),
    (T.ATTN_K, None, GLM_BLOCK + "self_attn.k_proj"),
    (T.ATTN_V, None, GLM_BLOCK + "self_attn.v_proj"),
    (T.ATTN_OUT, CHATGLM_BLOCK + "self_attention.dense", GLM_BLOCK + "self_attn.o_proj"),
    (T.FFN_NORM, CHATGLM_BLOCK + "post_attention_layernorm", GLM_BLOCK + "post_attention_layernorm"),
    # gate and up stacked in one matrix in both; llama.cpp splits it
    (T.FFN_UP, CHATGLM_BLOCK + "mlp.dense_h_to_4h", GLM_BLOCK + "mlp.gate_up_proj"),
    (T.FFN_DOWN, CHATGLM_BLOCK + "mlp.dense_4h_to_h", GLM_BLOCK + "mlp.down_proj"),
    (T.ATTN_POST_NORM, None, GLM_BLOCK + "post_self_attn_layernorm"),  # Glm4ForCausalLM's extra norms
    (T.FFN_POST_NORM, None, GLM_BLOCK + "post_mlp_layernorm"),
]


def tensor_patterns(column):
    """[(regex of our name, llama.cpp tensor)] of one layout (column 1: ChatGLM2/3, 2: GLM-4) of TENSOR_TABLE."""
    return [(re.escape(row[column]).replace(re.escape("{bid}"), r"(?P<bid>\d+)"), row[0])
            for row in TENSOR_TABLE if row[column]]


CHATGLM_TENSORS, GLM_TENSORS = tensor_patterns(1), tensor_patterns(2)
# Buffers that llama.cpp computes itself.
SKIPPED_TENSORS = re.compile(r".*rotary_pos_emb\.inv_freq$")
# tokenizer.json pre-tokenizers -> llama.cpp's pre-tokenizer names. GLM-4's split regex is the cl100k one
# (llama.cpp: chatglm-bpe; glm4 where the tokenizer ignores merges for whole-word vocabulary entries).
GLM4_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class GGUFExportError(UserError, ValueError):
    """The model cannot be written as a GGUF; the message says why."""


@dataclass(frozen=True)
class Family:
    """How one model family goes to llama.cpp: architecture, tensor names, vocabulary and prompt format."""
    name: str  # chatglm2-6b, chatglm3-6b, glm, glm4
    arch: gguf.MODEL_ARCH
    tensors: list
    stop_tokens: tuple  # the tokens that end an answer (Ollama's stop parameters)


FAMILIES = {
    "chatglm2-6b": Family("chatglm2-6b", gguf.MODEL_ARCH.CHATGLM, CHATGLM_TENSORS, ("</s>",)),
    "chatglm3-6b": Family("chatglm3-6b", gguf.MODEL_ARCH.CHATGLM, CHATGLM_TENSORS,
                          ("</s>", "<|user|>", "<|observation|>")),
    "glm": Family("glm", gguf.MODEL_ARCH.CHATGLM, GLM_TENSORS, ("<|endoftext|>", "<|user|>", "<|observation|>")),
    "glm4": Family("glm4", gguf.MODEL_ARCH.GLM4, GLM_TENSORS, ("<|endoftext|>", "<|user|>", "<|observation|>")),
}


def gguf_family(version, config):
    """The Family of a model: `version` as utils.model_loading tells it (None for transformers' own classes) and its
    config.json as a dict. Refuses what llama.cpp cannot run, in one line."""
    if version == "chatglm-6b":
        raise GGUFExportError("--gguf: ChatGLM-6B (v1) has no llama.cpp architecture (llama.cpp runs ChatGLM2-6B, "
                              "ChatGLM3-6B and GLM-4); it cannot be written as a GGUF")
    name = version or config.get("model_type")
    if name not in FAMILIES:
        raise GGUFExportError(f"--gguf: model_type {config.get('model_type')!r} is not one this export knows "
                              f"(ChatGLM2-6B, ChatGLM3-6B, GLM-4: {', '.join(FAMILIES)})")
    if version:
        unusual = {key: config.get(key, value) for key, value in CHATGLM_LLAMA_CPP_SETTINGS.items()
                   if config.get(key, value) != value}
        if unusual:
            raise GGUFExportError(f"--gguf: config.json has {unusual}; llama.cpp's chatglm runs only "
                                  f"{ {key: CHATGLM_LLAMA_CPP_SETTINGS[key] for key in unusual} }")
    return FAMILIES[name]


# The ChatGLM2/3 network that llama.cpp's chatglm graph computes (the official checkpoints' settings).
CHATGLM_LLAMA_CPP_SETTINGS = {"rmsnorm": True, "add_bias_linear": False, "post_layer_norm": True,
                              "apply_residual_connection_post_layernorm": False}


def check_gguf_type(gguf_type):
    if gguf_type not in GGUF_TYPES:
        raise GGUFExportError(f"--gguf={gguf_type!r}: expected one of {', '.join(GGUF_TYPES)} (gguf-py cannot write "
                              "k-quants such as q4_k_m; llama.cpp's llama-quantize makes them from the f16 file)")


def hyper_parameters(family, config):
    """GGUF hyper-parameters (writer method suffix -> value) from a config.json dict."""
    if family.name.startswith("chatglm"):  # our remote_scripts config (ChatGLM2/3)
        heads = config["num_attention_heads"]
        head_dim = config["kv_channels"]
        return {"context_length": config["seq_length"], "embedding_length": config["hidden_size"],
                "feed_forward_length": config["ffn_hidden_size"], "block_count": config["num_layers"],
                "head_count": heads, "key_length": head_dim, "value_length": head_dim,
                "head_count_kv": config["multi_query_group_num"] if config.get("multi_query_attention") else heads,
                "layer_norm_rms_eps": config["layernorm_epsilon"],
                # ChatGLM2/3 rotate the first half of each head, with base 10000 x rope_ratio (remote_scripts)
                "rope_dimension_count": head_dim // 2, "rope_freq_base": 10000.0 * config.get("rope_ratio", 1.0)}
    rope = config.get("rope_parameters") or {}
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    rotary = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.5))
    return {"context_length": config["max_position_embeddings"], "embedding_length": config["hidden_size"],
            "feed_forward_length": config["intermediate_size"], "block_count": config["num_hidden_layers"],
            "head_count": config["num_attention_heads"], "head_count_kv": config["num_key_value_heads"],
            "key_length": head_dim, "value_length": head_dim, "layer_norm_rms_eps": config["rms_norm_eps"],
            "rope_dimension_count": int(head_dim * rotary),
            "rope_freq_base": float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))}


def gguf_tensor_name(family, name):
    """llama.cpp's name of our tensor `name` (None for a buffer llama.cpp computes itself)."""
    if SKIPPED_TENSORS.match(name):
        return None
    stem, _, suffix = name.rpartition(".")
    for pattern, tensor in family.tensors:
        match = re.fullmatch(pattern, stem)
        if match and suffix in ("weight", "bias"):
            return gguf.TENSOR_NAMES[tensor].format(bid=match.groupdict().get("bid")) + "." + suffix
    # Every weight must land somewhere: a tensor left out would make a model that differs from the one merged.
    raise GGUFExportError(f"--gguf: the tensor {name} has no place in llama.cpp's {family.arch.name.lower()} "
                          "architecture; this model cannot be written as a GGUF")


def tensor_type(gguf_name, shape, gguf_type):
    """GGUF type of one tensor: vectors (norms, biases) in f32, matrices in the chosen type; a row that the type's
    blocks do not divide stays f16, as llama.cpp's converter does."""
    _, matrix_type, output_type = GGUF_TYPES[gguf_type]
    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    qtype = output_type if gguf_name == "output.weight" else matrix_type
    block_size, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block_size == 0 else gguf.GGMLQuantizationType.F16


def tensor_nbytes(shape, qtype):
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block_size) * type_size


def encode_tensor(tensor, qtype):
    """The bytes of `tensor` (torch, any float dtype) in GGUF type `qtype`, as a numpy array."""
    array = tensor.detach().to("cpu", torch.float32).numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return array
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype)


def plan_tensors(family, tensors, gguf_type):
    """[(gguf name, our name, shape, GGUF type)] for `tensors` (our name -> shape), in our order."""
    planned = []
    for name, shape in tensors.items():
        gguf_name = gguf_tensor_name(family, name)
        if gguf_name is not None:
            planned.append((gguf_name, name, tuple(shape), tensor_type(gguf_name, tuple(shape), gguf_type)))
    return planned


def sentencepiece_vocabulary(tokenizer, vocab_size):
    """ChatGLM2/3: the SentencePiece pieces with their scores and types, then the GLM specials after them ([gMASK],
    sop, role tokens: control tokens), then unused padding up to the embedding's rows."""
    sp_model, kinds = tokenizer.sp_model, gguf.TokenType
    tokens, scores, types = [], [], []
    for index in range(sp_model.get_piece_size()):
        tokens.append(sp_model.id_to_piece(index))
        scores.append(sp_model.get_score(index))
        types.append(kinds.UNKNOWN if sp_model.is_unknown(index) else kinds.CONTROL if sp_model.is_control(index)
                     else kinds.UNUSED if sp_model.is_unused(index) else kinds.BYTE if sp_model.is_byte(index)
                     else kinds.NORMAL)
    for index in range(sp_model.get_piece_size(), vocab_size):
        special = index < tokenizer.vocab_size
        tokens.append(tokenizer.convert_ids_to_tokens(index) if special else f"[PAD{index}]")
        scores.append(0.0)
        types.append(kinds.CONTROL if special else kinds.UNUSED)
    return tokens, scores, types


def add_sentencepiece_tokenizer(writer, family, tokenizer, vocab_size):
    tokens, scores, types = sentencepiece_vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("chatglm-spm")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    # Our tokenizer encodes text as sentencepiece does: a dummy-prefix space, whitespace kept as written.
    writer.add_add_space_prefix(True)
    writer.add_remove_extra_whitespaces(False)
    sp_model = tokenizer.sp_model
    writer.add_unk_token_id(sp_model.unk_id())
    writer.add_bos_token_id(sp_model.bos_id())
    writer.add_eos_token_id(sp_model.eos_id())
    writer.add_pad_token_id(tokenizer.pad_token_id)
    if family.name == "chatglm3-6b":  # an answer also ends where the model starts the user's turn or a tool's
        writer.add_eot_token_id(tokenizer.get_command("<|user|>"))
        writer.add_eom_token_id(tokenizer.get_command("<|observation|>"))


def bpe_pre_tokenizer(tokenizer_json):
    """llama.cpp's pre-tokenizer name for a tokenizer.json: the split it does before byte-level BPE."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    splits = [step["pattern"].get("Regex") for step in steps if step.get("type") == "Split"]
    byte_level = [step for step in steps if step.get("type") == "ByteLevel"]
    if splits == [GLM4_SPLIT_REGEX] and byte_level and not byte_level[0].get("use_regex", True):
        return "glm4" if tokenizer_json["model"].get("ignore_merges") else "chatglm-bpe"
    if not splits and len(byte_level) == 1 and byte_level[0].get("use_regex", True):
        return "gpt-2"  # byte-level BPE with GPT-2's own split (the tiny test tokenizers)
    raise GGUFExportError(f"--gguf: the tokenizer's pre-tokenizer {json.dumps(pre)[:200]} is not GLM-4's nor GPT-2's; "
                          "llama.cpp would split text differently")


def bpe_vocabulary(tokenizer, vocab_size):
    """GLM-4: the byte-level BPE vocabulary (tokenizer.json's strings), its merges and the token types."""
    tokenizer_json = json.loads(tokenizer.backend_tokenizer.to_str())
    by_id = {index: token for token, index in tokenizer_json["model"]["vocab"].items()}
    added = {entry["id"]: entry for entry in tokenizer_json.get("added_tokens", [])}
    tokens, types = [], []
    for index in range(vocab_size):
        if index in added:
            tokens.append(added[index]["content"])
            types.append(gguf.TokenType.CONTROL if added[index]["special"] else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id.get(index, f"[PAD{index}]"))
            types.append(gguf.TokenType.NORMAL if index in by_id else gguf.TokenType.UNUSED)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in tokenizer_json["model"]["merges"]]
    return tokens, types, merges, bpe_pre_tokenizer(tokenizer_json)


def add_bpe_tokenizer(writer, tokenizer, vocab_size):
    tokens, types, merges, pre = bpe_vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    end_of_text, user, observation = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "<|observation|>"])
    for add_token_id in (writer.add_eos_token_id, writer.add_unk_token_id, writer.add_bos_token_id):
        add_token_id(end_of_text)  # GLM-4 has no bos; llama.cpp's GLM-4 files name <|endoftext|> for all three
    writer.add_pad_token_id(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_text)
    writer.add_eot_token_id(user)
    writer.add_eom_token_id(observation)


# Chat templates (Jinja, as llama.cpp's --jinja, llama-cpp-python and transformers render them) that build the prompt
# ids of utils.prompts for ChatGLM2/3. Text after a special token gets sentencepiece's dummy-prefix space in llama.cpp,
# as each separately encoded piece does in ours; hence " " before a ChatGLM3 message's content. OpenAI's role "tool"
# is ChatGLM3's observation. No "%}" is followed by a line break: the renderers trim that.
CHATGLM2_CHAT_TEMPLATE = (
    "{% set offset = 1 if messages and messages[0]['role'] == 'system' else 0 %}[gMASK]sop"
    "{% for message in messages %}{% if message['role'] == 'user' %}[Round {{ (loop.index0 - offset) // 2 + 1 }}]"
    "\n\n问：{% if offset and loop.index0 == 1 %}{{ messages[0]['content'] }}\n{% endif %}{{ message['content'] }}"
    "\n\n答：{% elif message['role'] == 'assistant' %}{{ message['content'] }}\n\n{% endif %}{% endfor %}"
)
CHATGLM3_CHAT_TEMPLATE = (
    "[gMASK]sop{% for message in messages %}{% set content = message['content'] ~ ('\\n' ~ message['tools'] | "
    "tojson(indent=4) if message['tools'] is defined else '') %}"
    "<|{{ 'observation' if message['role'] == 'tool' else message['role'] }}|>{{ message['metadata'] | default('') }}"
    "\n{% if content %} {{ content }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def chat_template(family, tokenizer):
    if family.name == "chatglm2-6b":
        return CHATGLM2_CHAT_TEMPLATE
    if family.name == "chatglm3-6b":
        return CHATGLM3_CHAT_TEMPLATE
    return tokenizer.chat_template  # GLM-4: its own, which our prompts use too


# Ollama's TEMPLATE (Go templates) of each prompt format. Go templates cannot count, so ChatGLM2's is its one-round
# form ("[Round 1]"); Ollama repeats it for earlier turns of a conversation.
OLLAMA_ROLE = '<|{{ if eq .Role "tool" }}observation{{ else }}{{ .Role }}{{ end }}|>'  # OpenAI's tool: observation
OLLAMA_TEMPLATES = {
    "chatglm2-6b": ("[gMASK]sop[Round 1]\n\n问：{{ if .System }}{{ .System }}\n{{ end }}{{ .Prompt }}\n\n答："
                    "{{ .Response }}"),
    "chatglm3-6b": f"[gMASK]sop{{{{ range .Messages }}}}{OLLAMA_ROLE}\n {{{{ .Content }}}}{{{{ end }}}}<|assistant|>",
    "glm": f"[gMASK]<sop>{{{{ range .Messages }}}}{OLLAMA_ROLE}\n{{{{ .Content }}}}{{{{ end }}}}<|assistant|>",
}
OLLAMA_TEMPLATES["glm4"] = OLLAMA_TEMPLATES["glm"]
# ChatGLM's own chat defaults (the official chat() and our web demo): sampling at temperature 0.8, top_p 0.8.
OLLAMA_PARAMETERS = {"temperature": 0.8, "top_p": 0.8}
OLLAMA_MAX_CONTEXT = 8192  # Ollama allocates the whole window: the 128k of GLM-4 would not fit a laptop


def modelfile_text(gguf_name, family, context_length):
    lines = [f"# Ollama: ollama create <name> -f Modelfile; ollama run <name>. The prompt format is {family.name}'s.",
             f"FROM ./{gguf_name}", f'TEMPLATE """{OLLAMA_TEMPLATES[family.name]}"""']
    lines += [f'PARAMETER stop "{token}"' for token in family.stop_tokens]
    lines += [f"PARAMETER {key} {value}" for key, value in OLLAMA_PARAMETERS.items()]
    lines.append(f"PARAMETER num_ctx {min(context_length, OLLAMA_MAX_CONTEXT)}")
    return "\n".join(lines) + "\n"


def add_metadata(writer, family, config, tokenizer, name, gguf_type):
    """Everything but the tensors: name, file type, hyper-parameters, tokenizer and chat template."""
    writer.add_name(name)
    writer.add_file_type(GGUF_TYPES[gguf_type][0])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in hyper_parameters(family, config).items():
        getattr(writer, f"add_{key}")(value)
    vocab_size = config.get("padded_vocab_size") or config["vocab_size"]  # the embedding's rows
    if family.name.startswith("chatglm"):
        add_sentencepiece_tokenizer(writer, family, tokenizer, vocab_size)
    else:
        add_bpe_tokenizer(writer, tokenizer, vocab_size)
    writer.add_add_bos_token(False)  # the chat template writes [gMASK] and sop / <sop> itself
    writer.add_chat_template(chat_template(family, tokenizer))


def write_gguf(path, family, config, tokenizer, tensors, gguf_type, name):
    """Write `path`: `tensors` maps our tensor names to torch tensors, or to (shape, function) pairs whose function
    makes the tensor when its turn comes (a model that never is in memory whole). Header and tensor table first,
    then one tensor at a time: converted, quantized, appended, dropped."""
    shapes = {key: tuple(value.shape) if hasattr(value, "shape") else tuple(value[0]) for key, value in tensors.items()}
    planned = plan_tensors(family, shapes, gguf_type)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[family.arch])
    add_metadata(writer, family, config, tokenizer, name, gguf_type)
    for gguf_name, _, shape, qtype in planned:
        writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), tensor_nbytes(shape, qtype), raw_dtype=qtype)
    writer.write_header_to_file(Path(path))
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, our_name, _, qtype in planned:
        value = tensors[our_name]
        writer.write_tensor_data(encode_tensor(value if hasattr(value, "shape") else value[1](), qtype))
    writer.close()


def export_gguf(folder, name, gguf_type, family, config, tokenizer, tensors):
    """`folder`/<name>-<type>.gguf and an Ollama Modelfile beside it. Returns (gguf path, its size, seconds)."""
    start = time.monotonic()
    path = Path(folder) / f"{name}-{gguf_type}.gguf"
    write_gguf(path, family, config, tokenizer, tensors, gguf_type, name)
    context = hyper_parameters(family, config)["context_length"]
    (Path(folder) / "Modelfile").write_text(modelfile_text(path.name, family, context), encoding="utf-8")
    return path, path.stat().st_size, time.monotonic() - start
