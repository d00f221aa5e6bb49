"""The user's real job, timed end to end with the project's own scripts on a real-size ChatGLM2-6B (random weights, the
real config.json): process MSRA (val + msra_1000 as train, test as dev) -> train one epoch with the seed-style settings
(LoRA r 8 on query_key_value, batch 12, max_source_length 128, max_target_length 32), unpacked and packed -> predict.py
over the whole MSRA test set with the adapter (32 new tokens) -> chat: time to the first streamed token and tokens/s.
Prints one table: wall time of each stage, real (non-padding) tokens/s, peak GPU memory, and the whole job as one row:
process -> the first packed training (else the unpacked one) -> the first predict run, each stage's wall and the sum.

    python benchmarks/real_job.py --tokenizer_dir ../shared/assets/tokenizers/chatglm2-6b --msra_dir ../shared/data/msra \
        --work_dir /tmp/real_job --json real_job.json
    python benchmarks/real_job.py ... --tiny      # a tiny model on the CPU, a few steps: checks the stages, measures nothing
    python benchmarks/real_job.py ... --tiny --model_dir model_hub/chatglm2-small   # the shipped small model

Each stage runs as a user would run it (a new process per script), so the wall times include start-up, loading and
compilation; the table also gives the scripts' own figures (train_runtime, predict seconds) without them.
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
from tools.tiny_models import make_tiny_model  # noqa: E402

SEED_STYLE = ["--lora_r=8", "--lora_alpha=32", "--lora_dropout=0.05", "--lora_target_modules=query_key_value",
              "--max_source_length=128", "--max_target_length=32", "--learning_rate=2e-4", "--warmup_steps=0.05",
              "--save_steps=0", "--eval_steps=100000", "--logging_steps=10", "--report_to=none", "--dev_file=none"]


def run(name, command, log_dir):
    """Run a script, its output in <log_dir>/<name>.log; returns the wall seconds."""
    print("$ " + " ".join(map(str, command)), flush=True)
    started = time.perf_counter()
    with open(log_dir / f"{name}.log", "w") as log:
        code = subprocess.run(list(map(str, command)), cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - started
    if code != 0:
        tail = "\n".join((log_dir / f"{name}.log").read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"{name} failed (exit {code}) after {seconds:.0f} s:\n{tail}")
    return seconds


def chat_timing(model_dir, lora_path, questions, max_new_tokens):
    """Seconds to the first streamed token of the first answer (the model already loaded), and decode tokens/s of
    each answer, as chat_ner.py and the servers stream (stream_chat_reply, decode="auto")."""
    from utils.generation import stream_chat_reply
    from utils.adapters import load_model_with_adapter
    from utils.prompts import get_prompt_format

    model, tokenizer = load_model_with_adapter(model_dir, lora_path)
    prompt_format = get_prompt_format(tokenizer, model.model_version)
    rows = []
    for question in questions:
        started, first, tokens = time.perf_counter(), None, 0
        for reply in stream_chat_reply(model, tokenizer, prompt_format.prompt_ids(question, []), max_new_tokens):
            if first is None:
                first = time.perf_counter() - started
            tokens = reply.completion_tokens
        total = time.perf_counter() - started
        rows.append({"first_token_s": round(first, 2), "tokens": tokens,
                     "tokens_per_s": round((tokens - 1) / (total - first), 1) if tokens > 1 and total > first else None})
    return rows


def whole_job(rows):
    """The job a user runs, as one row: process, the first packed training (else the unpacked one), the first
    predict run; each stage's wall and their sum. None where a stage did not run."""
    trainings = sorted((row for row in rows if row.get("kind") == "train"), key=lambda row: not row["packed"])
    parts = [next((row for row in rows if row["stage"].startswith("process.py")), None), next(iter(trainings), None),
             next((row for row in rows if row.get("kind") == "predict"), None)]
    if None in parts:
        return []
    walls = " + ".join(f"{name} {row['wall_s']}" for name, row in zip(("process", "train", "predict"), parts))
    return [{"stage": f"the whole job ({walls} s)", "wall_s": round(sum(row["wall_s"] for row in parts), 1)}]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer_dir", required=True, help="the real chatglm2-6b config.json and tokenizer.model")
    parser.add_argument("--msra_dir", required=True, help="MSRA as in ../shared/data/msra (bio/, ori_data/)")
    parser.add_argument("--work_dir", required=True)
    parser.add_argument("--packs", default="2048x2", help="packed runs: pack_tokens x rows per step, comma-separated")
    parser.add_argument("--predict_batch_sizes", default="32", help="predict.py runs, comma-separated batch sizes")
    parser.add_argument("--stages", default="process,train,packed,predict,chat,components")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--model_dir", default="", help="a model folder to use instead of random weights")
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU (or --tiny)")
    work, msra = Path(args.work_dir), Path(args.msra_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir, data_dir = Path(args.model_dir or work / ("tiny-model" if args.tiny else "model")), work / "data"
    if not model_dir.exists():
        started = time.time()
        if args.tiny:
            make_tiny_model("chatglm2-6b", model_dir, args.tokenizer_dir)
        else:
            make_tiny_model("chatglm2-6b", model_dir, args.tokenizer_dir, dtype=torch.bfloat16, full_size=True, device="cuda")
        print(f"random chatglm2-6b written to {model_dir} in {time.time() - started:.0f} s", flush=True)
    stages = args.stages.split(",")
    limit = ["--max_steps=6"] if args.tiny else []
    rows = []

    if "process" in stages:
        seconds = run("process", [sys.executable, "process.py", "--data_name=msra",
                                  f"--train_file={msra / 'bio' / 'val_sentences.txt'},{msra / 'ori_data' / 'msra_1000.txt'}",
                                  f"--dev_file={msra / 'bio' / 'test.txt'}", f"--output_dir={data_dir}", "--overwrite"], work)
        rows.append({"stage": "process.py (MSRA -> instruction data)", "wall_s": round(seconds, 1)})

    trainings = [("train", "batch 12", ["--per_device_train_batch_size=12"])] if "train" in stages else []
    for pack in args.packs.split(",") if "packed" in stages else []:
        tokens, rows_per_step = pack.split("x")
        trainings.append((f"train-packed-{pack}", f"packed {tokens} x {rows_per_step}",
                          ["--packing=true", f"--pack_tokens={tokens}", f"--per_device_train_batch_size={rows_per_step}"]))
    for stage, title, extra in trainings:
        run_dir = work / "runs" / stage
        seconds = run(stage, [sys.executable, "train_trainer.py", f"--model_dir={model_dir}", f"--train_file={data_dir / 'train.txt'}",
                              f"--output_dir={run_dir}", "--overwrite_output_dir=true", "--num_train_epochs=1", *SEED_STYLE, *extra, *limit], work)
        record = json.loads((run_dir / "adapter_model" / "train_args.json").read_text())
        metrics = record["metrics"]
        rows.append({"stage": f"train_trainer.py, 1 epoch, {title}", "kind": "train", "packed": "packed" in title,
                     "wall_s": round(seconds, 1), "script_s": round(metrics["train_runtime"], 1),
                     "real_tokens_per_s": round(metrics["num_input_tokens_seen"] / metrics["train_runtime"]),
                     "between_logs_tokens_per_s": metrics.get("steady_tokens_per_second"),
                     "first_step_s": metrics.get("first_step_seconds"),
                     "peak_gib": metrics.get("peak_memory_gib"), "train_loss": round(metrics["train_loss"], 4)})

    adapter = next(work / "runs" / stage / "adapter_model" for stage in ["train", *(f"train-packed-{p}" for p in args.packs.split(","))]
                   if (work / "runs" / stage / "adapter_model").exists())
    for batch_size in args.predict_batch_sizes.split(",") if "predict" in stages else []:
        out = work / f"predict-b{batch_size}"
        seconds = run(f"predict-b{batch_size}", [sys.executable, "predict.py", f"--model_dir={model_dir}", f"--lora_path={adapter}",
                                                  f"--dev_file={data_dir / 'dev.txt'}", f"--output_dir={out}", "--max_new_tokens=32",
                                                  f"--batch_size={batch_size}", *(["--num_samples=64"] if args.tiny else [])], work)
        metrics = json.loads((out / "metrics.json").read_text())
        samples = sum(1 for _ in open(out / "predictions.jsonl", encoding="utf-8"))
        rows.append({"stage": f"predict.py with the adapter, {samples} sentences, 32 new tokens, batch {batch_size}",
                     "kind": "predict", "wall_s": round(seconds, 1), "script_s": metrics["adapter"]["seconds"]})

    if "chat" in stages:
        started = time.perf_counter()
        chat = chat_timing(model_dir, adapter, ["文本：中国人民银行在北京召开会议。", "文本：王小明去了上海。", "文本：今天天气很好。"], 64)
        rows.append({"stage": "chat (load + 3 answers, 64 new tokens)", "kind": "chat", "wall_s": round(time.perf_counter() - started, 1),
                     "first_token_s": chat[0]["first_token_s"], "chat_tokens_per_s": [r["tokens_per_s"] for r in chat]})

    if "components" in stages and not args.tiny:  # the speed table's rows that these stages are made of, in this run
        components = work / "components.json"
        run("components", [sys.executable, "benchmarks/speed_table.py", f"--config_dir={Path(args.tokenizer_dir).parent}",
                           "--rows=decode-v2-b1,decode-v2-b16,lora-v2", f"--json={components}"], work)
        found = json.loads(components.read_text())
        for row in rows:
            if row.get("kind") == "train":
                row["of_component"] = f"{row['between_logs_tokens_per_s'] / found['lora-v2']['tokens_per_s']:.0%} of LoRA 8 x 512 ({found['lora-v2']['tokens_per_s']:,})"
            elif row.get("kind") == "chat" and row["chat_tokens_per_s"][-1]:
                row["of_component"] = f"{row['chat_tokens_per_s'][-1] / found['decode-v2-b1']['tokens_per_s']:.0%} of decode batch 1 ({found['decode-v2-b1']['tokens_per_s']})"
        rows.append({"stage": "components (speed_table.py): decode b1 / b16 tok/s, LoRA 8 x 512 tok/s",
                     "real_tokens_per_s": " / ".join(str(found[k]["tokens_per_s"]) for k in ("decode-v2-b1", "decode-v2-b16", "lora-v2")),
                     "peak_gib": found["lora-v2"]["peak_gib"]})

    rows += whole_job(rows)
    device = "CPU (--tiny)" if args.tiny else torch.cuda.get_device_name()
    model = args.model_dir or "ChatGLM2-6B random weights"
    print(f"\n# {device}, torch {torch.__version__}, {model}, {time.strftime('%Y-%m-%d')}")
    columns = ["stage", "wall_s", "script_s", "real_tokens_per_s", "between_logs_tokens_per_s", "first_step_s", "peak_gib",
               "train_loss", "first_token_s", "chat_tokens_per_s", "of_component"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
