"""Many users at once: N concurrent clients streaming chat completions from api_server.py through the official `openai`
client, on real prompts (instruction records, e.g. MSRA's), greedy. Prints per client count the aggregate tokens/s,
time to first token p50/p95, per-client tokens/s and errors, and how many answers equal the same request served
alone (one client, one request at a time).

Time to first token is the server's (its INFO line per answer: from the request entering the scheduler's line to its
first token, the wait for a row included). A client sees only text, and the server holds back leading whitespace and
the last character (ChatGLM's post-processing), so the first text can come many tokens later; with random weights,
whose greedy answers often begin with such tokens, it says little about the server. It is shown too, as "first text
p95".

    python benchmarks/serve_load.py --model_dir model_hub/chatglm2-small --dev_file data/demo_ner/instruct_data/dev.txt
    python benchmarks/serve_load.py --model_dir /path/chatglm2-6b --dev_file data/msra/instruct_data/dev.txt \
        --clients 1,16 -- --max_batch=16 --dtype=bf16

The options after `--` are api_server.py's own (its batch, dtype, decoding mode...).

The server runs as a user starts it (`python api_server.py ...`, a process of its own, on a free port of 127.0.0.1).
"""
import argparse
import json
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from openai import OpenAI

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from utils.prompts import user_message  # noqa: E402
from utils.records import read_instruction_records  # noqa: E402


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(args, port, log_path):
    command = [sys.executable, "api_server.py", f"--model_dir={args.model_dir}", f"--lora_path={args.lora_path}",
               f"--port={port}", "--do_sample=false", f"--max_new_tokens={args.max_tokens}",
               f"--max_input_tokens={args.max_input_tokens}", "--log_level=info", *args.server_args]
    log = open(log_path, "w")
    server = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    started = time.perf_counter()
    while time.perf_counter() - started < args.start_timeout:
        if server.poll() is not None:
            raise SystemExit(f"api_server.py exited with {server.returncode}:\n{Path(log_path).read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return server, time.perf_counter() - started
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit(f"api_server.py did not answer within {args.start_timeout} s; its log: {log_path}")


def stream_one(client, model, question, max_tokens):
    """(answer text, completion tokens, seconds to the first text, seconds in all, the answer's id) of one streamed
    request."""
    started, first, text, tokens, answer_id = time.perf_counter(), None, [], 0, None
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], stream=True,
                                            max_tokens=max_tokens, temperature=0, stream_options={"include_usage": True})
    for chunk in stream:
        answer_id = chunk.id
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.delta.content:
                first = first or time.perf_counter() - started
                text.append(choice.delta.content)
    return "".join(text), tokens, first or time.perf_counter() - started, time.perf_counter() - started, answer_id


def first_token_times(log_path):
    """{answer id: seconds from entering the scheduler's line to its first token}, from api_server.py's INFO lines."""
    found = re.findall(r"(chatcmpl-\w+): .* first token after ([\d.]+) s", Path(log_path).read_text())
    return {answer_id: float(seconds) for answer_id, seconds in found}


def load_round(client, model, questions, clients, max_tokens):
    """Each of `clients` threads sends its share of the questions one after another; (results by question, wall s)."""
    results, errors = {}, []

    def client_loop(first):
        for index in range(first, len(questions), clients):
            try:
                results[index] = stream_one(client, model, questions[index], max_tokens)
            except Exception as err:  # counted and shown: a load test reports errors rather than stopping
                errors.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=client_loop, args=(first,)) for first in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors, time.perf_counter() - started


def percentile(values, share):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(share * (len(ordered) - 1))))] if ordered else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--lora_path", default="none")
    parser.add_argument("--dev_file", required=True, help="instruction records; their questions are the prompts")
    parser.add_argument("--clients", default="1,8", help="client counts, comma-separated")
    parser.add_argument("--requests_per_client", type=int, default=4)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--max_input_tokens", type=int, default=512)
    parser.add_argument("--start_timeout", type=float, default=600)
    parser.add_argument("--log_dir", default="/tmp/serve_load")
    parser.add_argument("--json", default="")
    parser.add_argument("--skip_alone", action="store_true",
                        help="skip the round that answers each request alone (one client): no 'equal to alone' column")
    argv = sys.argv[1:]
    ours, server_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = parser.parse_args(ours)
    args.server_args = server_args  # api_server.py's own options, after `--`

    counts = [int(count) for count in args.clients.split(",")]
    records = read_instruction_records(args.dev_file)
    questions = [user_message(records[index % len(records)]) for index in range(max(counts) * args.requests_per_client)]
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = Path(args.log_dir) / "api_server.log"
    server, start_s = start_server(args, port, log_path)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    try:
        alone, alone_errors = ({}, []) if args.skip_alone else load_round(client, model, questions, 1, args.max_tokens)[:2]
        rows = []
        for clients in counts:
            subset = questions[:clients * args.requests_per_client]
            results, errors, wall = load_round(client, model, subset, clients, args.max_tokens)
            tokens = sum(result[1] for result in results.values())
            equal = sum(results[index][0] == alone[index][0] for index in results if index in alone)
            first_token = first_token_times(log_path)
            ttft = [first_token[r[4]] for r in results.values() if r[4] in first_token]
            if len(ttft) != len(results):
                raise SystemExit(f"{log_path}: first-token times of {len(ttft)} of the {len(results)} answers")
            rows.append({"clients": clients, "requests": len(subset), "tokens": tokens, "wall_s": round(wall, 2),
                         "tokens_per_s": round(tokens / wall, 1),
                         "ttft_p50_s": round(percentile(ttft, 0.5), 3), "ttft_p95_s": round(percentile(ttft, 0.95), 3),
                         "first_text_p95_s": round(percentile([r[2] for r in results.values()], 0.95), 3),
                         "client_tokens_per_s": round(statistics.mean(r[1] / r[3] for r in results.values()), 1),
                         "errors": len(errors), "equal_to_alone": "" if args.skip_alone else f"{equal}/{len(results)}",
                         "first_error": errors[0] if errors else ""})
    finally:
        server.terminate()
        server.wait(timeout=60)
    one = rows[0]["tokens_per_s"] if rows and rows[0]["clients"] == 1 else None
    print(f"\n# api_server.py {args.model_dir} {' '.join(args.server_args)}; ready in {start_s:.1f} s; {args.max_tokens} tokens "
          f"at most per answer, greedy; {time.strftime('%Y-%m-%d')}")
    print("| clients | requests | tokens/s (all) | x one client | TTFT p50 | TTFT p95 | first text p95 | tokens/s per client "
          "| errors | equal to alone |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        ratio = f"{row['tokens_per_s'] / one:.2f}" if one else ""
        print(f"| {row['clients']} | {row['requests']} | {row['tokens_per_s']:,} | {ratio} | {row['ttft_p50_s']:.3f} s | "
              f"{row['ttft_p95_s']:.3f} s | {row['first_text_p95_s']:.3f} s | {row['client_tokens_per_s']} | "
              f"{row['errors']} | {row['equal_to_alone']} |")
    if alone_errors or any(row["errors"] for row in rows):
        print("errors:", alone_errors[:1] + [row["first_error"] for row in rows if row["errors"]])
    if args.json:
        Path(args.json).write_text(json.dumps({"start_s": start_s, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
