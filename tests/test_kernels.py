"""remote_scripts/<version>/kernels.py, the Triton kernel for decode-time linear layers, on CPU.

There is no GPU here, so the kernels run in Triton's interpreter (TRITON_INTERPRET=1, which must be set before triton
is imported: one subprocess runs every numeric case, started when the tests are collected, beside the other tests). Each case is compared with a float64 reference of
F.linear(x, dequantized weight, bias) on tiny shapes, with the launch configuration of the heuristic and with forced
ones (split-K with uneven splits, both inner loops); the cases with bias run twice to check bit-identical output. The launch
heuristic, the predicate and the import without triton run in this process.
"""
import importlib
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, background_priority
from utils.model_loading import remote_module

REAL_SHAPES = [(4608, 4096), (4096, 4096), (27392, 4096), (4096, 13696), (12288, 4096), (16384, 4096), (4096, 16384),
               (65024, 4096), (130528, 4096)]
TOLERANCE = {"bf16": 1e-2, "fp16": 2e-3}

# (name, N, K, config or None). None: launch_config's choice. Forced configs are
# [block_n, block_k, split_k, num_warps, num_stages, use_dot]; the FMA loop (use_dot 0) serves M == 1 only.
SHAPES = [
    ("auto-130x64", 130, 64, None),  # N not a multiple of the block, K one step
    ("auto-64x256", 64, 256, None),
    ("split-uneven-130x192", 130, 192, [32, 64, 2, 4, 1, 1]),  # 3 K steps in 2 splits (2 + 1), dot loop
    ("split-3-100x256-fma", 100, 256, [16, 64, 3, 4, 1, 0]),  # 4 steps in 3 splits -> 2 splits of 2, FMA loop
    ("split-4-260x256", 260, 256, [64, 64, 4, 4, 3, 1]),
    ("tall-int8-130x512-fma", 130, 512, [64, 256, 1, 4, 1, 0]),  # tall int8's rows and steps; 130 rows, 3 blocks
]

INTERPRETER_SCRIPT = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
from utils.model_loading import remote_module

kernels = remote_module("chatglm2-6b", "kernels")
quantization = remote_module("chatglm2-6b", "quantization")
shapes, out_path = json.loads(sys.argv[2]), sys.argv[3]
assert kernels._INTERPRETED, "TRITON_INTERPRET=1 did not reach triton"
dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
results = {}
generator = torch.Generator().manual_seed(0)
for name, N, K, config in shapes:
    for dtype_name, dtype in dtypes.items():
        for fmt in ("float", "int8", "int4"):
            bits = {"float": None, "int8": 8, "int4": 4}[fmt]
            for M in (1, 3, 16):
                if config is not None and not config[5] and M > 1:
                    continue
                for with_bias in (False, True):
                    weight = torch.randn(N, K, generator=generator)
                    x = torch.randn(M, K, generator=generator).to(dtype)
                    if M == 16:  # leading dims [2, 8] and a row stride wider than K
                        x = torch.cat((x, x[:, :64]), dim=1)[:, :K].reshape(2, 8, K)
                    bias = torch.randn(N, generator=generator).to(dtype) if with_bias else None
                    if bits:
                        stored, scale = quantization.quantize_weight(weight, bits, scale_dtype=dtype)
                        exact = quantization.dequantize_weight(stored, scale, bits, torch.float64)
                    else:
                        stored, scale = weight.to(dtype), None
                        exact = stored.double()
                    reference = x.double() @ exact.T + (bias.double() if with_bias else 0)
                    out = kernels.small_batch_linear(x, stored, bias, scale, bits, config=config)
                    # Repeat once per shape, format and M (the interpreter is slow): the same bits again?
                    again = kernels.small_batch_linear(x, stored, bias, scale, bits, config=config) if with_bias else out
                    key = f"{name}/{dtype_name}/{fmt}/M{M}/{'bias' if with_bias else 'nobias'}"
                    results[key] = {
                        "error": ((out.double() - reference).norm() / reference.norm()).item(),
                        "identical": torch.equal(out, again),
                        "shape_ok": out.shape == x.shape[:-1] + (N,) and out.dtype == dtype,
                    }

# The split programs' counters are zero again after every call (the split configs above ran).
results["tickets_zero"] = all(int(t.abs().sum()) == 0 for t in kernels._SPLIT_TICKETS.values()) and bool(kernels._SPLIT_TICKETS)

def applies(x, k=None):
    return kernels.small_batch_kernel_applies(x, x.shape[-1] if k is None else k)

bf16 = torch.bfloat16
needs_grad = torch.randn(1, 64, dtype=bf16, requires_grad=True)
with torch.no_grad():
    no_grad_ok = applies(needs_grad)
results["predicate"] = {
    "valid": applies(torch.randn(3, 64, dtype=bf16)) and applies(torch.randn(2, 8, 128, dtype=torch.float16)),
    "m16": applies(torch.randn(16, 64, dtype=bf16)),
    "m17": applies(torch.randn(17, 64, dtype=bf16)),
    "k96": applies(torch.randn(1, 96, dtype=bf16)),
    "int4_k64": kernels.small_batch_kernel_applies(torch.randn(1, 64, dtype=bf16), 64, 4),
    "int4_k128": kernels.small_batch_kernel_applies(torch.randn(1, 128, dtype=bf16), 128, 4),
    "k_mismatch": applies(torch.randn(1, 64, dtype=bf16), 128),
    "fp32": applies(torch.randn(1, 64)),
    "grad": applies(needs_grad),
    "grad_under_no_grad": no_grad_ok,
}
one = torch.randn(1, 1, 256, generator=generator).to(bf16)
layer = torch.nn.Linear(256, 130).to(bf16)
exact = one.double() @ layer.weight.double().T + layer.bias.double()

class Doubled(torch.nn.Linear):  # not a plain nn.Linear: decode_product calls it as it is
    def forward(self, x):
        return 2 * super().forward(x)

doubled = Doubled(256, 130).to(bf16)
with torch.no_grad():
    doubled.load_state_dict(layer.state_dict())
    out = kernels.decode_product(layer, one)
    rows2 = kernels.decode_product(layer, torch.cat((one, one), dim=1))
    doubled_out = kernels.decode_product(doubled, one)
rows2_exact = torch.nn.functional.linear(torch.cat((one, one), dim=1), layer.weight, layer.bias)
one_row = kernels.one_row_kernel_applies
with torch.no_grad():
    no_grad_ok = one_row(one, layer.weight, layer.bias)
results["one_row"] = {
    "error": ((out.double() - exact).norm() / exact.norm()).item(),
    "shape_ok": out.shape == (1, 1, 130) and out.dtype == bf16,
    "two_rows_are_cublas": torch.equal(rows2, rows2_exact),
    "other_module_called": torch.equal(doubled_out, 2 * torch.nn.functional.linear(one, layer.weight, layer.bias)),
    "the_kernel_ran": torch.equal(out, kernels.small_batch_linear(one, layer.weight.detach(), layer.bias.detach())),
    "no_grad": no_grad_ok,
    "weight_needs_grad": one_row(one, layer.weight, layer.bias),  # grad mode on, the weight trainable
    "frozen": one_row(one, layer.weight.detach(), layer.bias.detach()),
    "two_rows": one_row(torch.cat((one, one), dim=1), layer.weight.detach()),
    "fp32_weight": one_row(one, layer.weight.detach().float()),
    "fp32_bias": one_row(one, layer.weight.detach(), layer.bias.detach().float()),
    "programmatic_launch": kernels._programmatic_launch(one),
}

# The batch-1 loop reads weights as words of 4 values; a float or int8 weight whose rows start elsewhere takes the
# tensor-core loop (the bits of that loop on an aligned copy), an int4 one is refused.
wide = torch.randn(130, 258, generator=generator)
misaligned = {}
for fmt, bits in (("float", None), ("int8", 8)):
    stored, scale = quantization.quantize_weight(wide, bits, scale_dtype=bf16) if bits else (wide.to(bf16), None)
    view = stored[:, 1:257]
    tensor_cores = kernels.launch_config(kernels.MAX_ROWS, 130, 256, bits)
    misaligned[fmt] = torch.equal(kernels.small_batch_linear(one, view, None, scale, bits),
                                  kernels.small_batch_linear(one, view.contiguous(), None, scale, bits,
                                                             config=tensor_cores))
