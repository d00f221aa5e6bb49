"""QLoRA's training step split into the GPU's work and the host's. Needs CUDA and bitsandbytes.

    python benchmarks/qlora_split.py --config_dir ../shared/assets/tokenizers --model full
    python benchmarks/qlora_split.py --config_dir ../shared/assets/tokenizers --model narrow
    python benchmarks/qlora_split.py --config_dir ../shared/assets/tokenizers --model full --graph_blocks

The step is speed_table.py's qlora-v2 row (NF4 + double quantization as train_qlora.py loads it, LoRA r8 on
query_key_value, 4 x 512, gradient checkpointing) with torch's fused AdamW. `full` is ChatGLM2-6B (random weights, the
real config.json); `narrow` is the same 28 blocks at hidden size 256, whose step is the host's work with next to nothing
for the GPU. Prints ms per step (three 5-step means), the GPU's kernel time per step (torch.profiler, two steps) and the
kernel count; where `full` takes longer than its kernel time and about as long as `narrow`, the step waits for the host.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from peft.helpers import disable_input_dtype_casting
from torch.profiler import ProfilerActivity, profile

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
from generate_6b import random_prompt  # noqa: E402  (this folder is on sys.path)
from speed_table import lora  # noqa: E402
from tools.tiny_models import make_tiny_model  # noqa: E402
from utils.graphed_blocks import graph_blocks  # noqa: E402
from utils.model_loading import load_model_and_tokenizer  # noqa: E402
from utils.training_methods import kbit_quantization_config, prepare_kbit_model  # noqa: E402

NARROW = {"num_layers": 28, "hidden_size": 256, "ffn_hidden_size": 512, "kv_channels": 64, "num_attention_heads": 4,
          "multi_query_group_num": 2, "padded_vocab_size": 65024}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_dir", required=True, help="folder with chatglm2-6b/config.json and tokenizer files")
    parser.add_argument("--model", choices=["full", "narrow"], default="full")
    parser.add_argument("--work_dir", default="/tmp/qlora_split", help="where the random model folder is written")
    parser.add_argument("--graph_blocks", action="store_true",
                        help="the blocks as CUDA graphs (utils/graphed_blocks.py), as the training scripts run them")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    model_dir = Path(args.work_dir) / args.model
    if not (model_dir / "config.json").exists():
        shape = {"full_size": True, "device": "cuda"} if args.model == "full" else NARROW
        make_tiny_model("chatglm2-6b", model_dir, Path(args.config_dir) / "chatglm2-6b", dtype=torch.bfloat16, **shape)
    model, _ = load_model_and_tokenizer(model_dir, dtype="bf16", device="cuda",
                                        quantization_config=kbit_quantization_config(4, torch.bfloat16))
    model = lora(prepare_kbit_model(model, torch.bfloat16, gradient_checkpointing=True))
    if args.graph_blocks:
        graph_blocks(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    input_ids = random_prompt(model, 4, 512)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with disable_input_dtype_casting(model):  # LoRA's bf16 inputs uncast under autocast, as our Trainer runs
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        for _ in range(3):
            started = time.perf_counter()
            for _ in range(5):
                step()
            torch.cuda.synchronize()
            print(f"{args.model}: {(time.perf_counter() - started) / 5 * 1e3:.1f} ms/step", flush=True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                step()
            torch.cuda.synchronize()
    kernels = [event for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    print(f"{args.model}: GPU kernel time {sum(e.device_time for e in kernels) / 2 / 1e3:.1f} ms/step, "
          f"{len(kernels) / 2:.0f} kernels/step")
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=15))


if __name__ == "__main__":
    main()
