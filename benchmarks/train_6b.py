"""Train a real-size model (random weights, the real config.json) for a few steps with each training script and
report tokens/s and peak GPU memory, as the scripts themselves log them (adapter_model/train_args.json).

    python benchmarks/train_6b.py --tokenizer_dir ../shared/assets/tokenizers/chatglm2-6b --work_dir /tmp/train_bench

The examples are ~500-token NER prompts made from the shipped demo sentences, so a batch is about batch x 512 tokens.
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from utils.data_io import write_jsonl  # noqa: E402
from utils.dataset import read_instruction_records  # noqa: E402
from utils.tiny_model import make_tiny_model  # noqa: E402


def long_examples(count, target_chars):
    """Instruction records whose text joins demo sentences up to target_chars characters (ChatGLM2: ~1.5 per token)."""
    demo = read_instruction_records(REPO_ROOT / "data" / "demo_ner" / "instruct_data" / "train.txt")
    records, index = [], 0
    for _ in range(count):
        texts, answers = [], []
        while sum(map(len, texts)) < target_chars:
            record = demo[index % len(demo)]
            index += 1
            texts.append(record["query"].removeprefix("文本："))
            answers += [line for line in record["answer"].split("\n") if line != "没有" and line not in answers]
        records.append({"instruct": demo[0]["instruct"], "query": "文本：" + "".join(texts), "answer": "\n".join(answers) or "没有"})
    return records


def commands(script, model_dir, data_dir, run_dir, args):
    common = [f"--model_dir={model_dir}", f"--output_dir={run_dir}", "--max_source_length=480", "--max_target_length=64"]
    steps = [f"--max_steps={args.max_steps}", f"--per_device_train_batch_size={args.batch_size}", "--logging_steps=10",
             "--eval_steps=100000", "--save_steps=100000", "--dtype=bf16", f"--train_file={data_dir / 'train.txt'}",
             f"--dev_file={data_dir / 'dev.txt'}"]
    if script == "train_trainer.py":
        return [sys.executable, script, *common, *steps, "--report_to=none"]
    if script == "train_deepspeed.py":
        return ["deepspeed", "--num_gpus", "1", script, *common, *steps]
    train_args = json.loads((REPO_ROOT / "chatGLM_6B_QLoRA.json").read_text())
    train_args.update(max_steps=args.max_steps, per_device_train_batch_size=args.qlora_batch_size, gradient_accumulation_steps=1,
                      logging_steps=10, eval_strategy="no", save_steps=100000, report_to=[])
    json_path = run_dir.parent / "qlora_args.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(train_args))
    return [sys.executable, script, *common, f"--train_args_json={json_path}", "--compute_dtype=bf16",
            f"--train_data_path={data_dir / 'train.txt'}", f"--eval_data_path={data_dir / 'dev.txt'}"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", default="chatglm2-6b")
    parser.add_argument("--tokenizer_dir", required=True, help="folder with the real config.json and tokenizer files")
    parser.add_argument("--work_dir", required=True)
    parser.add_argument("--scripts", default="train_trainer.py,train_deepspeed.py,train_qlora.py")
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--qlora_batch_size", type=int, default=4)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    work = Path(args.work_dir)
    model_dir, data_dir = work / "model", work / "data"
    if not model_dir.exists():
        started = time.time()
        make_tiny_model(args.version, model_dir, args.tokenizer_dir, dtype=torch.bfloat16, full_size=True, device="cuda")
        print(f"random {args.version} written to {model_dir} in {time.time() - started:.0f} s", flush=True)
    write_jsonl(data_dir / "train.txt", long_examples(args.max_steps * args.batch_size, 720))
    write_jsonl(data_dir / "dev.txt", long_examples(16, 720))

    rows = []
    for script in args.scripts.split(","):
        run_dir = work / "runs" / script.removesuffix(".py")
        log = work / f"{script.removesuffix('.py')}.log"
        command = commands(script, model_dir, data_dir, run_dir, args)
        print("$ " + " ".join(command), flush=True)
        with open(log, "w") as handle:
            code = subprocess.run(command + ["--overwrite_output_dir=true"], cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT).returncode
        if code != 0:
            print(f"{script} failed (exit {code}); last lines of {log}:\n" + "\n".join(log.read_text().splitlines()[-30:]), flush=True)
            rows.append({"script": script, "status": f"failed ({code})"})
            continue
        train_args = json.loads((run_dir / "adapter_model" / "train_args.json").read_text())
        metrics = train_args["metrics"]
        batch = args.qlora_batch_size if script == "train_qlora.py" else args.batch_size
        rows.append({
            "script": script,
            "status": "ok",
            "batch": batch,
            "tokens": metrics.get("num_input_tokens_seen"),
            "tokens_per_s": metrics.get("train_tokens_per_second"),
            "peak_gib": metrics.get("peak_memory_gib"),
            "train_loss": round(metrics.get("train_loss", float("nan")), 4),
        })
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.version} random weights, {args.max_steps} steps")
    columns = ["script", "status", "batch", "tokens", "tokens_per_s", "peak_gib", "train_loss"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
