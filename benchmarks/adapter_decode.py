"""Decode speed with a LoRA adapter: PEFT's separate layers against the adapter folded into the weights (what predict.py,
chat_ner.py, the servers and inference_test.py do), next to the base model alone, at the batch predict.py uses.
Random ChatGLM2-6B weights with the real config.json, bf16, LoRA r=8 on query_key_value (the seed-style setting),
greedy, exactly --new_tokens tokens per row. Each variant runs once to warm up (and compile), then --repeats timed
runs; a decode step is (total - time to first token) / (new tokens - 1). Needs CUDA.

    python benchmarks/adapter_decode.py --config_dir ../shared/assets/tokenizers --batch_size 32 --new_tokens 32 --json out.json
    python benchmarks/adapter_decode.py ... --batch_size 1 --nf4_model_dir /tmp/chatglm2-6b-random   # + the 4-bit bases
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from generate_6b import load_random_model, random_prompt  # noqa: E402  (this folder is on sys.path)
from utils.generation import time_generation  # noqa: E402
from utils.adapters import fold_adapter  # noqa: E402
from utils.model_loading import load_model_and_tokenizer  # noqa: E402
from utils.training_methods import add_lora  # noqa: E402


LORA = {"r": 8, "alpha": 32, "dropout": 0.05, "target_modules": "query_key_value"}


def measure(name, model, input_ids, args):
    started = time.perf_counter()
    with torch.inference_mode():
        time_generation(model, input_ids, args.new_tokens, args.decode)
        warmup = time.perf_counter() - started
        runs = [time_generation(model, input_ids, args.new_tokens, args.decode) for _ in range(args.repeats)]
    first, total = min(runs, key=lambda run: run[1])
    step_ms = (total - first) / (args.new_tokens - 1) * 1e3
    row = {"variant": name, "batch_size": input_ids.shape[0], "decode": args.decode, "warmup_s": round(warmup, 1),
           "first_token_ms": round(first * 1e3, 1), "decode_step_ms": round(step_ms, 2),
           "decode_tokens_per_s": round(input_ids.shape[0] / step_ms * 1e3, 1)}
    print(json.dumps(row), flush=True)
    return row


def measure_or_report(name, model, input_ids, args):
    """measure(), or the error a decode loop hit on this model (bitsandbytes layers in a captured CUDA graph, say)."""
    try:
        return measure(name, model, input_ids, args)
    except Exception as error:  # noqa: BLE001 - reported in the table, the other rows still run
        print(f"{name}: {type(error).__name__}: {error}", flush=True)
        return {"variant": name, "error": f"{type(error).__name__}: {str(error)[:200]}"}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_dir", required=True)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--prompt_len", type=int, default=96)
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode", default="auto")
    parser.add_argument("--nf4_model_dir", default="", help="a ChatGLM2-6B folder (random weights do): also measure the "
                        "adapter on its bitsandbytes NF4 base (needs bitsandbytes) and the int4 layout of our merge")
    parser.add_argument("--json", default="")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = load_random_model("chatglm2-6b", args.config_dir, torch.bfloat16)
    model.model_version = "chatglm2-6b"
    input_ids = random_prompt(model, args.batch_size, args.prompt_len)
    rows = [measure("base", model, input_ids, args)]
    adapted = add_lora(model, LORA).eval()
    with torch.no_grad():  # B starts at 0; give the adapter weights so that folding changes the base
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    rows.append(measure("adapter, PEFT layers", adapted, input_ids, args))
    adapter_state = {name: param.detach().clone() for name, param in adapted.named_parameters() if "lora_" in name}
    folded = fold_adapter(adapted)
    rows.append(measure("adapter folded", folded, input_ids, args))
    if args.nf4_model_dir:
        # A QLoRA adapter on the 4-bit base it was trained on (bitsandbytes NF4, as train_qlora.py loads it): the
        # adapter cannot be folded into NF4 weights, so PEFT's layers stay; next to the 4-bit base alone and to the
        # int4 folder merge_lora_and_quantize.py writes (adapter folded first, then quantized by our kernels' layout).
        from transformers import BitsAndBytesConfig

        del model, adapted, folded
        torch.cuda.empty_cache()
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16)
        nf4, _ = load_model_and_tokenizer(args.nf4_model_dir, dtype="bf16", device="cuda", quantization_config=quantization)
        rows.append(measure_or_report("NF4 base (bitsandbytes)", nf4, input_ids, args))
        nf4_adapted = add_lora(nf4, LORA).eval()
        with torch.no_grad():
            for name, param in nf4_adapted.named_parameters():
                if name in adapter_state:
                    param.copy_(adapter_state[name])
        rows.append(measure_or_report("NF4 base + adapter, PEFT layers", nf4_adapted, input_ids, args))
        del nf4, nf4_adapted
        torch.cuda.empty_cache()
        int4 = load_random_model("chatglm2-6b", args.config_dir, torch.bfloat16).quantize(4)
        int4.model_version = "chatglm2-6b"
        # Speed does not depend on the weights' values: a random model quantized stands for the merged folder.
        rows.append(measure("int4 folder of merge_lora_and_quantize.py (adapter merged, then quantized)", int4, input_ids, args))
    base_step = rows[0]["decode_step_ms"]
    rows_with_error = [row for row in rows if "error" in row]
    rows = [row for row in rows if "error" not in row]
    print(f"\n# {torch.cuda.get_device_name()}, torch {torch.__version__}, ChatGLM2-6B bf16 (random weights), "
          f"batch {args.batch_size}, prompt {args.prompt_len}, {args.new_tokens} new tokens, decode={args.decode}")
    print("| variant | decode step (ms) | x base | tokens/s | first token (ms) | warm-up incl. compile (s) |\n|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['decode_step_ms']} | {row['decode_step_ms'] / base_step:.2f} | "
              f"{row['decode_tokens_per_s']} | {row['first_token_ms']} | {row['warmup_s']} |")
    for row in rows_with_error:
        print(f"| {row['variant']} | failed: {row['error']} | | | | |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows + rows_with_error, indent=2))


if __name__ == "__main__":
    main()
