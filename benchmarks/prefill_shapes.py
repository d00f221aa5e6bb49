"""What a prefill at a (batch, length) not seen before costs, next to the same prefill repeated. Needs CUDA.

A server admits a group of prompts of a new length almost every time, and an evaluation's length batches are nearly
all of different shapes, so whatever is built per shape is paid on the user's clock. Two parts, bf16:

  attention   ChatGLM2-6B's attention alone (32 query heads, 2 key/value groups, head dim 128), --batch rows padded on
              the left at each length of --lengths, three ways: SDPA with the dense padding mask in torch's own
              backend order, the same with cuDNN left out of the order (the key/value groups expanded, as
              memory-efficient attention has no grouped-query support), and flash attention's variable-length kernel
              over the rows' runs (what the model runs since it cuts padded rows into segments). Each: the first call
              at the new shape, then the median of five repeats.
  model       random ChatGLM2-6B (the real config.json) prefilling --batch left-padded prompts at each new length
              (logits of the last position only, as a prefill for generation), first call and repeat.

    python benchmarks/prefill_shapes.py --config_dir ../shared/assets/tokenizers
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from generate_6b import load_random_model, random_prompt  # noqa: E402  (this folder is on sys.path)
from utils.model_loading import remote_module  # noqa: E402

HEADS, GROUPS, HEAD_DIM = 32, 2, 128


def seconds(fn):
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def first_and_repeat(fn):
    first = seconds(fn)
    return first, statistics.median(seconds(fn) for _ in range(5))


def left_padded_mask(batch, length, generator):
    """[batch, length] 1 = token, 0 = padding on the left; the first row has none, the others up to a third."""
    pads = torch.randint(0, length // 3, (batch,), generator=generator)
    pads[0] = 0
    return (torch.arange(length)[None, :] >= pads[:, None]).long().cuda()


def attention_ways(mask):
    batch, length = mask.shape
    q = torch.randn(batch, HEADS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, GROUPS, length, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    keep = mask.bool()
    causal = torch.ones(length, length, dtype=torch.bool, device="cuda").tril()
    dense = ((causal[None] & keep[:, None, :]) | ~keep[:, :, None])[:, None]
    expanded = [t.repeat_interleave(HEADS // GROUPS, dim=1) for t in (k, v)]
    segments = remote_module("chatglm2-6b", "modeling_chatglm").PackedSegments(mask)
    rows = [t.transpose(1, 2) for t in (q, k, v)]

    def without_cudnn():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            F.scaled_dot_product_attention(q, *expanded, attn_mask=dense)

    return {
        "dense mask, torch's order": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=True),
        "dense mask, no cuDNN": without_cudnn,
        "variable-length segments": lambda: segments.attend(*rows),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_dir", required=True, help="<version>/config.json (../shared/assets/tokenizers)")
    parser.add_argument("--batch", type=int, default=15)
    parser.add_argument("--lengths", default="97,131,170,223,301", help="new lengths, comma-separated")
    parser.add_argument("--parts", default="attention,model")
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    generator = torch.Generator().manual_seed(0)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
          f"batch {args.batch}, {time.strftime('%Y-%m-%d')}")
    print("| part | way | length | first call ms | repeat ms |\n|---|---|---|---|---|")
    if "attention" in args.parts:
        for length in lengths:
            for way, fn in attention_ways(left_padded_mask(args.batch, length, generator)).items():
                first, repeat = first_and_repeat(fn)
                print(f"| attention | {way} | {length} | {first * 1e3:.1f} | {repeat * 1e3:.2f} |", flush=True)
    if "model" in args.parts:
        model = load_random_model("chatglm2-6b", args.config_dir, torch.bfloat16)
        with torch.inference_mode():
            for length in [n + 1 for n in lengths]:  # lengths the attention part has not built anything for
                input_ids = random_prompt(model, args.batch, length)
                mask = left_padded_mask(args.batch, length, generator)
                first, repeat = first_and_repeat(lambda: model(input_ids, attention_mask=mask, logits_to_keep=1))
                print(f"| model | prefill, left-padded | {length} | {first * 1e3:.1f} | {repeat * 1e3:.2f} |", flush=True)


if __name__ == "__main__":
    main()
