"""How long a user waits for the first answer, and how fast decoding is from then on, for each decode loop of
stream_generate: random ChatGLM2-6B weights with the real config.json (or, --model glm-4-9b, GLM-4-9B: transformers'
GlmConfig defaults = glm-4-9b-chat-hf's config.json), bf16, each option in new processes with empty compile caches
(TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR in a fresh folder), as on a user's first run.

Two workloads per option, each in its own process, timed from the loaded model:
- chat: the first streamed token and the whole first answer (batch 1, --chat_tokens new tokens, a 48-token prompt),
  the decode speed of the first answer and of the next two, as a chat has them (not waiting for torch.compile), then,
  once every compilation has ended (compile_wait_s: how long that still took), the steady decode speed at batch 1
  and batch 16 (and how long the first batch-16 run took: a new batch size);
- predict (with --dev_file): the predict.py loop (utils.generation.generate_answers) over that file's records, batch
  32, 32 new tokens, from the first batch (compilation included) to the last answer.
Needs CUDA.

    python benchmarks/first_answer.py --config_dir ../shared/assets/tokenizers --dev_file data/msra/instruct_data/dev.txt \
        --options graph,graph-warm,compiled,graph-eager-elementwise --json first_answer.json
    python benchmarks/first_answer.py --config_dir ../shared/assets/tokenizers --model glm-4-9b --options auto,compiled
    python benchmarks/first_answer.py --config_dir ../shared/assets/tokenizers --model glm-4-9b --options auto \
        --profile first_answer.txt   # where the first answer's time goes (cProfile)

Options: auto, plain, static, graph, compiled (the `decode` modes); "-warm" reuses the caches of the option's earlier run
(a persistent compile cache); "-eager-elementwise" also turns off the fused element-wise kernels that prefill and the
step use on CUDA (ChatGLM2: norms, rotary, SwiGLU; GLM-4: transformers' own norms and MLPs, utils/glm_layers.py).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def chat_workload(model, decode, args):
    from generate_6b import random_prompt, timed
    from utils.decode_engine import NativeCompiler
    from utils.generation import time_generation

    def chat(tokens):  # as utils.generation.stream_chat_reply decodes: a chat does not wait for torch.compile
        return time_generation(model, random_prompt(model, 1, 48), tokens, decode, wait_for_compile=False)

    row = {}
    if args.profile:  # cProfile of the first answer alone, by cumulative time, into that file
        import cProfile
        import io
        import pstats

        profiler = cProfile.Profile()
        first, total = profiler.runcall(chat, args.chat_tokens)
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(80)
        Path(args.profile).write_text(text.getvalue())
    else:
        first, total = chat(args.chat_tokens)
    row.update(first_token_s=round(first, 2), first_answer_s=round(total, 2),
               first_answer_tokens_per_s=round((args.chat_tokens - 1) / (total - first), 1))
    print(f"first answer: {row}", flush=True)  # what a chat user waits for, before the longer measurements below
    speeds = []
    for _ in range(2):
        first, total = chat(args.chat_tokens)
        speeds.append(round((args.chat_tokens - 1) / (total - first), 1))
    row["next_answers_tokens_per_s"] = speeds
    chat(256)  # a longer cache: captured again
    if not hasattr(model, "static_decode_step"):  # a native model: until its compilations in the background end
        row["compile_wait_s"] = round(timed(NativeCompiler.of(model).wait)[1], 1)
    first, total = time_generation(model, random_prompt(model, 1, 48), 256, decode)
    row["b1_tokens_per_s"] = round(255 / (total - first), 1)
    if decode != "plain":
        batch = random_prompt(model, 16, 32)
        (_, first_run_s) = timed(lambda: time_generation(model, batch, 128, decode))
        row["b16_first_run_s"] = round(first_run_s, 2)
        first, total = time_generation(model, batch, 128, decode)
        row["b16_tokens_per_s"] = round(16 * 127 / (total - first), 1)
    return row


def predict_workload(model, decode, args):
    from utils.data_io import BadLines
    from utils.generation import generate_answers
    from utils.model_loading import load_tokenizer
    from utils.prompts import get_prompt_format
    from utils.records import read_instruction_records

    tokenizer = load_tokenizer(Path(args.config_dir) / "chatglm2-6b", "chatglm2-6b")
    records = read_instruction_records(Path(args.dev_file), BadLines(skip=False))
    prompt_format = get_prompt_format(tokenizer, "chatglm2-6b")
    started = time.perf_counter()
    answers = generate_answers(model, tokenizer, prompt_format, records, max_source_length=128, max_new_tokens=32,
                               batch_size=32, decode=decode)
    torch.cuda.synchronize()
    return {"predict_records": len(answers), "predict_s": round(time.perf_counter() - started, 1)}


def measure(option, workload, args):
    """One option and workload, in this process: returns its row."""
    from generate_6b import load_random_glm4, load_random_model, timed

    decode = option.split("-")[0]
    if args.model == "glm-4-9b":
        (model, load_s) = timed(lambda: load_random_glm4(fused="eager-elementwise" not in option))
    else:
        (model, load_s) = timed(lambda: load_random_model("chatglm2-6b", args.config_dir, torch.bfloat16))
        model.model_version = "chatglm2-6b"
        if "eager-elementwise" in option:
            sys.modules[type(model).__module__].FUSE_ELEMENTWISE = False
    args.loaded_at = time.perf_counter()
    with torch.inference_mode():
        row = {"load_s": round(load_s, 1)} | (chat_workload if workload == "chat" else predict_workload)(model, decode, args)
    compilations = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # graphs torch.compile made in this process
    return row | {"peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "compilations": compilations}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_dir", required=True, help="folder with chatglm2-6b/config.json and its tokenizer files")
    parser.add_argument("--model", choices=("chatglm2-6b", "glm-4-9b"), default="chatglm2-6b")
    parser.add_argument("--options", default="graph,graph-warm,compiled,graph-eager-elementwise")
    parser.add_argument("--dev_file", default="", help="instruction records for the predict loop (process.py's dev.txt)")
    parser.add_argument("--chat_tokens", type=int, default=64)
    parser.add_argument("--json", default="")
    parser.add_argument("--profile", default="", help="with --options of one option: where the cProfile of its "
                        "first answer goes (text, by cumulative time)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this option here and print its row
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("this benchmark needs a CUDA GPU")
    if args.one:
        option, workload = args.one.split(":")
        print("ROW " + json.dumps(measure(option, workload, args)), flush=True)
        return
    if args.profile and "," in args.options:
        sys.exit("--profile: name one option in --options (each would write the same file)")
    if args.model == "glm-4-9b" and args.dev_file:
        sys.exit("--model glm-4-9b: the predict workload (--dev_file) is ChatGLM2-6B's only")

    rows, caches = [], {}
    workloads = ["chat"] + (["predict"] if args.dev_file else [])
    for option in args.options.split(","):
        base = option.removesuffix("-warm")
        if option.endswith("-warm") and base not in caches:
            sys.exit(f"{option}: run {base} before it")
        cache_dir = caches.get(base) if option.endswith("-warm") else tempfile.mkdtemp(prefix="compile-cache-")
        caches[option] = caches[base] = cache_dir
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=f"{cache_dir}/inductor", TRITON_CACHE_DIR=f"{cache_dir}/triton")
        row = {"option": option}
        for workload in workloads:
            if workload == "predict" and base.startswith("plain"):
                continue
            command = [sys.executable, __file__, "--one", f"{base}:{workload}", "--config_dir", args.config_dir,
                       "--model", args.model, "--dev_file", args.dev_file, "--chat_tokens", str(args.chat_tokens),
                       "--profile", args.profile if workload == "chat" else ""]
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("ROW ")]
            if done.returncode or not lines:
                print(done.stdout[-3000:], done.stderr[-6000:], sep="\n")
                sys.exit(f"{option} {workload} failed (exit {done.returncode})")
            found = json.loads(lines[-1][4:])
            row |= {(f"predict_{key}" if workload == "predict" and key in ("peak_gib", "compilations") else key): value for key, value in found.items()
                    if not (workload == "predict" and key == "load_s")}
        print(json.dumps(row), flush=True)
        rows.append(row)

    print(f"\n# {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.model} random weights, bf16, {time.strftime('%Y-%m-%d')}")
    columns = ["option", "first_token_s", "first_answer_s", "first_answer_tokens_per_s", "next_answers_tokens_per_s",
               "compile_wait_s", "b1_tokens_per_s", "b16_first_run_s", "b16_tokens_per_s", "compilations", "predict_s", "predict_compilations",
               "peak_gib", "predict_peak_gib"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
