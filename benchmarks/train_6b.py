"""Train a real-size model (random weights, the real config.json) for a few steps with each training script and
report tokens/s and peak GPU memory, as the scripts themselves log them (train_args.json and their log lines).

    python benchmarks/train_6b.py --tokenizer_dir ../shared/assets/tokenizers/chatglm2-6b --work_dir /tmp/train_bench
    # scale-out: train_deepspeed.py with LoRA + ZeRO-2 on 1 and on 2 GPUs, then full fine-tuning with ZeRO-3 on 2
    python benchmarks/train_6b.py --tokenizer_dir ../shared/assets/tokenizers/chatglm2-6b --work_dir /tmp/train_bench \
        --scripts train_deepspeed.py@1,train_deepspeed.py@2
    python benchmarks/train_6b.py --tokenizer_dir ../shared/assets/tokenizers/chatglm2-6b --work_dir /tmp/train_bench \
        --scripts train_deepspeed.py@2 --method full --deepspeed deepspeed_zero3.json --max_steps 6

`script@N` runs the script on N processes (GPUs) under the deepspeed launcher (train_deepspeed.py, train_trainer.py).
The examples are ~500-token NER prompts made from the shipped demo sentences, so a batch is about batch x 512 tokens
per process. "steady tok/s" is the mean of the scripts' logged tokens/s after the first log line (which includes the
start-up); "run tok/s" is all tokens over the whole run. Peak memory is rank 0's. --tiny runs the same on a tiny
model on the CPU (gloo), to check the runs before spending GPU time.
"""
import argparse
import ast
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from tools.tiny_models import make_tiny_model  # noqa: E402
from utils.data_io import write_jsonl  # noqa: E402
from utils.distributed import free_port  # noqa: E402
from utils.records import read_instruction_records  # noqa: E402


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


def launcher(processes):
    """The `deepspeed` command (through this Python, whatever PATH holds) for `processes` ranks on this machine."""
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(processes), "--master_port", str(free_port())]


def commands(script, processes, model_dir, data_dir, run_dir, args):
    common = [f"--model_dir={model_dir}", f"--output_dir={run_dir}", "--max_source_length=480", "--max_target_length=64"]
    steps = [f"--max_steps={args.max_steps}", f"--per_device_train_batch_size={args.batch_size}",
             f"--logging_steps={args.logging_steps}", "--eval_steps=100000", "--save_steps=0", f"--dtype={args.dtype}",
             f"--train_file={data_dir / 'train.txt'}", f"--dev_file={data_dir / 'dev.txt'}", f"--method={args.method}"]
    if args.deepspeed:
        steps.append(f"--deepspeed={args.deepspeed}")
    if script == "train_trainer.py":
        start = launcher(processes) if processes > 1 or args.deepspeed else [sys.executable]
        return [*start, script, *common, *steps, "--report_to=none"]
    if script == "train_deepspeed.py":
        return [*launcher(processes), script, *common, *steps]
    train_args = json.loads((REPO_ROOT / "chatGLM_6B_QLoRA.json").read_text())
    train_args.update(max_steps=args.max_steps, per_device_train_batch_size=args.qlora_batch_size, gradient_accumulation_steps=1,
                      logging_steps=10, eval_strategy="no", save_steps=100000, report_to=[])
    json_path = run_dir.parent / "qlora_args.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(train_args))
    return [sys.executable, script, *common, f"--train_args_json={json_path}", "--dtype=bf16",
            f"--train_file={data_dir / 'train.txt'}", f"--dev_file={data_dir / 'dev.txt'}"]