packed, packed_scale = quantization.quantize_weight(torch.randn(130, 512, generator=generator), 4, scale_dtype=bf16)
try:
    kernels.small_batch_linear(one, packed[:, 1:129], None, packed_scale, 4)
    misaligned["int4_refused"] = False
except ValueError as error:
    misaligned["int4_refused"] = "int32 words" in str(error)
results["misaligned"] = misaligned

# gated: silu(gate) * up in the product's launch, the bits of the product followed by triton_swiglu
gated = {}
for name, N, K, config in shapes:
    for fmt, bits in (("float", None), ("int8", 8), ("int4", 4)):
        for M in (1, 3):
            if config is not None and not config[5] and M > 1:
                continue
            weight = torch.randn(2 * N, K, generator=generator)
            x = torch.randn(M, K, generator=generator).to(bf16)
            bias = torch.randn(2 * N, generator=generator).to(bf16)
            stored, scale = quantization.quantize_weight(weight, bits, scale_dtype=bf16) if bits else (weight.to(bf16), None)
            unfused = kernels.triton_swiglu(kernels.small_batch_linear(x, stored, bias, scale, bits, config=config))
            out = kernels.small_batch_linear(x, stored, bias, scale, bits, gated=True, config=config)
            gated[f"{name}/{fmt}/M{M}"] = out.shape == (M, N) and torch.equal(out, unfused)
results["gated"] = gated
layer2 = torch.nn.Linear(256, 260, bias=False).to(bf16)
quantized = quantization.QuantizedLinear.from_linear(layer2, 4)
odd = torch.nn.Linear(256, 131).to(bf16)
def marked(rows):
    return kernels.triton_swiglu(rows) + 1  # a different function: shows where the caller's swiglu ran
with torch.no_grad():
    results["decode_swiglu"] = {
        "plain": torch.equal(kernels.decode_swiglu_product(layer2, one, marked),
                             kernels.triton_swiglu(kernels.decode_product(layer2, one))),
        "quantized": torch.equal(kernels.decode_swiglu_product(quantized, one, marked),
                                 kernels.triton_swiglu(quantized(one))),
        "adapter_falls_back": torch.equal(kernels.decode_swiglu_product(doubled, one, marked), marked(doubled(one))),
        "two_rows_fall_back": torch.equal(kernels.decode_swiglu_product(layer2, torch.cat((one, one), dim=1), marked),
                                          marked(layer2(torch.cat((one, one), dim=1)))),
        "odd_falls_back": torch.equal(kernels.decode_swiglu_product(odd, one, torch.relu),
                                      torch.relu(kernels.decode_product(odd, one))),
    }
try:
    kernels.small_batch_linear(one, odd.weight.detach(), gated=True)
    results["odd_gated_refused"] = False
except ValueError as error:
    results["odd_gated_refused"] = "even" in str(error)

# dequantize_weight through triton_dequantize: widths that are not a multiple of the kernel's tile
dequantized = {}
for bits in (8, 4):
    for N, K in ((37, 1000), (5, 64), (3, 2050)):
        stored, scale = quantization.quantize_weight(torch.randn(N, K, generator=generator), bits,
                                                     scale_dtype=torch.float16)
        unpacked = quantization.unpack_int4(stored) if bits == 4 else stored
        for dtype_name, dtype in (("bf16", bf16), ("fp16", torch.float16), ("fp32", torch.float32)):
            out = quantization.dequantize_weight(stored, scale, bits, dtype)
            reference = unpacked.to(dtype) * scale.to(dtype)[:, None]
            dequantized[f"int{bits}/{N}x{K}/{dtype_name}"] = {
                "shape_ok": out.shape == (N, K) and out.dtype == dtype,
                "the_kernel_ran": torch.equal(out, kernels.triton_dequantize(stored, scale.to(dtype), bits)),
                "identical": torch.equal(out, reference),
                "error": ((out.double() - reference.double()).abs()
                          / reference.double().abs().clamp_min(1e-30)).max().item(),
            }
results["dequantize"] = dequantized
refusals = []
for bad in ((stored.view(torch.uint8), scale, 4), (stored, scale[:-1], 4), (stored, scale, None)):
    try:
        kernels.triton_dequantize(*bad)
        refusals.append(False)
    except ValueError as error:
        refusals.append("int8 weight" in str(error))
results["dequantize_refusals"] = refusals
with open(out_path, "w") as handle:
    json.dump(results, handle)
