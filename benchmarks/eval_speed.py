"""The training scripts' evaluation, timed against the Trainer's own loop on the same model and dev set: our
Trainer.evaluation_loop (samples sorted by length in batches of up to --eval_tokens tokens, the output layer on the
target tokens only) next to transformers.Trainer.evaluation_loop (batches of --batch_size in file order, full logits).
Both give eval_loss; they must agree. Ours runs the prompt prefix that every sample shares once and the batches from
its cache (ours-unshared: every sample whole, to compare). A model folder with a LoRA of r 8 on every linear layer of
the blocks (freshly initialised: the speed is that of any adapter) in the compute dtype, as train_trainer.py
evaluates it.

    python benchmarks/eval_speed.py --model_dir model_hub/chatglm2-6b --dev_file data/msra/instruct_data/dev.txt
    python benchmarks/eval_speed.py --model_dir model_hub/chatglm2-small --dev_file data/demo_ner/instruct_data/dev.txt
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.dataset import PaddingCollator  # noqa: E402
from utils.model_loading import load_model_and_tokenizer, resolve_device, resolve_dtype  # noqa: E402
from utils.trainer import Trainer, load_datasets, training_arguments  # noqa: E402
from utils.training_methods import add_lora  # noqa: E402
from utils.training_options import DEFAULTS  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--dev_file", required=True, help="instruction records (process.py's dev.txt)")
    parser.add_argument("--batch_size", type=int, default=4, help="the Trainer's loop: samples per batch")
    parser.add_argument("--eval_tokens", type=int, default=2560, help="ours: tokens per batch (--pack_tokens)")
    parser.add_argument("--rounds", type=int, default=2, help="each loop this many times, alternating")
    parser.add_argument("--loops", default="trainer,ours",
                        help="which loops to time, of trainer, ours and ours-unshared (ours without the shared prefix)")
    parser.add_argument("--profile",
                        help="after the timed rounds, profile one more round of the last loop: kernel table here")
    args = parser.parse_args()
    device = resolve_device("auto")
    dtype = resolve_dtype("auto", device)
    model, tokenizer = load_model_and_tokenizer(args.model_dir, dtype=dtype, device=device)
    model = add_lora(model, {**DEFAULTS["lora"], "r": 8, "alpha": 32})
    _, dev = load_datasets(args.dev_file, args.dev_file, tokenizer, model.model_version, max_source_length=128,
                           max_target_length=32)
    config = {**DEFAULTS, "per_device_eval_batch_size": args.batch_size, "report_to": "none"}
    trainer = Trainer(model=model, args=training_arguments(config, tempfile.mkdtemp(), dtype, has_eval=True),
                      eval_dataset=dev, data_collator=PaddingCollator(tokenizer.pad_token_id),
                      eval_tokens=args.eval_tokens,
                      run_info={"script": "eval_speed.py", "config": config, "model_version": model.model_version})
    loops = {"trainer": (f"Trainer's loop, batches of {args.batch_size}", transformers.Trainer.evaluation_loop, False),
             "ours": (f"ours, length batches of {args.eval_tokens} tokens", Trainer.evaluation_loop, True),
             "ours-unshared": (f"ours without the shared prefix, length batches of {args.eval_tokens} tokens",
                               Trainer.evaluation_loop, False)}
    loops = {loops[key][0]: loops[key][1:] for key in args.loops.split(",")}
    print(f"shared prompt prefix: {trainer.shared_eval_prefix(dev)} tokens", flush=True)
    for _ in range(args.rounds):
        for name, (loop, share_prefix) in loops.items():
            trainer.share_eval_prefix = share_prefix
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            loss = loop(trainer, trainer.get_eval_dataloader(), "Evaluation", True).metrics["eval_loss"]
            if device == "cuda":
                torch.cuda.synchronize()
            print(f"{name}: {time.perf_counter() - started:.2f} s for {len(dev)} samples, eval_loss {loss:.6f}",
                  flush=True)
    if args.profile:
        from speed_table import write_profile  # (this folder is on sys.path)

        write_profile(args.profile, lambda: loop(trainer, trainer.get_eval_dataloader(), "Evaluation", True))


if __name__ == "__main__":
    main()
