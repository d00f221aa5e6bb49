"""GGUF files of a real-size ChatGLM2-6B (random weights, the real config.json and tokenizer): the size of each type
and the time to write it (utils.gguf_export, tensor by tensor: the 6B model is never in memory), then batch-1 CPU
decode speed of llama.cpp on the q4_0 file next to our int4 model on the same cores. CPU only; writes about 23 GB
(the files are deleted at the end unless --keep).

    python benchmarks/gguf_6b.py --config_dir ../shared/assets/tokenizers/chatglm2-6b --out_dir /tmp/gguf-6b \
        --json gguf_6b.json

llama.cpp runs through llama-cpp-python's C API with the weights loaded as written (llama-cli --no-repack): on AMX
CPUs in some VMs its AMX kernels for repacked q4_0 weights crash. Ours is remote_scripts' int4 (model.quantize(4), what
--quant_bits 4 writes), decoded by utils.generation in fp32: on the CPU each int4 layer dequantizes its whole weight
for every token (the int4 kernels are CUDA-only).
"""
import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.tiny_models import build_random_model  # noqa: E402
from utils.generation import time_generation  # noqa: E402
from utils.gguf_export import FAMILIES, write_gguf  # noqa: E402
from utils.model_loading import load_tokenizer, read_config, remote_module  # noqa: E402

VERSION = "chatglm2-6b"


def lazy_random_tensors(config):
    """Our tensor name -> (shape, function that makes it): N(0, 0.02) weights drawn only when the writer needs them."""
    model_config = remote_module(VERSION, "configuration_chatglm").ChatGLMConfig(**config)
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in
                  remote_module(VERSION, "modeling_chatglm").ChatGLMForConditionalGeneration(model_config)
                  .state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    return {name: (shape, lambda shape=shape: torch.randn(shape, generator=generator) * 0.02)
            for name, shape in shapes.items()}


def write_files(args, config, tokenizer):
    rows = []
    for gguf_type in args.types.split(","):
        path = Path(args.out_dir) / f"chatglm2-6b-random-{gguf_type}.gguf"
        started = time.perf_counter()
        write_gguf(path, FAMILIES[VERSION], config, tokenizer, lazy_random_tensors(config), gguf_type, path.stem)
        rows.append({"type": gguf_type, "bytes": path.stat().st_size, "gib": round(path.stat().st_size / 2**30, 2),
                     "write_s": round(time.perf_counter() - started, 1), "path": str(path)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def prompt_ids(length):
    body = torch.randint(5, 60000, (length - 2,), generator=torch.Generator().manual_seed(0)).tolist()
    return [64790, 64792, *body]  # [gMASK] sop, then text


def llama_cpp_decode(path, prompt, new_tokens, threads):
    """(prefill tokens/s, decode tokens/s) of greedy batch-1 decoding in llama.cpp."""
    import llama_cpp

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's load log: errors only
    params = llama_cpp.llama_model_default_params()
    params.use_extra_bufts = False
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    context_params = llama_cpp.llama_context_default_params()
    context_params.n_ctx, context_params.n_threads, context_params.n_threads_batch = 512, threads, threads
    context = llama_cpp.llama_init_from_model(model, context_params)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    try:
        batch_ids, times = (llama_cpp.llama_token * len(prompt))(*prompt), []
        for _ in range(new_tokens):
            started = time.perf_counter()
            assert llama_cpp.llama_decode(context, llama_cpp.llama_batch_get_one(batch_ids, len(batch_ids))) == 0
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(context, -1), shape=(n_vocab,))
            batch_ids = (llama_cpp.llama_token * 1)(int(logits.argmax()))
            times.append(time.perf_counter() - started)
        return len(prompt) / times[0], (new_tokens - 1) / sum(times[1:])
    finally:
        llama_cpp.llama_free(context)
        llama_cpp.llama_model_free(model)


def ours_int4_decode(config, prompt, new_tokens):
    """(prefill tokens/s, decode tokens/s) of our int4 model: built in bf16, quantized, run in fp32 like
    inference_test.py on the CPU."""
    model = build_random_model(VERSION, config, dtype=torch.bfloat16).quantize(4).to(torch.float32).eval()
    input_ids = torch.tensor([prompt])
    with torch.inference_mode():
        first, total = time_generation(model, input_ids, new_tokens, "plain")
    return len(prompt) / first, (new_tokens - 1) / (total - first)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_dir", required=True, help="the real chatglm2-6b config.json and tokenizer.model")
    parser.add_argument("--out_dir", required=True)
    parser.add_argument("--types", default="f16,q8_0,q4_0")
    parser.add_argument("--stages", default="write,llama,ours")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--ours_new_tokens", type=int, default=4)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config, tokenizer = read_config(args.config_dir), load_tokenizer(args.config_dir, VERSION)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    result = {"load_before": os.getloadavg()}
    if "write" in args.stages:
        result["files"] = write_files(args, config, tokenizer)
    prompt, q4_0 = prompt_ids(args.prompt_len), Path(args.out_dir) / "chatglm2-6b-random-q4_0.gguf"
    if "llama" in args.stages:
        result["llama_cpp_q4_0"] = dict(zip(("prefill_tok_s", "decode_tok_s"),
                                            llama_cpp_decode(q4_0, prompt, args.new_tokens, args.threads)))
        print(json.dumps(result["llama_cpp_q4_0"]), flush=True)
    if not args.keep:
        for path in Path(args.out_dir).glob("chatglm2-6b-random-*.gguf"):
            path.unlink()
    if "ours" in args.stages:
        result["ours_int4"] = dict(zip(("prefill_tok_s", "decode_tok_s"),
                                       ours_int4_decode(config, prompt, args.ours_new_tokens)))
        print(json.dumps(result["ours_int4"]), flush=True)
    result["load_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