"""


class InterpretedRun:
    """`script` (python -c) run with TRITON_INTERPRET=1 and the arguments REPO_ROOT, *args, out_path: the script writes
    its results as JSON to out_path. Started when created, so that the slow interpreter (about 40 s of one core) runs
    beside the tests collected before this file's (conftest.pytest_collection_finish calls start_background_runs)."""

    def __init__(self, script, *args):
        self.folder = tempfile.TemporaryDirectory(prefix="triton-interpreted-")
        self.out_path = Path(self.folder.name) / "results.json"
        self.stderr = open(Path(self.folder.name) / "stderr", "w+")  # noqa: SIM115 - read back in result()
        self.process = subprocess.Popen([sys.executable, "-c", script, str(REPO_ROOT), *map(str, args), str(self.out_path)],
                                        cwd=REPO_ROOT, env={**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"},
                                        stdout=subprocess.DEVNULL, stderr=self.stderr, preexec_fn=background_priority)

    def result(self):
        try:
            returncode = self.process.wait(timeout=600)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise
        self.stderr.seek(0)
        stderr = self.stderr.read()
        if returncode and OLD_INTERPRETER_ERROR in stderr and triton_version() < (3, 9):
            pytest.skip(f"the interpreter of triton {'.'.join(map(str, triton_version()))} cannot run under numpy "
                        f"{importlib.metadata.version('numpy')} ({OLD_INTERPRETER_ERROR}); triton 3.9's can")
        assert returncode == 0, stderr[-5000:]
        return json.loads(self.out_path.read_text())


# The interpreters of triton 3.5/3.6 (what CUDA builds of torch 2.11 pin) int() the 1-element numpy arrays they hold a
# program's scalars in, which numpy >= 2.4 refuses. Where that is the failure, the interpreted cases are skipped: the
# compiled kernels run on such a GPU machine in tests/test_fast_decode.py.
OLD_INTERPRETER_ERROR = "only 0-dimensional arrays can be converted to Python scalars"


def triton_version():
    return tuple(int(part) for part in importlib.metadata.version("triton").split(".")[:2])


RUNS = {}


def start_background_runs():
    """The module's interpreter runs, started once (at collection, or by the first fixture that needs them)."""
    if not RUNS and importlib.util.find_spec("triton") is not None:
        RUNS["linear"] = InterpretedRun(INTERPRETER_SCRIPT, json.dumps(SHAPES))
        RUNS["elementwise"] = InterpretedRun(ELEMENTWISE_SCRIPT)
    return RUNS


def interpreted_result(name):
    pytest.importorskip("triton")
    return start_background_runs()[name].result()


@pytest.fixture(scope="module")
def interpreted():
    return interpreted_result("linear")


@pytest.mark.parametrize("name", [shape[0] for shape in SHAPES])
@pytest.mark.parametrize("fmt", ["float", "int8", "int4"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_matches_float64_reference_and_repeats_bit_identically(interpreted, name, fmt, dtype):
    cases = {key: value for key, value in interpreted.items() if key.startswith(f"{name}/{dtype}/{fmt}/")}
    config = {shape[0]: shape[3] for shape in SHAPES}[name]
    fma_only = config is not None and not config[5]
    assert len(cases) == (2 if fma_only else 6), sorted(cases)  # M 1 (FMA) or M 1, 3, 16; with and without bias
    for key, case in cases.items():
        assert case["shape_ok"], key
        assert case["error"] < TOLERANCE[dtype], f"{key}: relative error {case['error']:.2e}"
        assert case["identical"], f"{key}: two calls gave different bits"


def test_split_counters_are_zero_after_every_call(interpreted):
    assert interpreted["tickets_zero"]


def test_one_row_float_products_run_the_kernel_only_where_nothing_needs_a_gradient(interpreted):
    """decode_product (a decode step's linear layers) computes one row of a plain nn.Linear with small_batch_linear,
    as F.linear would; more rows, a weight or bias of another dtype, or a weight that training updates go to F.linear,
    and other modules (adapters, quantized layers) are called as they are. The interpreter never launches
    programmatically (a CUDA launch option)."""
    verdict = interpreted["one_row"]
    assert verdict["shape_ok"] and verdict["error"] < TOLERANCE["bf16"], verdict
    assert verdict["the_kernel_ran"] and verdict["two_rows_are_cublas"] and verdict["other_module_called"], verdict
    assert verdict["no_grad"] and verdict["frozen"], verdict
    assert not (verdict["weight_needs_grad"] or verdict["two_rows"] or verdict["fp32_weight"] or verdict["fp32_bias"])
    assert verdict["programmatic_launch"] is False


def test_weights_not_aligned_to_words_take_the_tensor_core_loop_or_are_refused(interpreted):
    """The batch-1 loop reads a weight as words of 4 values: a float or int8 weight view whose rows start elsewhere
    gives the bits of the tensor-core loop on an aligned copy; an int4 one is refused with a message."""
    assert interpreted["misaligned"] == {"float": True, "int8": True, "int4_refused": True}


def test_gated_products_give_the_bits_of_the_product_then_swiglu(interpreted):
    """small_batch_linear(gated=True) computes silu(gate) * up of a [gate | up] product in its own launch: the same
    bits as the product followed by triton_swiglu, for every format, the FMA and the dot loops, split or not, with bias.
    decode_swiglu_product takes it for plain and quantized layers of one row, and calls the caller's swiglu after the
    layer for anything else (another module, two rows, an odd width)."""
    cases = interpreted["gated"]
    assert len(cases) == 3 * (2 + 2 + 2 + 1 + 2 + 1), sorted(cases)  # per format: M 1 and 3 where the dot loop may run
    assert all(cases.values()), [key for key, same in cases.items() if not same]
    assert all(interpreted["decode_swiglu"].values()), interpreted["decode_swiglu"]
    assert interpreted["odd_gated_refused"]


def test_dequantized_weights_come_from_one_kernel_with_the_torch_expansions_values(interpreted):
    """dequantize_weight expands int8 and packed int4 weights through triton_dequantize (one launch): the bits of
    unpack_int4(q).to(dtype) * scale in fp16 and fp32; bf16 within one rounding (the interpreter truncates fp32 to
    bf16 where compiled Triton rounds to nearest even, whose bits the CUDA test checks). Bad weights, scales and bits
    are refused."""
    cases = interpreted["dequantize"]
    assert len(cases) == 2 * 3 * 3, sorted(cases)
    for key, case in cases.items():
        assert case["shape_ok"] and case["the_kernel_ran"], key
        if key.endswith("bf16"):
            assert case["error"] <= 2**-7, key
        else:
            assert case["identical"], key
    assert interpreted["dequantize_refusals"] == [True, True, True]


def test_predicate_under_the_interpreter(interpreted):
    verdict = interpreted["predicate"]
    assert verdict["valid"] and verdict["m16"] and verdict["grad_under_no_grad"]
    assert not (verdict["m17"] or verdict["k96"] or verdict["k_mismatch"] or verdict["fp32"] or verdict["grad"]), verdict
    # int4 needs 128 | K (a GPU tl.dot over K/8 packed words needs at least 16 of them).
    assert verdict["int4_k128"] and not verdict["int4_k64"], verdict


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this process runs the interpreter")
def test_predicate_is_false_on_cpu_without_the_interpreter():
    import torch

    kernels = remote_module("chatglm2-6b", "kernels")
    assert not kernels._INTERPRETED
    assert not kernels.small_batch_kernel_applies(torch.randn(1, 64, dtype=torch.bfloat16), 64)
    assert not kernels.dequantize_kernel_applies(torch.zeros(2, 64, dtype=torch.int8), torch.bfloat16)


def test_imports_without_triton_and_then_never_applies():
    script = (
        "import sys; sys.modules['triton'] = None; sys.path.insert(0, sys.argv[1]);"
        "import torch; from utils.model_loading import remote_module;"
        "k = remote_module('chatglm2-6b', 'kernels'); assert k.triton is None;"
        "assert not k.small_batch_kernel_applies(torch.randn(1, 64, dtype=torch.bfloat16), 64);"
        "assert not k.dequantize_kernel_applies(torch.zeros(2, 64, dtype=torch.int8), torch.bfloat16);"
        "raised = False\n"
        "try: k.small_batch_linear(torch.randn(1, 64, dtype=torch.bfloat16), torch.randn(8, 64, dtype=torch.bfloat16))\n"
        "except RuntimeError: raised = True\n"
        "assert raised"
    )
    result = subprocess.run([sys.executable, "-c", script, str(REPO_ROOT)], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("M", [1, 4, 16])
def test_launch_config_fills_an_h100_and_is_a_function_of_the_shape(bits, M):
    kernels = remote_module("chatglm2-6b", "kernels")
    for N, K in REAL_SHAPES:
        config = kernels.launch_config(M, N, K, bits, sm_count=132)
        block_n, block_k, split_k, num_warps, num_stages, use_dot = config
        assert config == kernels.launch_config(M, N, K, bits, sm_count=132)
        assert K % block_k == 0 and block_k >= kernels.MIN_BLOCK_K
        steps = K // block_k
        per_split = -(-steps // split_k)
        assert 1 <= split_k <= steps and -(-steps // per_split) == split_k, "no empty split"
        # every SM busy: one row block each where the batch-1 loop runs unsplit, about 2 programs each otherwise
        assert -(-N // block_n) * split_k >= (132 if M == 1 and split_k == 1 else 2 * 132), (N, K, config)
        assert use_dot == (M > 1)
        if not use_dot:  # the FMA loop's fp32 accumulator [block_n, weight words a step]: 64 registers a thread at most
            assert block_n * block_k // (8 if bits == 4 else 4) <= 64 * 32 * num_warps


# That remote_scripts/*/kernels.py (like quantization.py) are byte-identical, self-contained copies is checked with the
# other copies by tools/check_copies.py, in tests/test_check_copies.py.


ELEMENTWISE_SCRIPT = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
from utils.model_loading import remote_module

kernels = remote_module("chatglm2-6b", "kernels")
modeling = remote_module("chatglm2-6b", "modeling_chatglm")
assert kernels._INTERPRETED, "TRITON_INTERPRET=1 did not reach triton"
generator = torch.Generator().manual_seed(0)
results = {}

def relative_error(out, reference):
    return ((out.double() - reference).norm() / reference.norm()).item()

for dtype_name, dtype in {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.items():
    for batch, seq, hidden in ((2, 3, 64), (1, 1, 96)):  # 96: a row narrower than its power-of-two block
        x = torch.randn(batch, seq, hidden, generator=generator).to(dtype)
        weight = torch.randn(hidden, generator=generator).to(dtype)
        reference = weight.double() * x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)
        out = kernels.triton_rms_norm(x, weight, 1e-5)
        results[f"rms_norm/{dtype_name}/{batch}x{seq}x{hidden}"] = [relative_error(out, reference), out.shape == x.shape and out.dtype == dtype]
    for width in (80, 1100):  # one block, and two blocks of 1024 with a ragged end
        rows = torch.randn(2, 3, 2 * width, generator=generator).to(dtype)
        gate, up = rows.double().chunk(2, dim=-1)
        out = kernels.triton_swiglu(rows)
        results[f"swiglu/{dtype_name}/{width}"] = [relative_error(out, torch.nn.functional.silu(gate) * up), out.shape == (2, 3, width)]
    for heads, groups, head_dim, angle_batch in ((4, 2, 16, 2), (6, 1, 128, 1)):  # ChatGLM2's head: 64 rotated dims of 128
        qkv = torch.randn(2, 5, (heads + 2 * groups) * head_dim, generator=generator).to(dtype)
        rotary = modeling.RotaryEmbedding(head_dim // 2)
        cos, sin = rotary(torch.arange(5).expand(angle_batch, 5), dtype)  # angle_batch 1: one table for the batch
        expected = modeling.apply_rotary.__wrapped__(qkv.double(), cos.double(), sin.double(), heads + groups, head_dim)
        out = kernels.triton_rotary(qkv, cos, sin, heads + groups, head_dim)
        results[f"rotary/{dtype_name}/{heads}+{groups}x{head_dim}"] = [relative_error(out, expected), out.shape == expected.shape]

# Backward passes against float64 autograd of the model's own functions, for a random upstream gradient.
def gradients(function, inputs, upstream):
    inputs = [t.detach().requires_grad_() for t in inputs]
    function(*inputs).backward(upstream)
    return [t.grad for t in inputs]

for dtype_name, dtype in {"bf16": torch.bfloat16, "fp32": torch.float32}.items():
    # 1,100 rows: each backward program sums the weight gradient of 3 rows (the last one 2): partials added up after.
    for rows, hidden in ((15, 96), (1100, 64)):
        x, weight = torch.randn(rows, hidden, generator=generator).to(dtype), torch.randn(hidden, generator=generator).to(dtype)
        upstream = torch.randn(rows, hidden, generator=generator).to(dtype)
        ours = gradients(lambda x, w: kernels.triton_rms_norm(x, w, 1e-5), (x, weight), upstream)
        exact = gradients(lambda x, w: modeling.rms_norm.__wrapped__(x, w, 1e-5), (x.double(), weight.double()), upstream.double())
        results[f"rms_norm_backward/{dtype_name}/{rows}x{hidden}"] = [relative_error(o, e) for o, e in zip(ours, exact)]
    gate_and_up, upstream = torch.randn(2, 3, 2 * 1100, generator=generator).to(dtype), torch.randn(2, 3, 1100, generator=generator).to(dtype)
    ours = gradients(kernels.triton_swiglu, (gate_and_up,), upstream)
    exact = gradients(modeling.swiglu.__wrapped__, (gate_and_up.double(),), upstream.double())
    results[f"swiglu_backward/{dtype_name}"] = [relative_error(o, e) for o, e in zip(ours, exact)]
    heads, groups, head_dim = 4, 2, 16
    for angle_batch in (2, 1):  # 1: one table for the batch
        qkv = torch.randn(2, 5, (heads + 2 * groups) * head_dim, generator=generator).to(dtype)
        cos, sin = modeling.RotaryEmbedding(head_dim // 2)(torch.arange(5).expand(angle_batch, 5) + angle_batch, dtype)
        upstream = torch.randn(2, 5, heads + groups, head_dim, generator=generator).to(dtype)
        ours = gradients(lambda t: kernels.triton_rotary(t, cos, sin, heads + groups, head_dim), (qkv,), upstream)
        exact = gradients(lambda t: modeling.apply_rotary.__wrapped__(t, cos.double(), sin.double(), heads + groups, head_dim),
                          (qkv.double(),), upstream.double())
        key = f"rotary_backward/{dtype_name}/{angle_batch}"
        results[key] = [relative_error(o, e) for o, e in zip(ours, exact)]
        # the value heads (after the rotated ones) get exactly zero from the rotary
        results[key].append(bool((ours[0][..., (heads + groups) * head_dim:] == 0).all()))

# A tiny ChatGLM2 takes these kernels once its device fuses (on CUDA; here the CPU, interpreted), with and without
# gradients.
model = modeling.ChatGLMForConditionalGeneration(modeling.ChatGLMConfig(
    num_layers=2, hidden_size=64, ffn_hidden_size=160, kv_channels=16, num_attention_heads=4, multi_query_group_num=2,
    padded_vocab_size=128, seq_length=64, multi_query_attention=True)).eval()
ids = torch.randint(0, 128, (2, 7), generator=generator)

class Counted:  # counts the launches of a Triton kernel
    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]

KERNELS = ("_rms_norm_kernel", "_swiglu_kernel", "_rotary_kernel", "_rms_norm_backward_kernel", "_swiglu_backward_kernel")
counted = {name: Counted(getattr(kernels, name)) for name in KERNELS}
for name, kernel in counted.items():
    setattr(kernels, name, kernel)

def no_compiling(*args, **kwargs):
    raise AssertionError("generation compiled instead of taking the Triton kernels")

torch.compile = no_compiling
def training_step():  # the loss and every weight's gradient of one step on all weights (the norms' too)
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: param.grad.clone() for name, param in model.named_parameters()}

eager_loss, eager_grads = training_step()
with torch.no_grad():
    plain = model(input_ids=ids).logits.double()
    modeling.FUSE_DEVICES = ("cuda", "cpu")  # this CPU now stands for a CUDA device
    with_kernels = model(input_ids=ids).logits
results["model"] = {"error": relative_error(with_kernels, plain), "launches": {n: k.launches for n, k in counted.items()}}
for kernel in counted.values():
    kernel.launches = 0
fused_loss, fused_grads = training_step()
results["training"] = {
    "loss_error": abs((fused_loss - eager_loss) / eager_loss).item(),
    "grad_errors": {name: relative_error(fused_grads[name], eager_grads[name].double()) for name in eager_grads},
    "launches": {n: k.launches for n, k in counted.items()},
}

# ChatGLM-6B's 2D rotary (rotate-half pairs in each half of a head, two positions), on the strided key view the model
# passes, against the model's own function in float64, both ways; then a tiny ChatGLM-6B's training step on it.
v1 = remote_module("chatglm-6b", "modeling_chatglm")
v1_kernels = remote_module("chatglm-6b", "kernels")  # the model's own copy of this file
v1_launches = Counted(v1_kernels._rotary_2d_kernel)
v1_kernels._rotary_2d_kernel = v1_launches
v1_rotary = v1.RotaryEmbedding(8)
for dtype_name, dtype in {"bf16": torch.bfloat16, "fp32": torch.float32}.items():
    qkv = torch.randn(2, 5, 3, 3 * 16, generator=generator).to(dtype)  # [B, S, heads, q | k | v] as the model splits it
    x = qkv[..., 16:32].transpose(1, 2)
    main = v1_rotary(torch.arange(5).expand(2, 5), dtype)
    block = v1_rotary(torch.randint(0, 3, (2, 5), generator=generator), dtype)
    wide = [tuple(t.double() for t in angles) for angles in (main, block)]
    out = v1_kernels.triton_rotary_2d(x, main, block)
    exact = v1.apply_rotary_2d.__wrapped__(x.double(), *wide)
    upstream = torch.randn(2, 3, 5, 16, generator=generator).to(dtype)
    ours = gradients(lambda t: v1_kernels.triton_rotary_2d(t, main, block), (x,), upstream)
    expected = gradients(lambda t: v1.apply_rotary_2d.__wrapped__(t, *wide), (x.double(),), upstream.double())
    results[f"rotary_2d/{dtype_name}"] = [relative_error(out, exact), out.shape == x.shape,
                                          relative_error(ours[0], expected[0])]

from tools.tiny_models import TINY_SIZES, build_random_model

v1_model = build_random_model("chatglm-6b", dict(TINY_SIZES["chatglm-6b"]))
v1_ids = torch.cat((torch.randint(5, 1000, (2, 6), generator=generator),
                    torch.tensor([[v1_model.config.gmask_token_id, v1_model.config.bos_token_id]] * 2),
                    torch.randint(5, 1000, (2, 3), generator=generator)), dim=1)

def v1_step():
    v1_model.zero_grad()
    loss = v1_model(input_ids=v1_ids, labels=v1_ids).loss
    loss.backward()
    return loss.detach(), {name: param.grad.clone() for name, param in v1_model.named_parameters() if param.grad is not None}

eager_loss, eager_grads = v1_step()
v1.FUSE_DEVICES = ("cuda", "cpu")
v1_launches.launches = 0
fused_loss, fused_grads = v1_step()
results["chatglm-6b"] = {
    "loss_error": abs((fused_loss - eager_loss) / eager_loss).item(),
    "grad_errors": {name: relative_error(fused_grads[name], eager_grads[name].double()) for name in eager_grads},
    "launches": v1_launches.launches,
}

# GLM-4 (transformers' Glm and Glm4 classes) with its norms and MLPs on the same kernels (utils/glm_layers.py).
from transformers import AutoConfig, AutoModelForCausalLM
from utils.glm_layers import fuse_norms_and_mlps

for kind in ("glm", "glm4"):
    config = AutoConfig.for_model(kind, num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, vocab_size=128, pad_token_id=0, eos_token_id=[1])
    torch.manual_seed(0)
    glm = AutoModelForCausalLM.from_config(config)

    def glm_step():
        glm.zero_grad()
        loss = glm(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {name: param.grad.clone() for name, param in glm.named_parameters()}

    eager_loss, eager_grads = glm_step()
    replaced = fuse_norms_and_mlps(glm, kernels)
    for kernel in counted.values():
        kernel.launches = 0
    fused_loss, fused_grads = glm_step()
    results[f"glm/{kind}"] = {
        "replaced": replaced, "loss_error": abs((fused_loss - eager_loss) / eager_loss).item(),
        "grad_errors": {name: relative_error(fused_grads[name], eager_grads[name].double()) for name in eager_grads},
        "launches": {n: k.launches for n, k in counted.items()},
    }
# Decode attention: one step's rotary, cache write and attention in one kernel, against float64 (SDPA of the rotated
# query over the cache holding the new key and value) and against the eager step's SDPA; DECODE_MIN_CHUNK 32 splits
# the cache over several programs and combines them.
full_chunk = kernels.DECODE_MIN_CHUNK
for dtype_name, dtype in {"bf16": torch.bfloat16, "fp16": torch.float16}.items():
    for batch, heads, groups, head_dim, capacity, slot, chunk in ((2, 4, 2, 16, 64, 37, full_chunk),
                                                                   (1, 32, 2, 128, 128, 100, 32), (3, 4, 4, 16, 64, 0, 32)):
        kernels.DECODE_MIN_CHUNK = chunk
        qkv = torch.randn(batch, 1, (heads + 2 * groups) * head_dim, generator=generator).to(dtype)
        cos, sin = modeling.RotaryEmbedding(head_dim // 2)(torch.randint(0, 100, (batch, 1), generator=generator), dtype)
        keys, values = (torch.randn(batch, groups, capacity, head_dim, generator=generator).to(dtype) for _ in range(2))
        valid = torch.rand(batch, capacity, generator=generator) < 0.8
        valid[:, slot] = True
        valid[:, slot + 1:] = False
        old_keys, old_values = keys.clone(), values.clone()
        out = kernels.triton_decode_attention(qkv, cos, sin, keys, values, valid, torch.tensor([slot]), heads, groups, head_dim)
        rotated = kernels.triton_rotary(qkv, cos, sin, heads + groups, head_dim)[:, 0]  # what the eager step writes
        new_value = qkv[:, 0, (heads + groups) * head_dim:].unflatten(-1, (groups, head_dim))
        full_keys, full_values = old_keys.clone(), old_values.clone()
        full_keys[:, :, slot], full_values[:, :, slot] = rotated[:, heads:], new_value
        queries = rotated[:, :heads].reshape(batch, groups, heads // groups, head_dim)
        mask = valid[:, None, None, :]
        exact = torch.nn.functional.scaled_dot_product_attention(queries.double(), full_keys.double(), full_values.double(), attn_mask=mask)
        eager = torch.nn.functional.scaled_dot_product_attention(queries, full_keys, full_values, attn_mask=mask)
        untouched = torch.ones(capacity, dtype=torch.bool)
        untouched[slot] = False
        results[f"decode_attention/{dtype_name}/{batch}x{heads}/{groups}x{head_dim}/{capacity}@{slot}/chunk{chunk}"] = [
            relative_error(out, exact.reshape(batch, 1, -1)), relative_error(eager, exact),
            torch.equal(keys, full_keys) and torch.equal(values, full_values),
            torch.equal(keys[:, :, untouched], old_keys[:, :, untouched]),
        ]
kernels.DECODE_MIN_CHUNK = full_chunk

# A tiny fp16 ChatGLM2 decoding 12 tokens on the static cache (the CPU standing for a CUDA device): the fused step
# against the same step with the eager attention.
from utils.generation import stream_generate

counted["_decode_attention_kernel"] = Counted(kernels._decode_attention_kernel)
kernels._decode_attention_kernel = counted["_decode_attention_kernel"]
torch.manual_seed(0)
decoder = modeling.ChatGLMForConditionalGeneration(model.config).eval().half()
with torch.no_grad():
    for param in decoder.parameters():
        param.normal_(std=0.3)  # peaked: few near-ties between the top two tokens

class RecordScores:
    def __init__(self):
        self.scores = []

    def __call__(self, input_ids, scores):
        self.scores.append(scores.clone())
        return scores

def decode_tokens():
    recorder = RecordScores()
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :2] = 0  # left padding
    *_, (new_ids, _) = stream_generate(decoder, ids, attention_mask, max_new_tokens=12, eos_token_id=[-1],
                                       decode="static", logits_processor=[recorder])
    return new_ids, torch.stack(recorder.scores)

applies = modeling.decode_attention_applies
modeling.decode_attention_applies = lambda *args: False
with torch.no_grad():
    eager_ids, eager_scores = decode_tokens()
    modeling.decode_attention_applies = applies
    counted["_decode_attention_kernel"].launches = 0
    counted["_add_rms_norm_kernel"] = Counted(kernels._add_rms_norm_kernel)
    kernels._add_rms_norm_kernel = counted["_add_rms_norm_kernel"]
    fused_ids, fused_scores = decode_tokens()
    launches = {name: counted[name].launches for name in ("_decode_attention_kernel", "_add_rms_norm_kernel")}
    fused_adds = modeling.add_rms_norm
    modeling.add_rms_norm = lambda hidden, update, norm: (hidden, norm(hidden)) if update is None else (hidden + update, norm(hidden + update))
    _, unfused_add_scores = decode_tokens()
    modeling.add_rms_norm = fused_adds
results["decode"] = {"same_tokens": fused_ids.tolist() == eager_ids.tolist(), "distinct": len(set(eager_ids[1].tolist())),
                     "max_score_difference": (fused_scores - eager_scores).abs().max().item(),
                     "launches": launches["_decode_attention_kernel"],
                     "add_norm_launches": launches["_add_rms_norm_kernel"],
                     "fused_adds_bitwise": torch.equal(fused_scores, unfused_add_scores)}

# Tiny fp16 GLM-4s (transformers' classes, norms and MLPs on our kernels) decoding 12 tokens on ChatGLM2's static step
# (utils/glm_decode.py) against transformers' own step.
from utils.decode_engine import stream_generate as engine_generate

def glm_tokens(glm, mode):
    recorder = RecordScores()
    attention_mask = torch.ones_like(ids)
    attention_mask[0, :2] = 0
    *_, (new_ids, _) = engine_generate(glm, ids, attention_mask, max_new_tokens=12, eos_token_id=[-1], decode=mode,
                                       do_sample=False, repetition_penalty=1.5, logits_processor=[recorder])
    return new_ids, torch.stack(recorder.scores)

for kind in ("glm", "glm4"):
    config = AutoConfig.for_model(kind, num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, vocab_size=128, pad_token_id=0, eos_token_id=[1])
    torch.manual_seed(0)
    glm = AutoModelForCausalLM.from_config(config).eval().half()
    with torch.no_grad():
        for param in glm.parameters():
            param.normal_(std=0.3)
    fuse_norms_and_mlps(glm, kernels)
    with torch.no_grad():
        plain_ids, plain_scores = glm_tokens(glm, "plain")
        counted["_decode_attention_kernel"].launches = 0
        ours_ids, ours_scores = glm_tokens(glm, "static")
    results[f"glm_decode/{kind}"] = {
        "same_tokens": ours_ids.tolist() == plain_ids.tolist(), "distinct": len(set(plain_ids[1].tolist())),
        "max_score_difference": (ours_scores - plain_scores).abs().max().item(),
        "max_score": plain_scores.abs().max().item(), "launches": counted["_decode_attention_kernel"].launches}
with open(sys.argv[2], "w") as handle:
    json.dump(results, handle)
"""


@pytest.fixture(scope="module")
def elementwise_interpreted():
    return interpreted_result("elementwise")


@pytest.mark.parametrize("op", ["rms_norm", "swiglu", "rotary"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_elementwise_kernels_match_a_float64_reference(elementwise_interpreted, op, dtype):
    """The RMSNorm, SwiGLU and rotary forward kernels against float64 references (the rotary one: the model's own
    apply_rotary in float64): rows narrower than their block, several blocks, one angle table for a whole batch."""
    cases = {key: value for key, value in elementwise_interpreted.items() if key.startswith(f"{op}/{dtype}/")}
    assert len(cases) == 2, sorted(cases)  # (the backward cases' keys start with "{op}_backward/")
    for key, (error, shape_ok) in cases.items():
        assert shape_ok, key
        assert error < {"bf16": 1e-2, "fp16": 2e-3, "fp32": 1e-5}[dtype], f"{key}: relative error {error:.2e}"


def test_a_model_without_gradients_runs_the_elementwise_kernels_and_compiles_nothing(elementwise_interpreted):
    """On a device where the element-wise functions compile, a forward pass without gradients launches the Triton
    kernels (2 layers: 2 norms each + the final one, one SwiGLU and one rotary call each) and never torch.compile,
    and gives the eager model's logits."""
    model = elementwise_interpreted["model"]
    assert model["launches"] == {"_rms_norm_kernel": 5, "_swiglu_kernel": 2, "_rotary_kernel": 2,
                                 "_rms_norm_backward_kernel": 0, "_swiglu_backward_kernel": 0}, model
    assert model["error"] < 1e-5, model


@pytest.mark.parametrize("op", ["rms_norm", "swiglu", "rotary"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_elementwise_backward_kernels_match_float64_autograd(elementwise_interpreted, op, dtype):
    """The backward passes (RMSNorm's input and weight gradients, the latter summed over programs of several rows
    with a ragged last one; SwiGLU's; rotary's, with angles per row and one table for the batch, which gives the
    value heads exactly zero) against float64 autograd of the model's own functions."""
    cases = {key: value for key, value in elementwise_interpreted.items() if key.startswith(f"{op}_backward/{dtype}")}
    assert len(cases) == (1 if op == "swiglu" else 2), sorted(cases)
    for key, errors in cases.items():
        if op == "rotary":
            assert errors.pop() is True, f"{key}: the value heads got a gradient from the rotary"
        for error in errors:
            assert error < {"bf16": 1e-2, "fp32": 1e-5}[dtype], f"{key}: relative errors {errors}"


def test_a_training_step_runs_the_backward_kernels_and_gives_the_eager_gradients(elementwise_interpreted):
    """One training step on all weights of the tiny fp32 ChatGLM2 with the kernels (forward and backward: 5 norms, 2
    SwiGLU and 2 rotary calls, each once each way; the rotary's backward is its forward kernel with the angles negated)
    and without (eager autograd): the same loss and the same gradient for every weight, norms included, and no
    torch.compile."""
    training = elementwise_interpreted["training"]
    assert training["launches"] == {"_rms_norm_kernel": 5, "_swiglu_kernel": 2, "_rotary_kernel": 4,
                                    "_rms_norm_backward_kernel": 5, "_swiglu_backward_kernel": 2}, training["launches"]
    assert training["loss_error"] < 1e-6, training
    assert len(training["grad_errors"]) > 10
    for name, error in training["grad_errors"].items():
        assert error < 1e-5, (name, error)


@pytest.mark.parametrize("kind,norms", [("glm", 5), ("glm4", 9)])
def test_glm4_layers_on_the_kernels_give_transformers_loss_and_gradients(elementwise_interpreted, kind, norms):
    """A tiny fp32 GLM-4 of each layout (glm-4-9b-chat-hf's, GLM-4-0414's two extra norms per block) with its norms and
    MLPs replaced (utils/glm_layers.py): one training step launches our norm and SwiGLU kernels once each way per
    module and gives the loss and every gradient of transformers' own layers, without torch.compile."""
    glm = elementwise_interpreted[f"glm/{kind}"]
    assert glm["replaced"] == norms + 2
    assert glm["launches"] == {"_rms_norm_kernel": norms, "_swiglu_kernel": 2, "_rotary_kernel": 0,
                               "_rms_norm_backward_kernel": norms, "_swiglu_backward_kernel": 2}, glm["launches"]
    assert glm["loss_error"] < 1e-6, glm
    assert len(glm["grad_errors"]) > 10
    for name, error in glm["grad_errors"].items():
        assert error < 1e-5, (name, error)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_chatglm_6b_2d_rotary_kernel_matches_the_models_function_both_ways(elementwise_interpreted, dtype):
    """triton_rotary_2d on the strided key view ChatGLM-6B passes (main and block positions, rotate-half pairs in each
    half of a head) against the model's own apply_rotary_2d in float64, forward and backward."""
    forward_error, shape_ok, backward_error = elementwise_interpreted[f"rotary_2d/{dtype}"]
    assert shape_ok
    tolerance = {"bf16": 1e-2, "fp32": 1e-5}[dtype]
    assert forward_error < tolerance and backward_error < tolerance, (forward_error, backward_error)


def test_a_chatglm_6b_training_step_takes_the_2d_rotary_kernel_and_compiles_nothing(elementwise_interpreted):
    """A tiny fp32 ChatGLM-6B's training step with its fused functions on (the CPU standing for a CUDA device): the 2D
    rotary kernel for queries and keys of both blocks, each way, no torch.compile (the residual is one eager add), the
    eager loss and gradients."""
    v1 = elementwise_interpreted["chatglm-6b"]
    assert v1["launches"] == 8, v1["launches"]
    assert v1["loss_error"] < 1e-6, v1
    assert len(v1["grad_errors"]) > 10
    for name, error in v1["grad_errors"].items():
        assert error < 1e-5, (name, error)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_decode_attention_kernel_matches_float64_and_writes_the_cache(elementwise_interpreted, dtype):
    """triton_decode_attention (rotary, cache write and grouped attention of one decode step in one launch) against
    float64 attention over the cache with the new key and value: as close as the eager step's SDPA is (one split,
    and the cache split over programs and combined; no grouping too). It writes the new key and value at the slot,
    bit for bit what the rotary kernel and the value rows give, and no other slot."""
    cases = {key: value for key, value in elementwise_interpreted.items() if key.startswith(f"decode_attention/{dtype}/")}
    assert len(cases) == 3, sorted(cases)
    for key, (error, eager_error, cache_written, others_untouched) in cases.items():
        assert error < 2 * eager_error + {"bf16": 2e-3, "fp16": 2e-4}[dtype], (key, error, eager_error)
        assert cache_written and others_untouched, key


def test_static_decoding_takes_the_decode_attention_kernel(elementwise_interpreted):
    """A tiny fp16 ChatGLM2 decoding 12 tokens on the static cache: one fused attention launch per layer and step (2
    layers, 11 steps after the prefill), the tokens of the eager attention, and scores within fp16 rounding of its;
    the residual adds fused into the norms after them, bit for bit what separate adds give."""
    decode = elementwise_interpreted["decode"]
    assert decode["launches"] == 22, decode
    # each block's two residual adds run in the norm after them (the first block has none before its first norm)
    assert decode["add_norm_launches"] == 11 * 4 and decode["fused_adds_bitwise"], decode
    assert decode["same_tokens"] and decode["distinct"] > 3, decode
    assert decode["max_score_difference"] < 2e-2, decode


@pytest.mark.parametrize("kind", ["glm", "glm4"])
def test_glm4_decodes_on_the_decode_attention_kernel(elementwise_interpreted, kind):
    """Tiny fp16 GLM-4s of both layouts on ChatGLM2's static step (utils/glm_decode.py): one fused attention launch per
    layer and step, transformers' tokens, and scores within fp16 rounding of its (relative to their scale)."""
    decode = elementwise_interpreted[f"glm_decode/{kind}"]
    assert decode["launches"] == 22, decode
    assert decode["same_tokens"] and decode["distinct"] > 3, decode
    assert decode["max_score_difference"] < 5e-3 * decode["max_score"], decode


def compile_for_hopper(kernel, signature, constexprs, aligned=()):
    """PTX of `kernel` compiled ahead of time for an H100/H200 (sm_90) by the ptxas that ships with triton: no GPU
    needed, and the compile errors the interpreter cannot show (types of loop bounds, dot shapes) show here. `aligned`
    names the arguments that are multiples of 16 (pointers: 16-byte aligned), as triton's launcher finds them at run
    time for the model's tensors and strides: what lets it vectorize accesses."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(list(signature).index(name),): [["tt.divisibility", 16]] for name in aligned}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    return compiled.asm["ptx"]


triton = importlib.import_module("triton") if importlib.util.find_spec("triton") else None


@pytest.mark.skipif(triton is None or os.environ.get("TRITON_INTERPRET") == "1", reason="needs triton, compiled")
@pytest.mark.parametrize("split,block_n", [(False, 64), (True, 64), (False, 128)])
def test_decode_kernels_compile_for_hopper_without_spills(split, block_n):
    """The decode attention kernel at ChatGLM2/3's shapes (32 query heads in 2 groups of 128 dims, bf16), unsplit and
    split with its combine kernel, with the default slots per step and the largest that kernel_bench.py sweeps, and the add + RMSNorm kernel at 4096 wide, compile for sm_90: tensor-core products
    in the attention, nothing spilled to local memory."""
    kernels = remote_module("chatglm2-6b", "kernels")
    pointers = ["qkv", "cos", "sin", "keys", "values", "valid", "slot", "out", "partial", "stats"]
    types = ["*bf16"] * 5 + ["*i1", "*i64", "*bf16", "*fp32", "*fp32"]
    signature = {f"{name}_ptr": kind for name, kind in zip(pointers, types)}
    signature.update({name: "i32" for name in ("qkv_row_stride", "angle_stride_b", "cache_stride_b", "cache_stride_g",
                                                "valid_stride_b", "chunk")}, scale="fp32")
    constexprs = {"HEADS": 32, "KV_HEADS": 2, "HEAD_DIM": 128, "PAIRS": 32, "GROUP_BLOCK": 16, "BLOCK_N": block_n,
                  "SPLIT": split, "DOT_IN_FP32": False, "PDL": True}
    signature.update({name: "constexpr" for name in constexprs})
    attention = compile_for_hopper(kernels._decode_attention_kernel, signature, constexprs)
    assert "mma" in attention
    ptx = [attention]
    if split:
        constexprs = {"HEADS": 32, "KV_HEADS": 2, "HEAD_DIM": 128, "GROUP_BLOCK": 16, "SPLITS_BLOCK": 8, "PDL": True}
        ptx.append(compile_for_hopper(kernels._decode_attention_combine_kernel,
                                      {"partial_ptr": "*fp32", "stats_ptr": "*fp32", "out_ptr": "*bf16", "splits": "i32",
                                       **{name: "constexpr" for name in constexprs}}, constexprs))
    else:
        ptx.append(compile_for_hopper(kernels._add_rms_norm_kernel,
                                      {"x_ptr": "*bf16", "update_ptr": "*bf16", "weight_ptr": "*bf16", "sum_ptr": "*bf16",
                                       "out_ptr": "*bf16", "H": "i32", "eps": "fp32", "BLOCK": "constexpr",
                                       "PDL": "constexpr"}, {"BLOCK": 4096, "PDL": True}))
    for text in ptx:
        assert "ld.local" not in text and "st.local" not in text
        # launched programmatically: the next kernel may start at once, and this one waits for the one before
        assert text.index("griddepcontrol.launch_dependents") < text.index("griddepcontrol.wait") < text.index("st.global")


@pytest.mark.skipif(triton is None or os.environ.get("TRITON_INTERPRET") == "1", reason="needs triton, compiled")
@pytest.mark.parametrize("bits", [0, 8, 4])
@pytest.mark.parametrize("gated", [False, True])
def test_batch_one_products_read_their_first_weight_step_before_waiting_on_hopper(bits, gated):
    """The batch-1 loop as launch_config runs ChatGLM2's 4096 x 4096 layer (unsplit for float and int8, split for
    int4), compiled for sm_90 and launched programmatically: it loads its first weight step in 16-byte accesses, only
    then waits for the kernel before it (whose output is x), lets the next kernel start only after its K loop, and
    spills nothing; a split takes its ticket with an acquire-release atomic after a barrier, and the last split zeroes
    its counter. Every format reads x without a barrier a step; int8 and int4 make their values with byte permutes.
    The same with SwiGLU in the launch (gated)."""
    kernels = remote_module("chatglm2-6b", "kernels")
    block_n, block_k, split_k, num_warps, num_stages, use_dot = kernels.launch_config(1, 4096, 4096, bits, 132)
    assert not use_dot and (split_k > 1) == (bits == 4)
    pointers = {"x_ptr": "*bf16", "w_ptr": "*i8" if bits else "*bf16", "scale_ptr": "*bf16", "bias_ptr": "*bf16",
                "out_ptr": "*bf16", "partial_ptr": "*fp32", "ticket_ptr": "*i32"}
    signature = {**pointers, **{name: "i32" for name in ("M", "N", "K", "stride_xm", "stride_wn", "chunks_per_split",
                                                          "split_k")}}
    constexprs = {"BITS": bits, "BLOCK_N": block_n, "BLOCK_K": block_k, "BLOCK_M": 1, "USE_DOT": False,
                  "PARTIAL": split_k > 1, "HAS_SCALE": bits > 0, "HAS_BIAS": False, "DOT_IN_FP32": False, "PDL": True,
                  "BYTE_PERMUTE": True, "SPLITS_BLOCK": kernels._splits_block(1, split_k), "GATED": gated}
    signature.update({name: "constexpr" for name in constexprs})
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    aligned = list(pointers) + ["K", "stride_xm", "stride_wn"]
    attrs = {(list(signature).index(name),): [["tt.divisibility", 16]] for name in aligned}
    ptx = triton.compile(ASTSource(fn=kernels._small_batch_linear_kernel, signature=signature, constexprs=constexprs,
                                   attrs=attrs), target=GPUTarget("cuda", 90, 32),
                         options={"num_warps": num_warps, "num_stages": num_stages}).asm["ptx"]
    wait = ptx.index("griddepcontrol.wait")
    start_next = ptx.index("griddepcontrol.launch_dependents")  # after the K loop
    assert start_next > wait and re.search(r"fma\.rn\.f32", ptx[:start_next]) and "fma.rn.f32" not in ptx[start_next:]
    sixteen_bytes = r"ld\.global(\.\w+)*\.(v4\.\w32|v2\.\w64)"  # floats are read as int64 words, two at a time
    assert re.search(sixteen_bytes, ptx[:wait]), "the first weight step is read before the wait"
    assert "ld.local" not in ptx and "st.local" not in ptx
    if split_k > 1:
        ticket = re.search(r"atom\.global\.gpu\.acq_rel\.add", ptx)
        assert ticket and ptx.rindex("bar.sync", 0, ticket.start()) > wait
        assert re.search(r"atom\.global\.gpu\.acq_rel\.exch", ptx)
    # x read in the weight's layout: no barrier in the loop; quantized values made by byte permutes
    loops = [ptx[ptx.index(f"{label}:"):jump.start()] for jump in re.finditer(r"bra(\.uni)?\s+(\$L__BB\w+);", ptx)
             for label in [jump.group(2)] if ptx.index(f"{label}:") < jump.start()]
    loop = max(loops, key=len)  # the K loop: the longest backward jump
    assert "fma.rn.f32" in loop and "bar.sync" not in loop and "ld.shared" not in loop
    assert loop.count("prmt.b32") >= {0: 0, 8: 2, 4: 8}[bits]


@pytest.mark.skipif(triton is None or os.environ.get("TRITON_INTERPRET") == "1", reason="needs triton, compiled")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_dequantize_kernel_reads_and_writes_vectors_without_spills_on_hopper(bits, dtype):
    """triton_dequantize's kernel at ChatGLM2-6B's width (tiles of 4 x 1024 values), compiled for sm_90: the stored
    weight is read in 16-byte (int8) or 8-byte (int4: half as many bytes) vectors, the float weight written in 16-byte
    ones, and nothing spills to local memory."""
    kernels = remote_module("chatglm2-6b", "kernels")
    signature = {"q_ptr": "*i8", "scale_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "N": "i32", "K": "i32"}
    constexprs = {"BITS": bits, "ROWS": 4, "COLS": 1024}
    signature.update({name: "constexpr" for name in constexprs})
    ptx = compile_for_hopper(kernels._dequantize_kernel, signature, constexprs,
                             aligned=("q_ptr", "scale_ptr", "out_ptr", "K"))
    assert re.search(r"ld\.global(\.\w+)*\.v" + ("4" if bits == 8 else "2"), ptx), ptx[-2000:]
    assert re.search(r"st\.global(\.\w+)*\.v4", ptx), ptx[-2000:]
    assert "ld.local" not in ptx and "st.local" not in ptx


@pytest.mark.skipif(triton is None or os.environ.get("TRITON_INTERPRET") == "1", reason="needs triton, compiled")
def test_rotary_kernel_moves_whole_heads_in_16_byte_accesses_on_hopper():
    """The training and prefill rotary (ChatGLM2/3: 34 rotated heads of 128 dims in a 4,608-wide qkv row, bf16) reads
    and writes each head in 16-byte vector accesses, never value by value (a pair's two values 2 bytes apart were read
    and written one at a time: 91 µs a call at 4 x 512 tokens on an H100, ~0.4 TB/s), and spills nothing."""
    kernels = remote_module("chatglm2-6b", "kernels")
    signature = {"qkv_ptr": "*bf16", "cos_ptr": "*bf16", "sin_ptr": "*bf16", "out_ptr": "*bf16", "row_stride": "i32",
                 "out_row_stride": "i32", "heads": "i32", "seq": "i32", "angle_stride_b": "i32", "angle_stride_s": "i32",
                 "sign": "fp32"}
    constexprs = {"HEAD_DIM": 128, "PAIRS": 32, "HEADS_BLOCK": 64}
    signature.update({name: "constexpr" for name in constexprs})
    ptx = compile_for_hopper(kernels._rotary_kernel, signature, constexprs,
                             aligned=("qkv_ptr", "cos_ptr", "sin_ptr", "out_ptr", "row_stride", "out_row_stride",
                                      "angle_stride_b", "angle_stride_s"))
    assert re.search(r"ld\.global(\.\w+)*\.v4", ptx) and re.search(r"st\.global(\.\w+)*\.v4", ptx), ptx[-2000:]
    assert not re.search(r"(ld|st)\.global(\.\w+)*\.b16", ptx)
    assert "ld.local" not in ptx and "st.local" not in ptx


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled batch-1 loop runs on CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_batch_one_products_take_x_at_any_offset_on_cuda(dtype, bits):
    """The batch-1 loop reads x 8 bytes at a time: an x that starts 2 bytes into its storage (a view) gives what an
    aligned copy gives, bit for bit, and that is the float64 product's within the output's rounding, at ChatGLM2-6B's
    QKV and FFN-down shapes (unsplit and split), for every format."""
    kernels = remote_module("chatglm2-6b", "kernels")
    quantization = remote_module("chatglm2-6b", "quantization")
    for N, K in ((4608, 4096), (4096, 13696)):
        weight = torch.randn(N, K, device="cuda") * 0.02
        stored, scale = (quantization.quantize_weight(weight, bits, scale_dtype=dtype) if bits
                         else (weight.to(dtype), None))
        x = torch.randn(1, K + 1, device="cuda", dtype=dtype)[:, 1:]
        out = kernels.small_batch_linear(x, stored, None, scale, bits)
        assert torch.equal(out, kernels.small_batch_linear(x.clone(), stored, None, scale, bits))
        exact = quantization.dequantize_weight(stored, scale, bits, torch.float64) if bits else stored.double()
        reference = x.double() @ exact.T
        assert ((out.double() - reference).norm() / reference.norm()).item() < 1e-2
        rounded = reference.to(dtype).double()  # the float64 product rounded once: what the kernel's output can reach
        assert ((out.double() - reference).norm() / (rounded - reference).norm()).item() < 1.1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels run on CUDA only")
@pytest.mark.parametrize("bits", [8, 4])
def test_dequantized_weights_on_cuda_give_the_bits_of_the_torch_expansion(bits):
    """dequantize_weight's one Triton launch on CUDA gives the bits of unpack_int4(q).to(dtype) * scale in every
    float dtype, at a small odd shape and at ChatGLM2-6B's FFN-down and output-layer shapes."""
    kernels = remote_module("chatglm2-6b", "kernels")
    quantization = remote_module("chatglm2-6b", "quantization")
    for N, K in ((37, 1000), (4096, 13696), (65024, 4096)):
        stored, scale = quantization.quantize_weight(torch.randn(N, K, device="cuda"), bits, scale_dtype=torch.bfloat16)
        unpacked = quantization.unpack_int4(stored) if bits == 4 else stored
        assert kernels.dequantize_kernel_applies(stored, torch.bfloat16)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            out = quantization.dequantize_weight(stored, scale, bits, dtype)
            assert out.dtype == dtype and torch.equal(out, unpacked.to(dtype) * scale.to(dtype)[:, None]), (N, K, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled kernels run on CUDA only")
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_gated_products_on_cuda_give_the_bits_of_the_product_then_swiglu(bits):
    """ChatGLM2-6B's and GLM-4-9B's gate/up layer (27392 x 4096) at batch 1, compiled as the decode step runs it
    (launch_config, launched programmatically on Hopper): SwiGLU in the product's launch gives the bits of the product
    followed by triton_swiglu."""
    kernels = remote_module("chatglm2-6b", "kernels")
    quantization = remote_module("chatglm2-6b", "quantization")
    generator = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn(27392, 4096, device="cuda", generator=generator, dtype=torch.bfloat16) * 0.02
    x = torch.randn(1, 4096, device="cuda", generator=generator, dtype=torch.bfloat16)
    stored, scale = quantization.quantize_weight(weight, bits, scale_dtype=torch.bfloat16) if bits else (weight, None)
    unfused = kernels.triton_swiglu(kernels.small_batch_linear(x, stored, None, scale, bits))
    gated = kernels.small_batch_linear(x, stored, None, scale, bits, gated=True)
    assert gated.shape == (1, 13696) and torch.equal(gated, unfused)
