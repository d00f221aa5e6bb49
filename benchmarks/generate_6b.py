"""Generation speed and memory of the real 6B models, built from their config.json with random weights.

Speed and memory do not depend on weight values, so this measures what a user with the real checkpoints gets.
Needs CUDA. Prints one table row per (model, decoding loop) and writes JSON with --json.

    python benchmarks/generate_6b.py --config_dir ../shared/assets/tokenizers --json results.json
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.tiny_models import build_random_model  # noqa: E402
from utils.decode_engine import stream_generate  # noqa: E402
from utils.glm_layers import fuse_norms_and_mlps  # noqa: E402
from utils.model_loading import DTYPES, VERSIONS, read_config, remote_module  # noqa: E402


def load_random_model(version, config_dir, dtype):
    with torch.device("cuda"):
        model = build_random_model(version, read_config(Path(config_dir) / version), dtype=dtype)
    return model.eval()


def load_random_glm4(fused=True):
    """GLM-4-9B with random weights, bf16, on CUDA: transformers' GlmConfig defaults (glm-4-9b-chat-hf's config.json);
    its norms and MLPs on our kernels as the loader gives them (utils/glm_layers.py), or transformers' own layers."""
    from transformers import AutoModelForCausalLM, GlmConfig

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(GlmConfig(), dtype=torch.bfloat16).eval()
    if fused:
        fuse_norms_and_mlps(model, remote_module("chatglm2-6b", "kernels"))
    model.model_version = None
    return model


def random_prompt(model, batch, prompt_len):
    body = torch.randint(5, 60000, (batch, prompt_len - 2), device="cuda")
    config = model.config
    if getattr(config, "model_type", "chatglm") != "chatglm":  # GLM-4: [gMASK] <sop> of its real vocabulary, then text
        return torch.cat((torch.tensor([151331, 151333], device="cuda").expand(batch, -1), body), dim=1)
    if hasattr(config, "gmask_token_id"):  # v1: text, then [gMASK] <sop>
        tail = torch.tensor([config.gmask_token_id, config.bos_token_id], device="cuda").expand(batch, -1)
        return torch.cat((body, tail), dim=1)
    head = torch.tensor([64790, 64792], device="cuda").expand(batch, -1)  # v2/v3: [gMASK] sop, then text
    return torch.cat((head, body), dim=1)


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return result, time.perf_counter() - start


def measure(version, args):
    dtype = DTYPES[args.dtype]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = load_random_model(version, args.config_dir, dtype)
    weights_gib = torch.cuda.memory_allocated() / 2**30
    input_ids = random_prompt(model, args.batch_size, args.prompt_len)
    mask = torch.ones_like(input_ids)
    rows = []
    with torch.inference_mode():
        logits = model(input_ids).logits
        assert torch.isfinite(logits).all(), f"{version}: non-finite logits"
        _, prefill_s = timed(lambda: model(input_ids, attention_mask=mask, logits_to_keep=1))
        loops = {
            "HF generate": lambda n: model.generate(
                input_ids, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n, eos_token_id=None, pad_token_id=0
            ),
            "stream_generate plain": lambda n: list(
                stream_generate(model, input_ids, mask, do_sample=False, max_new_tokens=n, eos_token_id=[-1], decode="plain")
            ),
            "stream_generate graph": lambda n: list(
                stream_generate(model, input_ids, mask, do_sample=False, max_new_tokens=n, eos_token_id=[-1], decode="graph")
            ),
        }
        for name in args.loops.split(","):
            run = loops[name]
            started = time.perf_counter()
            run(args.max_new_tokens)  # full-length warm-up (and compilation): a short one left the first run slow
            print(f"{version} {name}: warm-up {time.perf_counter() - started:.1f} s", flush=True)
            torch.cuda.reset_peak_memory_stats()
            _, total_s = timed(lambda: run(args.max_new_tokens))
            decode_s = total_s - prefill_s
            rows.append({
                "model": version,
                "loop": name,
                "dtype": args.dtype,
                "batch_size": args.batch_size,
                "prompt_len": args.prompt_len,
                "new_tokens": args.max_new_tokens,
                "prefill_ms": round(prefill_s * 1e3, 1),
                "decode_tokens_per_s": round(args.batch_size * (args.max_new_tokens - 1) / decode_s, 1),
                "total_tokens_per_s": round(args.batch_size * args.max_new_tokens / total_s, 1),
                "weights_gib": round(weights_gib, 2),
                "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
            })
    del model
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_dir", required=True, help="folder with <version>/config.json for each model")
    parser.add_argument("--versions", default=",".join(VERSIONS))
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--loops", default="stream_generate plain,stream_generate graph",
                        help="comma-separated: HF generate, stream_generate plain, stream_generate graph")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    rows = [row for version in args.versions.split(",") for row in measure(version, args)]
    columns = ["model", "loop", "batch_size", "prefill_ms", "decode_tokens_per_s", "total_tokens_per_s", "weights_gib", "peak_gib"]
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, dtype {args.dtype}, "
          f"prompt {args.prompt_len}, new tokens {args.max_new_tokens}")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
