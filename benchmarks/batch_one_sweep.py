"""Batch-1 decode products per layer shape of ChatGLM2-6B and GLM-4-9B (the same four: 4608 x 4096, 4096 x 4096,
27392 x 4096, 4096 x 13696): cuBLAS and remote_scripts/chatglm2-6b/kernels.py's small_batch_linear over a grid of
launch configs, in bf16, int8 and int4. Each is timed as 28 products of distinct weights replayed from one CUDA graph,
as a decode step streams them (no L2 reuse), and printed as µs per product with the best configs first and
launch_config's choice. What kernels._batch_one_config's rule was read from. Needs CUDA; about 2 minutes on an H100.

    python benchmarks/batch_one_sweep.py [--formats bf16,int8,int4] [--precompile 14] [--json sweep.json]

--precompile N compiles every config in N processes first (they share triton's cache), which saves most of the time.

--chain times the configs inside a decode step instead: 28 x (QKV, dense, gate/up with SwiGLU in its launch, down), each
product taking the one before as its x, plus the output layer (65024 x 4096, int8 for the quantized formats, as
quantize() stores it), replayed from one CUDA graph. Each shape's candidates run with every other shape at
launch_config; printed as ms a step. A product timed against copies of itself is not the product inside the step
(docs/benchmarks.md, twenty-sixth session), so a launch_config change is chosen from this mode.

    python benchmarks/batch_one_sweep.py --chain [--formats int8] [--seconds 300] [--json chain.json]
"""
import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.model_loading import remote_module  # noqa: E402

kernels = remote_module("chatglm2-6b", "kernels")
quantization = remote_module("chatglm2-6b", "quantization")
SHAPES = [(4608, 4096), (4096, 4096), (27392, 4096), (4096, 13696)]
FORMATS = {"bf16": None, "int8": 8, "int4": 4}
LAYERS = 28


