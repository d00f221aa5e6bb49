"""Decode-time linear layers: cuBLAS F.linear vs remote_scripts/<model>/kernels.py small_batch_linear, on CUDA.

For each ChatGLM-6B / ChatGLM2-6B weight shape, M in {1, 16} rows and each weight format (bf16, int8, int4), prints
one markdown row: F.linear on the dequantized bf16 weight and small_batch_linear on the stored weight, in ms and GB/s
(bytes of the weight each reads / time), the speed-up, and the relative error of both against an fp32 reference of
the same dequantized weight (the kernel must stay under 1e-2; the script exits non-zero otherwise, or if replaying
the kernel in a CUDA graph changes a bit). The int8/int4 rows also time the layers' present path in quantization.py
(dequantize the whole weight, then F.linear).

Timing: each call is captured in a CUDA graph and replayed, so the numbers are GPU time without Python launch
overhead (decoding runs these layers inside CUDA graphs); every replay is preceded by a 256 MB write that evicts
the weight from L2, and the median over the replays is reported (as triton.testing.do_bench(return_mode="median")).
The eager column is one plain Python call of small_batch_linear, launch overhead included. A torch.compile
(mode="reduce-overhead", fullgraph) check of the op runs first. About 1-2 minutes on an H100.

    python benchmarks/kernel_bench.py [--sweep] [--json out.json]

--sweep also times a few neighbouring launch configurations per row (other split count, block size, inner loop)
and prints the best one next to launch_config's choice, to retune the heuristic (a few minutes more).

--attention times the decode step's attention instead: triton_decode_attention (rotary, cache write and grouped
attention in one launch) against what the step runs without it (the rotary kernel, two index_copy, SDPA over the
static cache with its mask), for ChatGLM2's heads (32 queries, 2 key/value groups, 128 wide) at batch 1 and 16 and
several cache sizes and fill levels, with the error of both against float64 attention.

    python benchmarks/kernel_bench.py --attention [--sweep]

With --sweep, each attention row also times other (block_n, chunk) launch choices and prints the fastest.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from utils.model_loading import remote_module  # noqa: E402

SHAPES = [(4608, 4096), (4096, 4096), (27392, 4096), (4096, 13696), (12288, 4096), (16384, 4096), (4096, 16384),
          (65024, 4096), (130528, 4096)]
ROWS = (1, 16)
FORMATS = {"bf16": None, "int8": 8, "int4": 4}
MAX_ERROR = 1e-2

kernels = remote_module("chatglm2-6b", "kernels")
quantization = remote_module("chatglm2-6b", "quantization")
_flush = None


def gpu_time_ms(fn, reps=40, warmup=5):
    """(median GPU ms of fn replayed from a CUDA graph with L2 evicted before every replay, the output of the last
    replay)."""
    global _flush
    if _flush is None:
        _flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up outside the graph (compilation, allocator)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    times = []
    for rep in range(warmup + reps):
        _flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        if rep >= warmup:
            times.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in times), out.clone()  # clone: the graph's pool goes with it


def eager_time_ms(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        _flush.zero_()
        torch.cuda.synchronize()
        started = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - started) * 1e3)
    return statistics.median(samples)


def relative_error(out, reference):
    return ((out.float() - reference).norm() / reference.norm()).item()


def compile_check():
    """small_batch_linear inside torch.compile(mode="reduce-overhead", fullgraph=True) gives the eager bits."""
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    stored, scale = quantization.quantize_weight(torch.randn(4608, 4096, device="cuda"), 4, scale_dtype=torch.bfloat16)
    bias = torch.randn(4608, device="cuda", dtype=torch.bfloat16)

    def layer(x):
        return kernels.small_batch_linear(x, stored, bias, scale, 4) * 2

    started = time.perf_counter()
    try:
        compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
        with torch.no_grad():
            outs = [compiled(x).clone() for _ in range(4)]
        expected = layer(x)
        same = all(torch.equal(out, expected) for out in outs)
        return f"{'OK' if same else 'DIFFERENT BITS'} ({time.perf_counter() - started:.0f} s)", same
    except Exception as err:  # report and go on with the timings
        return f"FAILED: {type(err).__name__}: {str(err)[:400]}", False


def sweep_configs(M, N, K, bits, default):
    """launch_config's choice and its neighbours: split x0.5 / x2, block_n x0.5 / x2, 8 warps, the other loop."""
    block_n, block_k, split_k, num_warps, num_stages, use_dot = default
    steps = K // block_k
    candidates = [default]
    for split in (max(1, split_k // 2), min(steps, split_k * 2)):
        candidates.append([block_n, block_k, split, num_warps, num_stages, use_dot])
    for bn in (block_n // 2, block_n * 2):
        fma_values = bn * (block_k // 8 if bits == 4 else block_k)  # fp32 accumulator of the FMA loop
        if 16 <= bn <= 256 and (use_dot or fma_values <= 8192):
            candidates.append([bn, block_k, split_k, num_warps, num_stages, use_dot])
    candidates.append([block_n, block_k, split_k, 8, num_stages, use_dot])
    if M == 1:  # the other inner loop, with the shape rule of launch_config for it
        if use_dot:
            bk = {0: 128, 8: 256, 4: 256}[bits or 0]
            while K % bk:
                bk //= 2
            bn = 8192 // (bk // 8 if bits == 4 else bk)
            bn = min(bn, 128)
            candidates.append([bn, bk, kernels.split_count(M, N, K, bits or 0, bn, bk), 4, 1, 0])
        else:
            candidates.append([64, block_k, kernels.split_count(M, N, K, bits or 0, 64, block_k), 4, 3, 1])
    unique = []
    for config in candidates:
        if config not in unique:
            unique.append(config)
    return unique


ATTENTION_CASES = [(1, 256, 40), (1, 512, 300), (1, 2048, 1500), (1, 8192, 8000), (16, 256, 200), (16, 2048, 1000)]


ATTENTION_SWEEP = [(block_n, chunk) for block_n in (32, 64, 128) for chunk in (128, 256, 512, 1024)]


def attention_rows(sweep=False, heads=32, groups=2, head_dim=128, dtype=torch.bfloat16):
    """The decode attention rows (see --attention); returns the failures (error above the eager step's + 1e-2).
    sweep: also time each (block_n, chunk) of ATTENTION_SWEEP and print the fastest."""
    modeling = remote_module("chatglm2-6b", "modeling_chatglm")
    columns = "| batch | cache slots | filled | fused ms | eager ms | speed-up | fused err | eager err |"
    print(columns + (" best (block_n, chunk) | best ms |" if sweep else ""))
    print("|---|---|---|---|---|---|---|---|" + ("---|---|" if sweep else ""), flush=True)
    failures = []
    for batch, capacity, slot in ATTENTION_CASES:
        default = (kernels.DECODE_BLOCK_N, kernels.decode_attention_chunk(
            batch * groups, capacity, kernels.DECODE_BLOCK_N, torch.cuda.get_device_properties(0).multi_processor_count))
        qkv = torch.randn(batch, 1, (heads + 2 * groups) * head_dim, device="cuda", dtype=dtype)
        cos, sin = modeling.RotaryEmbedding(head_dim // 2, device="cuda")(torch.full((batch, 1), slot, device="cuda"), dtype)
        keys, values = (torch.randn(batch, groups, capacity, head_dim, device="cuda", dtype=dtype) for _ in range(2))
        valid = torch.zeros(batch, capacity, dtype=torch.bool, device="cuda")
        valid[:, : slot + 1] = True
        slot_tensor = torch.tensor([slot], device="cuda")
        eager_keys, eager_values = keys.clone(), values.clone()

        def fused(config=None):
            return kernels.triton_decode_attention(qkv, cos, sin, keys, values, valid, slot_tensor, heads, groups,
                                                   head_dim, config=config)

        def eager():  # SelfAttention.forward's static-cache step without the fused kernel
            rotated = kernels.triton_rotary(qkv, cos, sin, heads + groups, head_dim)
            q, k = rotated.transpose(1, 2).split([heads, groups], dim=1)
            v = qkv[..., (heads + groups) * head_dim :].unflatten(-1, (groups, head_dim)).transpose(1, 2)
            eager_keys.index_copy_(2, slot_tensor, k)
            eager_values.index_copy_(2, slot_tensor, v)
            grouped = q.reshape(batch, groups, heads // groups, head_dim)
            out = F.scaled_dot_product_attention(grouped, eager_keys, eager_values, attn_mask=valid[:, None, None, :])
            return out.reshape(batch, 1, heads * head_dim)

        fused_ms, fused_out = gpu_time_ms(fused)
        eager_ms, eager_out = gpu_time_ms(eager)
        queries = kernels.triton_rotary(qkv, cos, sin, heads + groups, head_dim)[:, 0, :heads]
        exact = F.scaled_dot_product_attention(
            queries.reshape(batch, groups, heads // groups, head_dim).double(), eager_keys.double(),
            eager_values.double(), attn_mask=valid[:, None, None, :]).reshape(batch, 1, -1)
        fused_err, eager_err = relative_error(fused_out, exact.float()), relative_error(eager_out, exact.float())
        if fused_err > eager_err + 1e-2 or not (torch.equal(keys, eager_keys) and torch.equal(values, eager_values)):
            failures.append(f"batch {batch}, {slot + 1} of {capacity} slots: error {fused_err:.1e}, or the cache differs")
        best = ""
        if sweep:
            timings = [(fused_ms, default)]
            for config in ATTENTION_SWEEP:
                if config != default:
                    ms, out = gpu_time_ms(lambda: fused(config))
                    if relative_error(out, exact.float()) > eager_err + 1e-2:
                        failures.append(f"batch {batch}, {slot + 1} of {capacity} slots, config {config}: error")
                    timings.append((ms, config))
            best_ms, best_config = min(timings)
            best = f" {best_config} | {best_ms:.4f} |"
        print(f"| {batch} | {capacity} | {slot + 1} | {fused_ms:.4f} | {eager_ms:.4f} | {eager_ms / fused_ms:.2f}x | "
              f"{fused_err:.1e} | {eager_err:.1e} |{best}", flush=True)
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", action="store_true", help="time the decode attention kernel instead")
    parser.add_argument("--sweep", action="store_true", help="also time neighbouring launch configurations")
    parser.add_argument("--no_compile_check", action="store_true")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernel_bench.py needs a CUDA GPU")
    import triton

    started = time.perf_counter()
    torch.manual_seed(0)
    device_name = torch.cuda.get_device_name()
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"# {device_name} ({sm_count} SMs), torch {torch.__version__}, triton {triton.__version__}", flush=True)
    if args.attention:
        failures = attention_rows(sweep=args.sweep)
        if failures:
            sys.exit("FAILED:\n" + "\n".join(failures))
        return
    compile_ok = True
    if not args.no_compile_check:
        verdict, compile_ok = compile_check()
        print(f"torch.compile(mode='reduce-overhead', fullgraph=True) of small_batch_linear: {verdict}", flush=True)

    columns = ["N x K", "M", "format", "F.linear ms", "GB/s", "kernel ms", "GB/s ", "speed-up", "kernel eager ms",
               "dequant+linear ms", "F.linear err", "kernel err", "config"]
    if args.sweep:
        columns += ["best config", "best ms"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns), flush=True)
    rows, failures = [], []
    for N, K in SHAPES:
        weight = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        for fmt, bits in FORMATS.items():
            if bits:
                stored, scale = quantization.quantize_weight(weight, bits, scale_dtype=torch.bfloat16)
                dense = quantization.dequantize_weight(stored, scale, bits, torch.bfloat16)
            else:
                stored, scale, dense = weight, None, weight
            stored_bytes = stored.numel() * stored.element_size()
            for M in ROWS:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                reference = x.float() @ (quantization.dequantize_weight(stored, scale, bits, torch.float32) if bits
                                         else weight.float()).T
                config = kernels.launch_config(M, N, K, bits, sm_count)
                cublas_ms, _ = gpu_time_ms(lambda: F.linear(x, dense))

                def kernel(config=None):
                    return kernels.small_batch_linear(x, stored, None, scale, bits, config=config)

                def dequantize_and_linear():  # what quantization.QuantizedLinear does today
                    return F.linear(x, quantization.dequantize_weight(stored, scale, bits, x.dtype))

                kernel_ms, graph_out = gpu_time_ms(kernel)
                eager_out = kernel()
                eager_ms = eager_time_ms(kernel)
                dequant_ms = gpu_time_ms(dequantize_and_linear)[0] if bits else None
                kernel_err = relative_error(eager_out, reference)
                row = {
                    "N": N, "K": K, "M": M, "format": fmt, "cublas_ms": cublas_ms, "kernel_ms": kernel_ms,
                    "cublas_gbs": N * K * 2 / cublas_ms / 1e6, "kernel_gbs": stored_bytes / kernel_ms / 1e6,
                    "kernel_eager_ms": eager_ms, "dequant_linear_ms": dequant_ms,
                    "cublas_err": relative_error(F.linear(x, dense), reference), "kernel_err": kernel_err,
                    "config": config, "repeatable": torch.equal(eager_out, graph_out),
                }
                if kernel_err >= MAX_ERROR or not row["repeatable"]:
                    failures.append(f"{N}x{K} M={M} {fmt}: error {kernel_err:.2e}, repeatable {row['repeatable']}")
                if args.sweep:
                    best = (kernel_ms, config)
                    for candidate in sweep_configs(M, N, K, bits, config)[1:]:
                        try:
                            ms, out = gpu_time_ms(lambda: kernel(candidate))
                            err = relative_error(out, reference)
                        except Exception as failure:  # e.g. out of shared memory for one candidate
                            print(f"  {candidate}: {type(failure).__name__}: {str(failure)[:200]}", flush=True)
                            continue
                        if err < MAX_ERROR and ms < best[0]:
                            best = (ms, candidate)
                    row["best_ms"], row["best_config"] = best
                rows.append(row)
                cells = [f"{N}x{K}", M, fmt, f"{cublas_ms:.4f}", f"{row['cublas_gbs']:.0f}", f"{kernel_ms:.4f}",
                         f"{row['kernel_gbs']:.0f}", f"{cublas_ms / kernel_ms:.2f}x", f"{eager_ms:.4f}",
                         f"{dequant_ms:.4f}" if dequant_ms is not None else "-", f"{row['cublas_err']:.1e}",
                         f"{kernel_err:.1e}", " ".join(map(str, config))]
                if args.sweep:
                    cells += [" ".join(map(str, row["best_config"])), f"{row['best_ms']:.4f}"]
                print("| " + " | ".join(map(str, cells)) + " |", flush=True)
            del stored, scale, dense
        del weight
        torch.cuda.empty_cache()
    print(f"config = block_n block_k split_k num_warps num_stages use_dot; GB/s = stored weight bytes / time "
          f"(F.linear: bf16 bytes). Total {time.perf_counter() - started:.0f} s.")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device_name, "torch": torch.__version__,
                                               "triton": triton.__version__, "rows": rows}, indent=2))
    if failures or not compile_ok:
        sys.exit("FAILED:\n" + "\n".join(failures + ([] if compile_ok else ["torch.compile check"])))
    print("all rows: kernel error < 1e-2, CUDA-graph replay bit-identical to eager")


if __name__ == "__main__":
    main()
