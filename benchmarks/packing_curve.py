"""Does packed training train like unpacked training? The loss of the first steps, step by step, on a real-size model.

Two LoRA adapters on one random ChatGLM2-6B base (the real config.json, bf16), initialised alike and trained in
lockstep: at each step one adapter gets a packed batch (rows of the training scripts' PackedDataset) and the other
the very same samples unpacked, one per row, padded (PaddingCollator). Both losses are the model's summed token loss
divided by the step's target tokens (num_items_in_batch, as the training scripts do), both adapters take the same
AdamW step with gradient clipping at 1.0. What remains between the two curves is what packing changes: the
attention kernel (segments instead of padded rows) and bf16 rounding. LoRA dropout is off, so that the two runs draw
no different dropout masks.

    python benchmarks/packing_curve.py --tokenizer_dir ../shared/assets/tokenizers/chatglm2-6b \
        --train_file data/msra/instruct_data/train.txt --steps 50 --pack_tokens 2048 --rows 2 --json curve.json
    python benchmarks/packing_curve.py ... --tiny     # a tiny model on the CPU: checks the script, measures nothing
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.tiny_models import TINY_SIZES, build_random_model  # noqa: E402
from utils.dataset import InstructionDataset, PackedDataset, PaddingCollator  # noqa: E402
from utils.model_loading import load_tokenizer, read_config  # noqa: E402
from utils.training_methods import add_lora  # noqa: E402

VERSION = "chatglm2-6b"


def step_loss(model, batch):
    targets = batch["labels"][:, 1:].ne(-100).sum()
    return model(**batch, num_items_in_batch=targets).loss


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer_dir", required=True, help="the real chatglm2-6b config.json and tokenizer.model")
    parser.add_argument("--train_file", required=True, help="instruction records (process.py's train.txt)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--pack_tokens", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=2, help="packed rows per step")
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU (or --tiny)")
    device, dtype = ("cpu", torch.float32) if args.tiny else ("cuda", torch.bfloat16)

    config = read_config(args.tokenizer_dir) | (TINY_SIZES[VERSION] if args.tiny else {})
    with torch.device(device):
        model = build_random_model(VERSION, config, dtype=dtype)
    model.model_version = VERSION
    tokenizer = load_tokenizer(args.tokenizer_dir, VERSION)
    data = InstructionDataset(args.train_file, tokenizer, VERSION, max_source_length=128, max_target_length=32)
    packed = PackedDataset(data, args.pack_tokens, seed=0)
    if len(packed) < args.steps * args.rows:
        sys.exit(f"{args.train_file}: {len(packed)} packed rows, fewer than {args.steps} steps x {args.rows} rows")
    print(packed.describe())

    lora = {"r": 8, "alpha": 32, "dropout": 0.0, "target_modules": "query_key_value"}
    model = add_lora(model, lora)
    model.add_adapter("unpacked", model.peft_config["default"])
    with torch.no_grad():  # the same starting point for both
        for name, param in model.named_parameters():
            if ".unpacked." in name:
                param.copy_(dict(model.named_parameters())[name.replace(".unpacked.", ".default.")])
    adapters = {"packed": "default", "unpacked": "unpacked"}
    optimizers = {
        run: torch.optim.AdamW([p for n, p in model.named_parameters() if f".{name}." in n], lr=args.learning_rate,
                               weight_decay=0.0)
        for run, name in adapters.items()
    }
    collate = PaddingCollator(tokenizer.pad_token_id)
    model.train()

    rows, started = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        chosen = range((step - 1) * args.rows, step * args.rows)
        batches = {
            "packed": collate([packed[i] for i in chosen]),
            "unpacked": collate([data.examples[k] for i in chosen for k in packed.rows[i]]),
        }
        losses = {}
        for run, adapter in adapters.items():
            model.set_adapter(adapter)  # also makes only this adapter's weights trainable
            loss = step_loss(model, {k: v.to(device) for k, v in batches[run].items()})
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizers[run].step()
            optimizers[run].zero_grad(set_to_none=True)
            losses[run] = loss.item()
        samples = sum(len(packed.rows[i]) for i in chosen)
        row = {"step": step, "samples": samples, **losses, "difference": losses["packed"] - losses["unpacked"]}
        rows.append(row)
        print(f"step {step:3d}  samples {samples:3d}  packed {losses['packed']:.4f}  unpacked {losses['unpacked']:.4f}  "
              f"difference {row['difference']:+.4f}", flush=True)

    largest = max(rows, key=lambda r: abs(r["difference"]))
    relative = max(abs(r["difference"]) / abs(r["unpacked"]) for r in rows)
    summary = {"steps": args.steps, "pack_tokens": args.pack_tokens, "rows_per_step": args.rows,
               "largest_difference": round(largest["difference"], 4), "at_step": largest["step"],
               "largest_relative_difference": round(relative, 4),
               "first_loss": round(rows[0]["unpacked"], 4), "last_loss": round(rows[-1]["unpacked"], 4),
               "seconds": round(time.perf_counter() - started, 1),
               "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "date": time.strftime("%Y-%m-%d")}
    print(json.dumps(summary))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "steps": rows}, indent=2))


if __name__ == "__main__":
    main()