def candidates(N, K, bits, sm):
    out = [list(kernels.launch_config(1, N, K, bits, sm))]
    values_per_word = 8 if bits == 4 else 4  # the FMA loop's accumulator holds one value a weight word
    for block_n, block_k, warps, use_dot in itertools.product((16, 32, 64, 128, 256), (128, 256, 512), (4, 8), (0, 1)):
        if K % block_k or (bits == 4 and block_k < 128):
            continue
        if not use_dot and block_n * block_k // values_per_word > 64 * 32 * warps:
            continue  # FMA accumulator over 64 registers a thread
        if use_dot and block_n < 64 and bits == 4:
            continue
        if block_n == 256 and not (use_dot and bits == 4):
            continue
        row_blocks = -(-N // block_n)
        steps = K // block_k
        splits = {1, max(1, min(steps, -(-2 * sm // row_blocks))), max(1, min(steps, -(-4 * sm // row_blocks)))}
        for split in sorted(splits):
            config = [block_n, block_k, split, warps, 3 if use_dot else 1, use_dot]
            if config not in out:
                out.append(config)
    return out


def make_weights(N, K, bits, count):
    weights = []
    for _ in range(count):
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        if bits:
            stored, scale = quantization.quantize_weight(w, bits, scale_dtype=torch.bfloat16)
            weights.append((stored, scale))
            del w
        else:
            weights.append((w, None))
    return weights


def graph_ms(fn, reps=15):
    """Median ms of one replay of fn captured in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        times.append((start, end))
    torch.cuda.synchronize()
    ms = statistics.median(s.elapsed_time(e) for s, e in times)
    del graph
    return ms


def graph_us(fn):
    """µs a product of fn, which runs LAYERS of them."""
    return graph_ms(fn) * 1e3 / LAYERS


OUTPUT_LAYER = (65024, 4096)
STEP = {"qkv": (4608, 4096), "dense": (4096, 4096), "gate_up": (27392, 4096), "down": (4096, 13696)}


def chain_shapes(bits):
    """{name: (N, K, bits)} of a decode step's products; the output layer is int8 in the quantized formats, as
    quantize() stores it."""
    return {**{name: (N, K, bits) for name, (N, K) in STEP.items()}, "head": (*OUTPUT_LAYER, 8 if bits else None)}


def chain_step(weights, head, bits, configs):
    """One decode step's products, each shape at configs[name] (None: launch_config), from a fixed x."""
    def product(x, name, weight_and_scale, shape_bits=bits, gated=False):
        weight, scale = weight_and_scale
        return kernels.small_batch_linear(x, weight, None, scale, shape_bits, gated=gated, config=configs.get(name))

    x = torch.ones(1, 4096, device="cuda", dtype=torch.bfloat16)
    for qkv_w, dense_w, gate_up_w, down_w in zip(*(weights[name] for name in STEP)):
        attention = product(x, "qkv", qkv_w)[:, :4096].contiguous()  # stands in for the attention's output
        x = product(attention, "dense", dense_w)
        x = product(product(x, "gate_up", gate_up_w, gated=True), "down", down_w)
    return product(x, "head", head, chain_shapes(bits)["head"][2])


def sweep_in_chain(fmt, bits, sm, seconds):
    """{shape: [(ms a step, config)], fastest first} for every shape of the step, the others at launch_config."""
    weights = {name: make_weights(N, K, bits, LAYERS) for name, (N, K) in STEP.items()}
    head, = make_weights(*chain_shapes(bits)["head"], 1)
    base_ms = graph_ms(lambda: chain_step(weights, head, bits, {}))
    print(f"\n## {fmt}: launch_config everywhere {base_ms:.4f} ms a step", flush=True)
    started, results = time.perf_counter(), {}
    for name, (N, K, shape_bits) in chain_shapes(bits).items():
        default = list(kernels.launch_config(1, N, K, shape_bits, sm))
        rows = []
        for config in candidates(N, K, shape_bits, sm):
            if time.perf_counter() - started > seconds:
                print("  (time limit)", flush=True)
                break
            try:
                rows.append((graph_ms(lambda: chain_step(weights, head, bits, {name: config})), config))
            except Exception as failure:
                print(f"  {name} {config}: {type(failure).__name__}: {str(failure)[:150]}", flush=True)
        rows.sort()
        mark = {str(default): " launch_config"}
        print(f"{name} {N}x{K}: " + ", ".join(f"{c}{mark.get(str(c), '')} {ms:.4f}" for ms, c in rows[:5]) +
              "".join(f"; launch_config {ms:.4f}" for ms, c in rows[5:] if c == default), flush=True)
        results[name] = rows
    print(f"launch_config everywhere again: {graph_ms(lambda: chain_step(weights, head, bits, {})):.4f} ms", flush=True)
    return results


def compile_jobs(formats, sm, chain):
    """(N, K, bits, gated, config) of every kernel the sweep will launch."""
    if not chain:
        return [(N, K, bits, False, config) for N, K in SHAPES for bits in formats.values()
                for config in candidates(N, K, bits, sm)]
    jobs = []
    for bits in formats.values():
        for name, (N, K, shape_bits) in chain_shapes(bits).items():
            jobs += [(N, K, shape_bits, name == "gate_up", config) for config in candidates(N, K, shape_bits, sm)]
    return jobs


def precompile(jobs):
    """Compile jobs (this process's share of them, under --worker) into triton's cache."""
    for N, K, bits, gated, config in jobs:
        (stored, scale), = make_weights(N, K, bits, 1)
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        try:
            kernels.small_batch_linear(x, stored, None, scale, bits, gated=gated, config=config)
        except Exception as error:
            print(f"compile {N}x{K} bits {bits} {config}: {type(error).__name__} {str(error)[:120]}", flush=True)
    torch.cuda.synchronize()


def sweep_each_shape(formats, sm):
    """Every shape's candidates timed as LAYERS products of distinct weights; [{N, K, format, rows}]."""
    results = []
    for N, K in SHAPES:
        for fmt, bits in formats.items():
            weights = make_weights(N, K, bits, LAYERS)
            x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
            w0, s0 = weights[0]
            dense0 = quantization.dequantize_weight(w0, s0, bits, torch.float64) if bits else w0.double()
            reference = (x.double() @ dense0.T).float()
            rows = []
            if not bits:
                rows.append(("cublas", graph_us(lambda: [F.linear(x, w) for w, _ in weights])))
            default = kernels.launch_config(1, N, K, bits, sm)
            for config in candidates(N, K, bits, sm):
                try:
                    out = kernels.small_batch_linear(x, w0, None, s0, bits, config=config)
                    error = ((out.float() - reference).norm() / reference.norm()).item()
                    us = graph_us(lambda: [kernels.small_batch_linear(x, w, None, s, bits, config=config)
                                           for w, s in weights])
                    again = kernels.small_batch_linear(x, w0, None, s0, bits, config=config)
                except Exception as failure:
                    print(f"  {config}: {type(failure).__name__}: {str(failure)[:150]}", flush=True)
                    continue
                tag = " launch_config" if config == list(default) else ""
                rows.append((str(config) + tag, us, error, torch.equal(out, again)))
            stored_bytes = w0.numel() * w0.element_size()
            best = sorted(rows, key=lambda r: r[1])
            base = [r for r in rows if r[0].endswith("launch_config")]
            print(f"\n## {N}x{K} {fmt} ({stored_bytes / 1e6:.1f} MB a layer)")
            for row in best[:8] + base + [r for r in rows if r[0] == "cublas"]:
                extra = f" err {row[2]:.1e} same {row[3]}" if len(row) > 2 else ""
                print(f"  {row[1]:8.2f} us  {stored_bytes / row[1] / 1e6:6.2f} TB/s  {row[0]}{extra}", flush=True)
            results.append({"N": N, "K": K, "format": fmt, "rows": rows})
            del weights
            torch.cuda.empty_cache()
    return results


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--precompile", type=int, default=0)
    parser.add_argument("--worker", type=str, default="")
    parser.add_argument("--formats", default=",".join(FORMATS), help="of " + ", ".join(FORMATS))
    parser.add_argument("--chain", action="store_true", help="time the configs inside a decode step's products")
    parser.add_argument("--seconds", type=float, default=600, help="--chain: stop trying configs of a format after")
    parser.add_argument("--json")
    args = parser.parse_args()
    formats = {name: FORMATS[name] for name in args.formats.split(",")}
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    jobs = compile_jobs(formats, sm, args.chain)
    if args.worker:
        index, count = map(int, args.worker.split("/"))
        precompile(jobs[index::count])
        return
    print(f"# {torch.cuda.get_device_name()} ({sm} SMs), {len(jobs)} configs", flush=True)
    if args.precompile:
        started = time.perf_counter()
        passed = ["--formats", args.formats] + (["--chain"] if args.chain else [])
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", f"{i}/{args.precompile}"] + passed)
                 for i in range(args.precompile)]
        for proc in procs:
            proc.wait()
        print(f"precompiled in {time.perf_counter() - started:.0f} s", flush=True)
    if args.chain:
        results = {fmt: sweep_in_chain(fmt, bits, sm, args.seconds) for fmt, bits in formats.items()}
    else:
        results = sweep_each_shape(formats, sm)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "results": results}, handle)


if __name__ == "__main__":
    main()