def logged_rates(log_path):
    """tokens/s of each log line the script printed (one JSON object per line)."""
    rates = []
    for line in log_path.read_text(errors="replace").splitlines():
        start = line.find('{"loss"')
        if start < 0:
            start = line.find("{'loss'")
        if start < 0:
            continue
        text = line[start:line.rfind("}") + 1]
        try:  # train_deepspeed.py prints JSON, the Trainer a Python dict of strings
            entry = json.loads(text) if text.startswith('{"') else ast.literal_eval(text)
        except (ValueError, SyntaxError):
            continue
        rate = entry.get("tokens_per_second") or entry.get("train_tokens_per_second")
        if rate:
            rates.append(float(rate))
    return rates


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", default="chatglm2-6b")
    parser.add_argument("--tokenizer_dir", required=True, help="folder with the real config.json and tokenizer files")
    parser.add_argument("--work_dir", required=True)
    parser.add_argument("--scripts", default="train_trainer.py,train_deepspeed.py,train_qlora.py",
                        help="comma list; script@N runs it on N processes")
    parser.add_argument("--method", default="lora", choices=["lora", "full"], help="for train_trainer.py / train_deepspeed.py")
    parser.add_argument("--deepspeed", default="", help="DeepSpeed config for train_trainer.py / train_deepspeed.py")
    parser.add_argument("--max_steps", type=int, default=30)
    parser.add_argument("--logging_steps", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--qlora_batch_size", type=int, default=4)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU: checks the runs, measures nothing")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if args.tiny:
        args.dtype = "fp32"
    elif not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU (or --tiny)")
    work = Path(args.work_dir)
    model_dir, data_dir = work / ("tiny-model" if args.tiny else "model"), work / "data"
    if not model_dir.exists():
        started = time.time()
        if args.tiny:
            make_tiny_model(args.version, model_dir, args.tokenizer_dir)
        else:
            make_tiny_model(args.version, model_dir, args.tokenizer_dir, dtype=torch.bfloat16, full_size=True, device="cuda")
        print(f"random {args.version} written to {model_dir} in {time.time() - started:.0f} s", flush=True)
    largest = max(int(entry.partition("@")[2] or 1) for entry in args.scripts.split(","))
    write_jsonl(data_dir / "train.txt", long_examples(args.max_steps * args.batch_size * largest, 720))
    write_jsonl(data_dir / "dev.txt", long_examples(16, 720))

    rows = []
    for entry in args.scripts.split(","):
        script, _, processes = entry.partition("@")
        processes = int(processes or 1)
        name = f"{script.removesuffix('.py')}-{args.method}-{processes}"
        run_dir, log = work / "runs" / name, work / f"{name}.log"
        command = commands(script, processes, model_dir, data_dir, run_dir, args)
        print("$ " + " ".join(command), flush=True)
        with open(log, "w") as handle:
            code = subprocess.run(command + ["--overwrite_output_dir=true"], cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT).returncode
        if code != 0:
            print(f"{entry} failed (exit {code}); last lines of {log}:\n" + "\n".join(log.read_text().splitlines()[-30:]), flush=True)
            rows.append({"script": script, "processes": processes, "status": f"failed ({code})"})
            continue
        saved = "model" if args.method == "full" and script != "train_qlora.py" else "adapter_model"
        train_args = json.loads((run_dir / saved / "train_args.json").read_text())
        metrics = train_args["metrics"]
        rates = logged_rates(log)
        ds_config = train_args.get("deepspeed_config") or {}
        rows.append({
            "script": script,
            "processes": processes,
            "method": args.method if script != "train_qlora.py" else "qlora",
            "zero": ds_config.get("zero_optimization", {}).get("stage", ""),
            "status": "ok",
            "batch": f"{args.qlora_batch_size if script == 'train_qlora.py' else args.batch_size} x {processes}",
            "tokens": metrics.get("num_input_tokens_seen"),
            "steady_tokens_per_s": round(sum(rates[1:]) / len(rates[1:])) if len(rates) > 1 else "",
            "run_tokens_per_s": metrics.get("train_tokens_per_second"),
            "peak_gib": metrics.get("peak_memory_gib") or metrics.get("peak_rss_gib"),
            "train_loss": round(metrics.get("train_loss", float("nan")), 4),
        })
    device = "CPU (--tiny)" if args.tiny else torch.cuda.get_device_name()
    print(f"# {device}, torch {torch.__version__}, {args.version} random weights, {args.max_steps} steps, {time.strftime('%Y-%m-%d')}")
    columns = ["script", "processes", "method", "zero", "status", "batch", "tokens", "steady_tokens_per_s", "run_tokens_per_s",
               "peak_gib", "train_loss"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    one = {row["script"]: row["steady_tokens_per_s"] for row in rows if row.get("processes") == 1 and row["status"] == "ok"}
    for row in rows:
        if row["status"] == "ok" and row["processes"] > 1 and one.get(row["script"]) and row["steady_tokens_per_s"]:
            print(f"{row['script']}: {row['processes']} processes give {row['steady_tokens_per_s'] / one[row['script']]:.2f}x "
                  "the tokens/s of 1 at the same per-process batch")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
