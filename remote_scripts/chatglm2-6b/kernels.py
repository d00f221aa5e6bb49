"""A Triton kernel for decode-time linear layers: y = x W^T (+ b) with few activation rows (M <= 16).

Why: generating one token at a time turns every linear layer into a matrix-vector product whose speed is the speed of
streaming the weight from memory. cuBLAS reads a bf16 weight at one row at 2.1-2.8 TB/s of an H100's ~3.0 (this
kernel: 2.4-3.0), and our int8/int4 layers (quantization.py) would otherwise dequantize the whole weight before every
matmul. This kernel streams the stored weight once, in any of three formats:
- float [N, K] in the dtype of x (plain nn.Linear weights; decode steps send one-row products here);
- int8 [N, K] with one scale per output row: w[n, k] = scale[n] * q[n, k];
- int4 packed two per byte, int8 [N, K/2] (the layout of quantization.py: byte j of a row holds column 2j in its high
  nibble and column 2j+1 in its low nibble, both signed), with one scale per output row.
The scale is applied to the fp32 accumulator, the bias added, and the result cast once to x's dtype.

Design:
- grid (N blocks, K splits); each program streams [BLOCK_N, BLOCK_K] weight tiles (coalesced along K) over its share
  of K. The split count is chosen per shape (launch_config) so that every SM gets work. Split programs write fp32
  partials [SPLIT_K, M, N] and take a ticket from their row block's counter; the last one sums the partials in split
  order, scales, adds the bias and casts: one launch per product, and the same input gives bit-identical output on
  every call (decoding tests compare tokens).
- Two inner loops. FMA: multiply-and-add on CUDA cores into one fp32 accumulator per weight word of the tile (the
  weight read as words of 4 stored elements, x in the same layout, so no step waits on a barrier), summed over K
  once at the end; for M == 1, where a tensor-core tile would be 15/16 padding. Dot: tl.dot of the weight tile with
  x^T padded to 16 rows (masked), the weight as the large operand so that one pass over it serves all rows; for
  1 < M <= 16.
- No int-to-float conversion instructions (a quarter of the FP32 rate on Hopper). In the batch-1 loop an int8 q is
  the low byte of an fp16 1024 + (q + 128), two a byte permute, widened to fp32 (_int8_bytes_fp32), and int4 nibbles
  are floats by their bits alone, one byte permute a value (_int4_bytes_fp32): the offsets are undone once per program
  from the sum of x. For tensor-core operands an int8 q becomes a float by adding it to the bit pattern of 2^23 + 128
  and subtracting 2^23 + 128, and int4 nibbles two values per shift and logic op (_int4_offset_half_pair).
- On Hopper the decode kernels here launch programmatically (_programmatic_launch): each starts while the one before
  it finishes, and a product reads its first weight step before waiting for its input.

Use (callers fall back to F.linear wherever the predicate says no):

    if small_batch_kernel_applies(x, layer.in_features):
        y = small_batch_linear(x, layer.weight, layer.bias, scale=layer.weight_scale, bits=layer.bits)  # or bits=None

The op is registered with torch.library.triton_op (torch >= 2.6), so torch.compile (including CUDA graphs with
mode="reduce-overhead") sees the Triton launches: no host syncs, no data-dependent control flow. Triton is imported
guarded: without it (CPU installs) this module still imports and small_batch_kernel_applies() says False. With
TRITON_INTERPRET=1 the kernels run on CPU tensors in Triton's interpreter (the tests do that).
"""
import functools
import hashlib
import math
from pathlib import Path
from typing import List, Optional

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # programmatic launch (triton >= 3.3)
except Exception:  # not installed (CPU installs) or unusable: callers fall back to F.linear
    triton = None

MAX_ROWS = 16  # rows of x (tokens) the kernel serves; more rows are a compute-bound matmul, cuBLAS's job
MIN_BLOCK_K = 64  # in_features must be a multiple of this (tiny test models are 64 wide)
# int4 runs tl.dot over K/8 packed words per step, and a GPU tl.dot needs at least 16: int4 layers need 128 | K.
INT4_MIN_BLOCK_K = 128
# Preferred K step (values) per (format, tensor-core path): 128-256 contiguous bytes per weight row and step; int8 on
# tensor cores takes 128 to stay under ~100 registers (256 needs 186: 2 programs per SM). 13696 (ChatGLM2's FFN
# width) = 128 * 107, so that shape gets 128 whatever the format.
PREFERRED_BLOCK_K = {(0, False): 128, (0, True): 128, (8, False): 256, (8, True): 128, (4, False): 256, (4, True): 256}
BYTES_PER_VALUE = {0: 2, 8: 1, 4: 0.5}
PROGRAMS_PER_SM = 4  # aim for this many programs per SM (several resident per SM hide memory latency)
MAX_BYTES_PER_PROGRAM = 256 * 1024  # and split long rows further, so that the last wave of programs is short
MIN_STEPS_PER_SPLIT = 2  # a program runs at least 2 K steps where K allows, so its loads overlap its math
PARTIAL_TRAFFIC = 0.5  # fp32 partial sums (written, then read; mostly in L2) stay under half the weight's bytes
DEFAULT_SM_COUNT = 132  # H100 SXM; used where there is no CUDA device (the interpreter)
BATCH_ONE_BLOCK_K = 512  # the batch-1 (FMA) loop's K step where K allows: 8-32 KB of weight per program and step
MAX_ROW_BLOCKS = 1 << 16  # row blocks of one call (the split counters' buffer)
MAX_SPLITS_AT_ONCE = 32  # the batch-1 loop's last split program loads up to this many partials at once
PROGRAMMATIC_LAUNCH = True  # Hopper: the decode kernels launch programmatically (see _programmatic_launch)


def _ceil_div(a, b):
    return -(-a // b)


def _format_bits(bits):
    if bits in (None, 0):
        return 0
    if bits not in (4, 8):
        raise ValueError(f"bits={bits!r}: expected None (float weight), 8 (int8) or 4 (packed int4)")
    return bits


def split_count(M, N, K, bits, block_n, block_k, sm_count=DEFAULT_SM_COUNT):
    """How many K splits: enough programs for every SM, programs of at most MAX_BYTES_PER_PROGRAM, no split shorter
    than MIN_STEPS_PER_SPLIT steps (where K allows) and bounded partial-sum traffic; no empty split."""
    steps = K // block_k
    row_block_bytes = block_n * K * BYTES_PER_VALUE[bits]
    split_k = max(_ceil_div(PROGRAMS_PER_SM * sm_count, _ceil_div(N, block_n)),
                  math.ceil(row_block_bytes / MAX_BYTES_PER_PROGRAM))
    partial_limit = int(PARTIAL_TRAFFIC * K * BYTES_PER_VALUE[bits] / (8 * M))  # split * M * N * 8 <= share * N * K * b
    split_k = max(1, min(split_k, steps // MIN_STEPS_PER_SPLIT, partial_limit))
    return _ceil_div(steps, _ceil_div(steps, split_k))


def _batch_one_config(N, K, bits, sm_count):
    """launch_config for M == 1: the FMA loop, from a sweep of ChatGLM2-6B's and GLM-4-9B's four layer shapes on an
    H100 (docs/benchmarks.md, eighteenth session: ~1,000 configs, 28 distinct weights per shape in one CUDA graph).
    Long K steps (512 values where K allows) keep more bytes in flight per program. Float and int8 weights take 16
    rows per program and no split where there is at least one row block per SM (4 programs per SM otherwise); tall
    int8 layers (gate/up, the output layer) take 64 rows in 256-value steps on 4 warps, so that each thread's 8 rows
    share its x values (3.5 instructions a weight byte against 4.4 at 16 rows; the best config timed inside the
    chained decode step on an H100, twenty-seventh session); int4 takes 32 rows in 256-value steps on 4 warps (128
    rows and 8 warps where K allows only 128-value steps) and 4 programs per SM (the byte-permute loop, swept again in
    the twenty-second session)."""
    block_k = BATCH_ONE_BLOCK_K
    while K % block_k:
        block_k //= 2
    if bits == 4:
        block_k = min(block_k, 256)
        block_n, num_warps = (32, 4) if block_k == 256 else (128, 8)
    else:
        block_n, num_warps = (16, 8) if block_k == BATCH_ONE_BLOCK_K else (32, 8)
        if bits == 8 and _ceil_div(N, block_n) >= PROGRAMS_PER_SM * sm_count:  # tall int8: 64 rows, 4 warps
            block_n, block_k, num_warps = 64, block_k // 2, 4
    row_blocks = _ceil_div(N, block_n)
    steps = K // block_k
    split_k = 1 if bits != 4 and row_blocks >= sm_count else min(steps, _ceil_div(PROGRAMS_PER_SM * sm_count, row_blocks))
    split_k = _ceil_div(steps, _ceil_div(steps, split_k))  # no empty split
    return [block_n, block_k, split_k, num_warps, 1, 0]


def launch_config(M, N, K, bits=None, sm_count=DEFAULT_SM_COUNT):
    """[block_n, block_k, split_k, num_warps, num_stages, use_dot] for x [M, K] and a weight of N rows: a pure
    function of the shape and the SM count, so a shape always runs the same way (and gives the same bits).

    M == 1 runs the FMA loop (_batch_one_config, measured). More rows use tensor cores (instructions per weight byte,
    from the SASS: float 1, int8 6, int4 6.3 with 128 rows; ~10 is the issue limit at full bandwidth on an H100)."""
    bits = _format_bits(bits)
    if K % MIN_BLOCK_K:
        raise ValueError(f"in_features={K} is not a multiple of {MIN_BLOCK_K}")
    if M == 1:
        return _batch_one_config(N, K, bits, sm_count)
    use_dot = True
    block_k = PREFERRED_BLOCK_K[bits, use_dot]
    while K % block_k:
        block_k //= 2
    if bits == 4:  # 128 rows halve the cost of x per weight byte, where the layer is tall enough to keep every SM busy
        wide_split = split_count(M, N, K, bits, 128, block_k, sm_count)
        block_n = 128 if _ceil_div(N, 128) * wide_split >= 2 * sm_count else 64
    else:
        block_n = 64
    return [block_n, block_k, split_count(M, N, K, bits, block_n, block_k, sm_count), 4, 3, 1]


@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _device_sm_count(device):
    """The SM count of a CUDA device; DEFAULT_SM_COUNT elsewhere (the interpreter)."""
    if device.type != "cuda":
        return DEFAULT_SM_COUNT
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


if triton is not None:

    @triton.jit
    def _int8_to_float(q):
        """int8 values -> exact fp32 via 2^23 + (q + 128) - (2^23 + 128)."""
        bits = q.to(tl.int32) + 0x4B000080
        return bits.to(tl.float32, bitcast=True) - 8388736.0

    # int4: a row of K values is K/8 little-endian int32 words; nibble i (bits 4i..4i+3) of word j is column
    # 8j + (i ^ 1) (byte i//2 holds column 2(i//2) in its high nibble). A signed nibble s XOR 8 is s + 8 in 0..15;
    # placed in a float's mantissa under a fixed exponent it is an exact float a + (s + 8) * b: no int-to-float
    # conversion, no subtraction per value. The offset is undone once per program from the sum of x:
    # sum(s * x) = (sum((a + (s + 8) * b) * x) - (a + 8 * b) * sum(x)) / b.

    @triton.jit
    def _int4_bytes_fp32(words, BYTE_PERMUTE: tl.constexpr):
        """The 8 nibbles of each int32 word as fp32 0.5 + (s + 8)/256, in column order: byte b's high nibble is column
        2b, its low nibble column 2b + 1. BYTE_PERMUTE: PRMT in inline PTX (compiled); else the same values by shifts
        and masks (the interpreter runs no inline assembly)."""
        if BYTE_PERMUTE:
            values = tl.inline_asm_elementwise(
                """{
                .reg .b32 low, high, half;
                and.b32 low, $8, 0x0F0F0F0F;
                xor.b32 low, low, 0x08080808;
                shr.u32 high, $8, 4;
                and.b32 high, high, 0x0F0F0F0F;
                xor.b32 high, high, 0x08080808;
                mov.b32 half, 0x3F000000;
                prmt.b32 $0, high, half, 0x7054;
                prmt.b32 $1, low, half, 0x7054;
                prmt.b32 $2, high, half, 0x7154;
                prmt.b32 $3, low, half, 0x7154;
                prmt.b32 $4, high, half, 0x7254;
                prmt.b32 $5, low, half, 0x7254;
                prmt.b32 $6, high, half, 0x7354;
                prmt.b32 $7, low, half, 0x7354;
                }""",
                "=r,=r,=r,=r,=r,=r,=r,=r,r", [words], dtype=(tl.int32,) * 8, is_pure=True, pack=1)
            c0, c1, c2, c3, c4, c5, c6, c7 = values
        else:  # byte b's high nibble (bits 8b + 4..) first, then its low one
            c0, c1, c2, c3 = (_nibble_bits(words, 4), _nibble_bits(words, 0), _nibble_bits(words, 12),
                              _nibble_bits(words, 8))
            c4, c5, c6, c7 = (_nibble_bits(words, 20), _nibble_bits(words, 16), _nibble_bits(words, 28),
                              _nibble_bits(words, 24))
        return (c0.to(tl.float32, bitcast=True), c1.to(tl.float32, bitcast=True), c2.to(tl.float32, bitcast=True),
                c3.to(tl.float32, bitcast=True), c4.to(tl.float32, bitcast=True), c5.to(tl.float32, bitcast=True),
                c6.to(tl.float32, bitcast=True), c7.to(tl.float32, bitcast=True))

    @triton.jit
    def _int8_bytes_fp32(words, BYTE_PERMUTE: tl.constexpr):
        """The 4 int8 values q of each int32 word (byte i is column i) as exact fp32 1024 + (q + 128): each byte, its
        sign bit flipped, is the low mantissa byte of an fp16 1024 + (q + 128) (two bytes a permute), widened to fp32.
        The offset is undone once per program, as int4's is. BYTE_PERMUTE: PRMT in inline PTX (compiled); else the
        same values by shifts and masks (the interpreter)."""
        if BYTE_PERMUTE:
            c0, c1, c2, c3 = tl.inline_asm_elementwise(
                """{
                .reg .b32 flipped, ones, low, high;
                .reg .b16 h0, h1, h2, h3;
                xor.b32 flipped, $4, 0x80808080;
                mov.b32 ones, 0x64646464;
                prmt.b32 low, flipped, ones, 0x4140;
                prmt.b32 high, flipped, ones, 0x4342;
                mov.b32 {h0, h1}, low;
                mov.b32 {h2, h3}, high;
                cvt.f32.f16 $0, h0;
                cvt.f32.f16 $1, h1;
                cvt.f32.f16 $2, h2;
                cvt.f32.f16 $3, h3;
                }""",
                "=r,=r,=r,=r,r", [words], dtype=(tl.float32,) * 4, is_pure=True, pack=1)
            return c0, c1, c2, c3
        return (((words & 0xFF) ^ 0x80).to(tl.float32) + 1024.0, (((words >> 8) & 0xFF) ^ 0x80).to(tl.float32) + 1024.0,
                (((words >> 16) & 0xFF) ^ 0x80).to(tl.float32) + 1024.0,
                (((words >> 24) & 0xFF) ^ 0x80).to(tl.float32) + 1024.0)

    @triton.jit
    def _nibble_bits(words, SHIFT: tl.constexpr):
        """The bits of fp32 0.5 + (s + 8)/256 for the nibble at bit SHIFT of each word (what one PRMT gives)."""
        return ((((words >> SHIFT) & 0xF) ^ 8) << 16) | 0x3F000000

    @triton.jit
    def _half_pair_fp32(pair, DTYPE: tl.constexpr):
        """The two 16-bit floats (bf16 or fp16) of an int32, the first in the low half, as fp32. A bf16 is an fp32
        with its low 16 bits zero: one shift or mask each."""
        if DTYPE == tl.bfloat16:
            return (pair << 16).to(tl.float32, bitcast=True), (pair & -65536).to(tl.float32, bitcast=True)
        return (pair.to(tl.int16).to(DTYPE, bitcast=True).to(tl.float32),
                (pair >> 16).to(tl.int16).to(DTYPE, bitcast=True).to(tl.float32))

    @triton.jit
    def _int4_offset_half_pair(words, P: tl.constexpr, DTYPE: tl.constexpr):
        """Nibbles P and P + 4 of each word (16 bits apart) as 1.5 + s/16 in DTYPE (bf16 or fp16), both made by one
        shift and one logic op on the word; returns (nibble P, nibble P + 4)."""
        IS_BF16: tl.constexpr = DTYPE == tl.bfloat16
        TOP: tl.constexpr = 3 if IS_BF16 else 6  # lowest of the top four mantissa bits of a 16-bit float
        MASK: tl.constexpr = 0x00780078 if IS_BF16 else 0x03C003C0
        ONES: tl.constexpr = 0x3FC03FC0 if IS_BF16 else 0x3E003E00  # 1.0 with the nibble's sign bit flipped
        if P * 4 <= TOP:
            moved = words << (TOP - P * 4)
        else:
            moved = words >> (P * 4 - TOP)
        pair = (moved & MASK) ^ ONES
        return pair.to(tl.int16).to(DTYPE, bitcast=True), (pair >> 16).to(tl.int16).to(DTYPE, bitcast=True)

    @triton.jit
    def _dot(a, b, acc, DOT_IN_FP32: tl.constexpr):
        """acc + a @ b. DOT_IN_FP32 only under the interpreter with bf16: its tl.dot multiplies the raw bf16 bit
        patterns (triton 3.9); bf16 products are exact in fp32, so the result is the same."""
        if DOT_IN_FP32:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a, b, acc)

    @triton.jit
    def _finish(acc, offs_n, n_mask, scale_ptr, bias_ptr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr):
        """Per-row scale and bias on the fp32 result; acc's last axis runs over offs_n."""
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            acc = acc + tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        return acc

    @triton.jit
    def _weight_rows(offs_n, pair0, N, BLOCK_N: tl.constexpr, GATED: tl.constexpr):
        """The weight rows of a program's result columns offs_n, and which exist. GATED: the columns are pairs (gate
        row j, up row N/2 + j) for j = pair0, pair0 + 1, ..."""
        if GATED:
            pairs = pair0 + tl.arange(0, BLOCK_N) // 2
            return pairs + (tl.arange(0, BLOCK_N) % 2) * (N // 2), pairs < N // 2
        return offs_n, offs_n < N

    @triton.jit
    def _store_out(out_ptr, result, offs_m, m_mask, offs_n, n_mask, pair0, N, GATED: tl.constexpr):
        """out[m, n] = result[m, n] in out's dtype (rows offs_m of out, columns offs_n). GATED: result's columns are
        pairs (gate j, up j) for j = pair0, pair0 + 1, ...; out, N / 2 wide, gets silu(gate) * up, the two rounded to
        out's dtype first: the bits of the unfused product followed by _swiglu_kernel."""
        dtype = out_ptr.dtype.element_ty
        if GATED:
            HALF: tl.constexpr = result.shape[1] // 2
            gate, up = tl.split(tl.reshape(result.to(dtype).to(tl.float32), [result.shape[0], HALF, 2]))
            cols = pair0 + tl.arange(0, HALF)
            tl.store(out_ptr + offs_m[:, None] * (N // 2) + cols[None, :], (gate * tl.sigmoid(gate) * up).to(dtype),
                     mask=m_mask[:, None] & (cols < N // 2)[None, :])
        else:
            tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], result.to(dtype),
                     mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _programmatic_start(PDL: tl.constexpr):
        """Under programmatic launch: let the next kernel start now, and wait for the one before (its writes)."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()

    @triton.jit
    def _batch_one_step(x_ptr, w, k0, offs_s, acc2, x_total, BITS: tl.constexpr, BYTE_PERMUTE: tl.constexpr):
        """One K step of the batch-1 loop: w is the step's stored weight tile [BLOCK_N, stored values]."""
        if BITS == 4:
            # x as two 8-byte loads a word (its columns 0-3 and 4-7), made in the weight's layout: no shuffles
            # between threads (the caller aligns x to 8 bytes)
            quads = x_ptr.to(tl.pointer_type(tl.int64)) + k0 // 4 + 2 * offs_s
            front = tl.load(quads)
            back = tl.load(quads + 1)
            x0, x1 = _half_pair_fp32(front.to(tl.int32), x_ptr.dtype.element_ty)
            x2, x3 = _half_pair_fp32((front >> 32).to(tl.int32), x_ptr.dtype.element_ty)
            x4, x5 = _half_pair_fp32(back.to(tl.int32), x_ptr.dtype.element_ty)
            x6, x7 = _half_pair_fp32((back >> 32).to(tl.int32), x_ptr.dtype.element_ty)
            w0, w1, w2, w3, w4, w5, w6, w7 = _int4_bytes_fp32(w, BYTE_PERMUTE)
            acc2 += w0 * x0[None, :]  # one at a time: each a fused multiply-add
            acc2 += w1 * x1[None, :]
            acc2 += w2 * x2[None, :]
            acc2 += w3 * x3[None, :]
            acc2 += w4 * x4[None, :]
            acc2 += w5 * x5[None, :]
            acc2 += w6 * x6[None, :]
            acc2 += w7 * x7[None, :]
            x_total += tl.load(x_ptr + k0 + tl.arange(0, 8 * offs_s.shape[0])).to(tl.float32)  # its own layout
        else:  # int8 (int32 words) and 16-bit floats (int64 words), 4 values a word: x as one 8-byte load a word
            quads = tl.load(x_ptr.to(tl.pointer_type(tl.int64)) + k0 // 4 + offs_s)  # in the weight's layout
            x0, x1 = _half_pair_fp32(quads.to(tl.int32), x_ptr.dtype.element_ty)
            x2, x3 = _half_pair_fp32((quads >> 32).to(tl.int32), x_ptr.dtype.element_ty)
            if BITS == 8:
                w0, w1, w2, w3 = _int8_bytes_fp32(w, BYTE_PERMUTE)
            else:
                w0, w1 = _half_pair_fp32(w.to(tl.int32), x_ptr.dtype.element_ty)
                w2, w3 = _half_pair_fp32((w >> 32).to(tl.int32), x_ptr.dtype.element_ty)
            acc2 += w0 * x0[None, :]
            acc2 += w1 * x1[None, :]
            acc2 += w2 * x2[None, :]
            acc2 += w3 * x3[None, :]
            if BITS == 8:  # the sum of x, for the offset
                x_total += tl.load(x_ptr + k0 + tl.arange(0, 4 * offs_s.shape[0])).to(tl.float32)
        return acc2, x_total

    @triton.jit
    def _sum_of_splits(partials, split_stride, split_k, mask, SPLITS_BLOCK: tl.constexpr):
        """sum over s < split_k of partials[s * split_stride] in a fixed order: the same bits whichever split is last.
        Read from L2 (.cg): other SMs wrote them. SPLITS_BLOCK > 1 (>= split_k): every split in one load and one
        reduction, so the last program waits one L2 round trip, not split_k; else one split after another."""
        if SPLITS_BLOCK > 1:
            s = tl.arange(0, SPLITS_BLOCK)[:, None, None]
            parts = tl.load(partials[None, :, :] + s * split_stride, mask=mask[None, :, :] & (s < split_k), other=0.0,
                            cache_modifier=".cg")
            return tl.sum(parts, axis=0)
        total = tl.load(partials, mask=mask, other=0.0, cache_modifier=".cg")
        for s in range(1, split_k):
            total += tl.load(partials + s * split_stride, mask=mask, other=0.0, cache_modifier=".cg")
        return total

    @triton.jit
    def _batch_one_row(x_ptr, w_rows, n_mask, offs_s, k_begin, k_end, BITS: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, PDL: tl.constexpr, BYTE_PERMUTE: tl.constexpr):
        """The FMA loop for M == 1: the fp32 result [1, BLOCK_N] over [k_begin, k_end). The weight is read as words
        (see _small_batch_linear_kernel), and x in the weight's layout (_batch_one_step): no barrier a step. The first
        step's weight is read before (PDL) waiting for the kernel before; each later step's while the step before is
        computed (one step ahead, in registers). On an H200 against the loop that read values and shared x through
        shared memory a step: ChatGLM2-6B decode int8 393 -> 401-407 tok/s, bf16 283 -> 285, GLM-4-9B 198 -> 199; read
        as words without the step ahead, bf16 fell to 270 and GLM-4-9B to 189."""
        WORD: tl.constexpr = 8 if BITS == 4 else 4  # values a word: int32 (int4, int8) or int64 (floats)
        acc2 = tl.zeros([BLOCK_N, BLOCK_K // WORD], dtype=tl.float32)
        x_total = tl.zeros([BLOCK_K], dtype=tl.float32)  # int8, int4: the sum of x, for the offset
        w = tl.load(w_rows + (k_begin // WORD + offs_s)[None, :], mask=n_mask[:, None], other=0)
        if PDL:
            gdc_wait()
        for k0 in range(k_begin, k_end, BLOCK_K):
            ahead = k0 + BLOCK_K
            w_ahead = tl.load(w_rows + (ahead // WORD + offs_s)[None, :],
                              mask=n_mask[:, None] & (ahead + 0 * offs_s < k_end)[None, :], other=0)
            acc2, x_total = _batch_one_step(x_ptr, w, k0, offs_s, acc2, x_total, BITS, BYTE_PERMUTE)
            w = w_ahead
        result = tl.sum(acc2, axis=1)
        if BITS == 4:  # sum(s * x) = 256 * (sum((0.5 + (s + 8)/256) * x) - (0.5 + 8/256) * sum(x))
            result = 256.0 * (result - 0.53125 * tl.sum(x_total, axis=0))
        if BITS == 8:  # sum(q * x) = sum((1024 + q + 128) * x) - 1152 * sum(x)
            result = result - 1152.0 * tl.sum(x_total, axis=0)
        return result[None, :]

    @triton.jit
    def _small_batch_linear_kernel(
        x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, partial_ptr, ticket_ptr,
        M, N, K, stride_xm, stride_wn, chunks_per_split, split_k,
        BITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
        USE_DOT: tl.constexpr, PARTIAL: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
        DOT_IN_FP32: tl.constexpr, PDL: tl.constexpr, BYTE_PERMUTE: tl.constexpr, SPLITS_BLOCK: tl.constexpr,
        GATED: tl.constexpr,
    ):
        """One program: rows [pid_n * BLOCK_N, +BLOCK_N) of the weight over K split pid_k. Unsplit, it writes the
        finished out[m, n] in out's dtype; split (PARTIAL), its fp32 partial to partial[pid_k, m, n], and the row
        block's last split to finish (counted in ticket[pid_n]) sums all partials in a fixed order and writes out.
        PDL: launched ahead of the kernel before it (see _programmatic_launch); the batch-1 loop reads its first
        weight step before waiting for that kernel, which must not be the one that wrote the weight. It lets the next
        kernel start once every program has read its last weight step (see _small_batch_linear_2d). GATED: the weight
        is [gate rows | up rows]; a program's columns are pairs (gate row j, up row N/2 + j) and it writes
        silu(gate) * up (_store_out)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # the program's columns of the result (and of the partials)
        pair0 = pid_n * (BLOCK_N // 2)
        rows, n_mask = _weight_rows(offs_n, pair0, N, BLOCK_N, GATED)
        WORDS: tl.constexpr = BITS == 4 or not USE_DOT  # read as int32 words (int4, int8) or int64 words (4 floats)
        STORED_K: tl.constexpr = BLOCK_K // (8 if BITS == 4 else 4) if WORDS else BLOCK_K  # weight elements a step
        if WORDS:  # a word is 4 stored elements (int8 bytes, floats)
            w_rows = (w_ptr.to(tl.pointer_type(tl.int32 if BITS else tl.int64))
                      + rows.to(tl.int64)[:, None] * (stride_wn // 4))
        else:
            w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn  # int64: 130528 x 4096 is near the int32 limit
        offs_s = tl.arange(0, STORED_K)
        k_begin = pid_k * chunks_per_split * BLOCK_K
        k_end = tl.minimum(k_begin + chunks_per_split * BLOCK_K, K)
        offs_m = tl.arange(0, BLOCK_M)
        m_mask = offs_m < M

        if USE_DOT:
            if PDL:
                gdc_wait()
            x_cols = x_ptr + offs_m[None, :] * stride_xm  # x^T tiles [K step, BLOCK_M]
            acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
            x_total = tl.zeros([STORED_K, BLOCK_M], dtype=tl.float32)  # int4: sum of x, for the offset
            for k0 in range(k_begin, k_end, BLOCK_K):
                if BITS == 4:
                    words = tl.load(w_rows + (k0 // 8 + offs_s)[None, :], mask=n_mask[:, None], other=0)
                    for p in tl.static_range(4):
                        low, high = _int4_offset_half_pair(words, p, x_ptr.dtype.element_ty)
                        x_low = tl.load(x_cols + (k0 + 8 * offs_s + (p ^ 1))[:, None], mask=m_mask[None, :], other=0.0)
                        x_high = tl.load(x_cols + (k0 + 8 * offs_s + ((p + 4) ^ 1))[:, None], mask=m_mask[None, :],
                                         other=0.0)
                        acc = _dot(low, x_low, acc, DOT_IN_FP32)
                        acc = _dot(high, x_high, acc, DOT_IN_FP32)
                        x_total += x_low.to(tl.float32) + x_high.to(tl.float32)
                else:
                    w = tl.load(w_rows + (k0 + offs_s)[None, :], mask=n_mask[:, None], other=0)
                    if BITS == 8:
                        w = _int8_to_float(w).to(x_ptr.dtype.element_ty)  # |q| <= 128 is exact in bf16/fp16
                    x_t = tl.load(x_cols + (k0 + offs_s)[:, None], mask=m_mask[None, :], other=0.0)
                    acc = _dot(w, x_t, acc, DOT_IN_FP32)
            if BITS == 4:
                acc = 16.0 * (acc - 1.5 * tl.sum(x_total, axis=0)[None, :])
            result = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
        else:  # BLOCK_M is 1
            result = _batch_one_row(x_ptr, w_rows, n_mask, offs_s, k_begin, k_end, BITS, BLOCK_N, BLOCK_K, PDL,
                                    BYTE_PERMUTE)
        out_mask = m_mask[:, None] & n_mask[None, :]
        out_offs = offs_m[:, None] * N + offs_n[None, :]

        if PDL:  # the next kernel's launch overlaps the sums and stores (it waits for this whole grid to end)
            gdc_launch_dependents()
        if PARTIAL:
            tl.store(partial_ptr + pid_k * M * N + out_offs, result, mask=out_mask)
            tl.debug_barrier()  # every thread's partial is stored before the ticket releases them
            ticket = tl.atomic_add(ticket_ptr + pid_n, 1, sem="acq_rel")
            if ticket == split_k - 1:
                result = _sum_of_splits(partial_ptr + out_offs, M * N, split_k, out_mask, SPLITS_BLOCK)
                result = _finish(result, rows[None, :], n_mask[None, :], scale_ptr, bias_ptr, HAS_SCALE, HAS_BIAS)
                _store_out(out_ptr, result, offs_m, m_mask, offs_n, n_mask, pair0, N, GATED)
                tl.atomic_xchg(ticket_ptr + pid_n, 0)  # zero again for the next call
        else:
            result = _finish(result, rows[None, :], n_mask[None, :], scale_ptr, bias_ptr, HAS_SCALE, HAS_BIAS)
            _store_out(out_ptr, result, offs_m, m_mask, offs_n, n_mask, pair0, N, GATED)

    # Element-wise kernels for generation (ChatGLM2/3's RMSNorm, SwiGLU, rotary): one program per token row, math in
    # fp32, one rounding at the store, as torch.compile's fused kernels do.

    @triton.jit
    def _rms_norm_kernel(x_ptr, weight_ptr, out_ptr, inv_rms_ptr, row_stride, H, eps,
                         SAVE_INV_RMS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """out[r] = weight * x[r] / sqrt(mean(x[r]^2) + eps); for training also inv_rms[r] (fp32), for backward."""
        _programmatic_start(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        x = tl.load(x_ptr + row * row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * H + cols, (weight * (x * inv_rms)).to(out_ptr.dtype.element_ty), mask=mask)
        if SAVE_INV_RMS:
            tl.store(inv_rms_ptr + row, inv_rms)

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, update_ptr, weight_ptr, sum_ptr, out_ptr, H, eps, BLOCK: tl.constexpr,
                             PDL: tl.constexpr):
        """sum[r] = x[r] + update[r] (rounded to the dtype, as an eager add is), out[r] = RMSNorm(sum[r])."""
        _programmatic_start(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        total = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0) + tl.load(update_ptr + row * H + cols, mask=mask,
                                                                               other=0.0)
        tl.store(sum_ptr + row * H + cols, total, mask=mask)
        x = total.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / H + eps)
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * H + cols, (weight * (x * inv_rms)).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["rows", "rows_per_program"])
    def _rms_norm_backward_kernel(x_ptr, weight_ptr, inv_rms_ptr, grad_ptr, dx_ptr, dweight_ptr, rows, rows_per_program,
                                  H, WEIGHT_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        """dx[r] = inv_rms * (w * g - x_hat * mean(w * g * x_hat)) with x_hat = x[r] * inv_rms[r], for the rows
        [p * rows_per_program, (p + 1) * rows_per_program) of program p (x, grad and dx contiguous rows of H). With
        WEIGHT_GRAD, the program's share of dweight, sum over its rows of g * x_hat, goes to row p of dweight (fp32
        partials, summed by the caller in a fixed order: no atomics)."""
        program = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < H
        weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        dweight = tl.zeros((BLOCK,), dtype=tl.float32)
        first = program * rows_per_program
        for row in range(first, tl.minimum(first + rows_per_program, rows)):
            x = tl.load(x_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(grad_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
            inv_rms = tl.load(inv_rms_ptr + row)
            x_hat = x * inv_rms
            wg = weight * g
            dx = inv_rms * (wg - x_hat * (tl.sum(wg * x_hat, axis=0) / H))
            tl.store(dx_ptr + row * H + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if WEIGHT_GRAD:
                dweight += g * x_hat
        if WEIGHT_GRAD:
            tl.store(dweight_ptr + program * H + cols, dweight, mask=mask)

    @triton.jit
    def _swiglu_kernel(x_ptr, out_ptr, row_stride, F, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """out[r, j] = silu(x[r, j]) * x[r, F + j] (rows [gate | up])."""
        _programmatic_start(PDL)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < F
        gate = tl.load(x_ptr + row * row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * row_stride + F + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * F + cols, (gate * tl.sigmoid(gate) * up).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _dequantize_kernel(q_ptr, scale_ptr, out_ptr, N, K, BITS: tl.constexpr, ROWS: tl.constexpr,
                           COLS: tl.constexpr):
        """out[r, c] = q[r, c] * scale[r] for a tile of ROWS x COLS values of out [N, K], rounded once from fp32 to
        out's dtype. int8 q is [N, K]; int4 q is packed [N, K / 2] (byte j: column 2j in its high nibble, 2j + 1 in
        its low one)."""
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(1) * COLS + tl.arange(0, COLS)
        row_mask = rows < N
        mask = row_mask[:, None] & (cols < K)[None, :]
        if BITS == 4:
            pairs = tl.program_id(1) * (COLS // 2) + tl.arange(0, COLS // 2)
            packed = tl.load(q_ptr + rows.to(tl.int64)[:, None] * (K // 2) + pairs[None, :],
                             mask=row_mask[:, None] & (pairs < K // 2)[None, :], other=0)
            packed = packed.to(tl.int32)  # sign-extended: an arithmetic shift gives each nibble's sign
            q = tl.reshape(tl.join(packed >> 4, (packed << 28) >> 28), [ROWS, COLS])  # column 2j, then 2j + 1
        else:
            q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], mask=mask, other=0)
        scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :],
                 (q.to(tl.float32) * scale[:, None]).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_backward_kernel(x_ptr, grad_ptr, dx_ptr, F, BLOCK: tl.constexpr):
        """The gradient of silu(gate) * up for contiguous rows [gate | up] of 2F: dx[r] = [d_gate | d_up]."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < F
        gate = tl.load(x_ptr + row * 2 * F + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * 2 * F + F + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_ptr + row * F + cols, mask=mask, other=0.0).to(tl.float32)
        sigmoid = tl.sigmoid(gate)
        dtype = dx_ptr.dtype.element_ty
        tl.store(dx_ptr + row * 2 * F + cols, (g * up * sigmoid * (1.0 + gate * (1.0 - sigmoid))).to(dtype), mask=mask)
        tl.store(dx_ptr + row * 2 * F + F + cols, (g * gate * sigmoid).to(dtype), mask=mask)

    @triton.jit
    def _rotary_kernel(qkv_ptr, cos_ptr, sin_ptr, out_ptr, row_stride, out_row_stride, heads, seq, angle_stride_b,
                       angle_stride_s, sign, HEAD_DIM: tl.constexpr, PAIRS: tl.constexpr, HEADS_BLOCK: tl.constexpr):
        """The first `heads` heads of a fused qkv row (token (b, s) of [B, seq] rows): pairs (2i, 2i+1), i < PAIRS,
        rotated by angle i (interleaved, GPT-J style), the remaining HEAD_DIM - 2 * PAIRS dims copied. Each head is
        read and written whole (coalesced) and split into its even and odd dims in registers; the copied pairs get
        cos 1, sin 0. The angle tables are read in place (angle_stride_b 0: one table for the batch). sign -1 is the
        backward pass (a rotation's transpose is its inverse)."""
        HALF: tl.constexpr = HEAD_DIM // 2
        row = tl.program_id(0).to(tl.int64)
        head = tl.arange(0, HEADS_BLOCK)[:, None]
        dim = tl.arange(0, HEAD_DIM)[None, :]
        head_mask = head < heads
        x = tl.load(qkv_ptr + row * row_stride + head * HEAD_DIM + dim, mask=head_mask, other=0.0).to(tl.float32)
        even, odd = tl.split(tl.reshape(x, [HEADS_BLOCK, HALF, 2]))
        pair = tl.arange(0, HALF)[None, :]
        angle = (row // seq) * angle_stride_b + (row % seq) * angle_stride_s + pair
        cos = tl.load(cos_ptr + angle, mask=pair < PAIRS, other=1.0).to(tl.float32)
        sin = sign * tl.load(sin_ptr + angle, mask=pair < PAIRS, other=0.0).to(tl.float32)
        out = tl.reshape(tl.join(even * cos - odd * sin, odd * cos + even * sin), [HEADS_BLOCK, HEAD_DIM])
        tl.store(out_ptr + row * out_row_stride + head * HEAD_DIM + dim, out.to(out_ptr.dtype.element_ty),
                 mask=head_mask)

    @triton.jit
    def _rotary_2d_kernel(x_ptr, main_cos_ptr, main_sin_ptr, block_cos_ptr, block_sin_ptr, out_ptr, stride_b, stride_s,
                          stride_h, angle_stride_b, angle_stride_s, seq, heads, sign,
                          QUARTER: tl.constexpr, HEADS_BLOCK: tl.constexpr):
        """ChatGLM-6B's 2D rotary for token (b, s) of x [B, H, S, 4 * QUARTER] (any strides, unit along the last
        dim): each head's first half rotated by the main position's angles, its second half by the block position's,
        as pairs (j, j + QUARTER) within each half (the rotate-half layout). The four angle tables (cos, sin of each
        position) share their strides, angle_stride_b 0 for one table for the whole batch; their first QUARTER
        columns are read. sign -1 rotates back (the backward pass). out: [B, S, H, 4 * QUARTER], contiguous."""
        row = tl.program_id(0).to(tl.int64)
        b, s = row // seq, row % seq
        head = tl.arange(0, HEADS_BLOCK)[:, None]
        j = tl.arange(0, QUARTER)[None, :]
        mask = head < heads
        source = x_ptr + b * stride_b + s * stride_s + head * stride_h
        target = out_ptr + row * heads * 4 * QUARTER + head * 4 * QUARTER
        angle = b * angle_stride_b + s * angle_stride_s + j
        dtype = out_ptr.dtype.element_ty
        for half in tl.static_range(2):
            cos_ptr = main_cos_ptr if half == 0 else block_cos_ptr
            sin_ptr = main_sin_ptr if half == 0 else block_sin_ptr
            cos = tl.load(cos_ptr + angle).to(tl.float32)
            sin = sign * tl.load(sin_ptr + angle).to(tl.float32)
            first = tl.load(source + 2 * half * QUARTER + j, mask=mask, other=0.0).to(tl.float32)
            second = tl.load(source + (2 * half + 1) * QUARTER + j, mask=mask, other=0.0).to(tl.float32)
            tl.store(target + 2 * half * QUARTER + j, (first * cos - second * sin).to(dtype), mask=mask)
            tl.store(target + (2 * half + 1) * QUARTER + j, (second * cos + first * sin).to(dtype), mask=mask)

    # Decode-time attention of ChatGLM2/3 (grouped queries, interleaved rotary on the first 2 * PAIRS dims of a head)
    # for one new token per sequence over a static KV cache: rotary, the cache write and attention in one launch,
    # where eagerly they are a rotary kernel, two index_copy and SDPA's kernels with a mask conversion.

    @triton.jit
    def _rotated_head(row_ptr, cos_row_ptr, sin_row_ptr, offs, HEAD_DIM: tl.constexpr, PAIRS: tl.constexpr):
        """The head rows at row_ptr + offs ([..., 1], one per row) rotated, fp32 [..., HEAD_DIM]: dim d < 2 * PAIRS
        is x[d] cos - x[d + 1] sin (d even) or x[d] cos + x[d - 1] sin (d odd), angle d // 2; the rest pass."""
        d = tl.arange(0, HEAD_DIM)
        rotated = d < 2 * PAIRS
        angle = tl.where(rotated, d // 2, 0)
        cos = tl.where(rotated, tl.load(cos_row_ptr + angle).to(tl.float32), 1.0)
        sin = tl.load(sin_row_ptr + angle).to(tl.float32)
        sin = tl.where(rotated, tl.where(d % 2 == 0, -sin, sin), 0.0)
        x = tl.load(row_ptr + offs + d[None, :]).to(tl.float32)
        x_partner = tl.load(row_ptr + offs + (d ^ 1)[None, :]).to(tl.float32)
        return x * cos[None, :] + x_partner * sin[None, :]

    @triton.jit(do_not_specialize=["chunk"])
    def _decode_attention_kernel(qkv_ptr, cos_ptr, sin_ptr, keys_ptr, values_ptr, valid_ptr, slot_ptr, out_ptr,
                                 partial_ptr, stats_ptr, qkv_row_stride, angle_stride_b, cache_stride_b,
                                 cache_stride_g, valid_stride_b, chunk, scale,
                                 HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                                 PAIRS: tl.constexpr, GROUP_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                                 SPLIT: tl.constexpr, DOT_IN_FP32: tl.constexpr, PDL: tl.constexpr):
        """Program (b * KV_HEADS + g, s): the GROUP = HEADS / KV_HEADS query heads of key/value group g of sequence
        b, over the cache slots [s * chunk, min((s + 1) * chunk, slot)) that `valid` marks, plus (split 0) the new
        token itself, whose rotated key and value split 0 also writes at `slot`. One split: the normalized output;
        several: fp32 partials (unnormalized output, running max and sum) for _decode_attention_combine_kernel."""
        _programmatic_start(PDL)
        GROUP: tl.constexpr = HEADS // KV_HEADS
        bg = tl.program_id(0)
        split = tl.program_id(1)
        b = (bg // KV_HEADS).to(tl.int64)
        g = bg % KV_HEADS
        slot = tl.load(slot_ptr).to(tl.int32)  # (a long tensor; caches stay far below 2^31 slots)
        dtype = keys_ptr.dtype.element_ty
        h = tl.arange(0, GROUP_BLOCK)
        h_mask = h < GROUP
        d = tl.arange(0, HEAD_DIM)
        row = qkv_ptr + b * qkv_row_stride
        cos_row, sin_row = cos_ptr + b * angle_stride_b, sin_ptr + b * angle_stride_b
        q_heads = tl.where(h_mask, g * GROUP + h, g * GROUP)  # padding rows repeat the first head
        q = _rotated_head(row, cos_row, sin_row, q_heads[:, None] * HEAD_DIM, HEAD_DIM, PAIRS)
        q = q.to(dtype)  # rounded once, as the rotary kernel's output is
        cache_k = keys_ptr + b * cache_stride_b + g * cache_stride_g
        cache_v = values_ptr + b * cache_stride_b + g * cache_stride_g

        m = tl.full([GROUP_BLOCK], float("-inf"), tl.float32)
        total = tl.zeros([GROUP_BLOCK], tl.float32)
        acc = tl.zeros([GROUP_BLOCK, HEAD_DIM], tl.float32)
        if split == 0:  # the new token: attended to directly, and written to the cache for the next steps
            key = _rotated_head(row, cos_row, sin_row, (HEADS + g) * HEAD_DIM + tl.zeros([1, 1], tl.int32),
                                   HEAD_DIM, PAIRS)
            key = key.to(dtype)
            value = tl.load(row + (HEADS + KV_HEADS + g) * HEAD_DIM + d)
            tl.store(cache_k + slot * HEAD_DIM + d[None, :], key)
            tl.store(cache_v + slot * HEAD_DIM + d, value)
            m = tl.sum(q.to(tl.float32) * key.to(tl.float32), axis=1) * scale
            total = tl.full([GROUP_BLOCK], 1.0, tl.float32)
            acc = tl.zeros([GROUP_BLOCK, HEAD_DIM], tl.float32) + value.to(tl.float32)[None, :]
        start = split * chunk
        end = tl.minimum(start + chunk, slot)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            in_range = n < end
            attend = in_range & (tl.load(valid_ptr + b * valid_stride_b + n, mask=in_range, other=0) != 0)
            k = tl.load(cache_k + n[:, None] * HEAD_DIM + d[None, :], mask=in_range[:, None], other=0.0)
            v = tl.load(cache_v + n[:, None] * HEAD_DIM + d[None, :], mask=in_range[:, None], other=0.0)
            scores = _dot(q, tl.trans(k), tl.zeros([GROUP_BLOCK, BLOCK_N], tl.float32), DOT_IN_FP32) * scale
            scores = tl.where(attend[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing attended yet: keep everything at 0
            p = tl.exp(scores - m_safe[:, None])
            correction = tl.exp(m - m_safe)
            total = total * correction + tl.sum(p, axis=1)
            # p in tf32 (10 mantissa bits, where bf16 has 7): the values are exact in it
            acc = tl.dot(p, v.to(tl.float32), acc * correction[:, None], input_precision="tf32")
            m = m_new

        heads_out = g * GROUP + h
        if SPLIT:
            program = bg * tl.num_programs(1) + split
            tl.store(partial_ptr + (program * GROUP_BLOCK + h[:, None]) * HEAD_DIM + d[None, :], acc)
            tl.store(stats_ptr + (program * 2) * GROUP_BLOCK + h, m)
            tl.store(stats_ptr + (program * 2 + 1) * GROUP_BLOCK + h, total)
        else:
            out = acc / total[:, None]
            tl.store(out_ptr + b * HEADS * HEAD_DIM + heads_out[:, None] * HEAD_DIM + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=h_mask[:, None])

    @triton.jit
    def _decode_attention_combine_kernel(partial_ptr, stats_ptr, out_ptr, splits, HEADS: tl.constexpr,
                                         KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, GROUP_BLOCK: tl.constexpr,
                                         SPLITS_BLOCK: tl.constexpr, PDL: tl.constexpr):
        """The output of group program bg from its splits' partials: sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s,
        one query head per program (axis 1)."""
        _programmatic_start(PDL)
        GROUP: tl.constexpr = HEADS // KV_HEADS
        bg = tl.program_id(0)
        h = tl.program_id(1)
        b = bg // KV_HEADS
        s = tl.arange(0, SPLITS_BLOCK)
        s_mask = s < splits
        d = tl.arange(0, HEAD_DIM)
        program = bg * splits + s
        m = tl.load(stats_ptr + (program * 2) * GROUP_BLOCK + h, mask=s_mask, other=float("-inf"))
        total = tl.load(stats_ptr + (program * 2 + 1) * GROUP_BLOCK + h, mask=s_mask, other=0.0)
        weight = tl.exp(m - tl.max(m, axis=0))  # split 0 always holds the new token: the max is finite
        acc = tl.load(partial_ptr + (program[:, None] * GROUP_BLOCK + h) * HEAD_DIM + d[None, :], mask=s_mask[:, None],
                      other=0.0)
        out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(total * weight, axis=0)
        head = (bg % KV_HEADS) * GROUP + h
        tl.store(out_ptr + b * HEADS * HEAD_DIM + head * HEAD_DIM + d, out.to(out_ptr.dtype.element_ty))

    # Under TRITON_INTERPRET=1, triton.jit gives interpreted functions that take CPU tensors.
    _INTERPRETED = type(_small_batch_linear_kernel).__name__ == "InterpretedFunction"
else:
    _INTERPRETED = False


def _wrap(kernel):
    """The kernel as torch.compile wants it inside a triton_op (torch >= 2.6), or as is (eager, interpreter)."""
    wrap_triton = getattr(torch.library, "wrap_triton", None)
    return kernel if wrap_triton is None or _INTERPRETED else wrap_triton(kernel)


def _small_batch_linear_2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           scale: Optional[torch.Tensor], bits: int, config: Optional[List[int]],
                           eager: bool, gated: bool) -> torch.Tensor:
    """x [M, K] (unit stride along K) -> [M, N], or [M, N / 2] gated (see small_batch_linear); the body of the
    registered op (also its shape function). eager:
    called outside torch.compile (whose tracing of this body, later, no longer says so): the split counters are the
    device's shared ones and the launch may be programmatic."""
    M, K = x.shape
    N = weight.shape[0]
    # Checked here, not in small_batch_linear: torch.compile traces this body, and storage_offset() breaks its graph.
    # int4 weights, and every weight in the batch-1 loop, are read as words of 4 stored elements (storages themselves
    # are aligned): int32 for int8 and int4, int64 for floats.
    aligned = not (weight.storage_offset() % 4 or weight.stride(0) % 4)
    if bits == 4 and not aligned:
        raise ValueError("int4 weights are read as int32 words: the tensor and its rows must start at multiples of 4 "
                         "bytes")
    if config is None:  # a float or int8 weight that is not so aligned takes the tensor-core loop, which reads values
        config = launch_config(M if aligned or bits == 4 else MAX_ROWS, N, K, bits, _device_sm_count(x.device))
    block_n, block_k, split_k, num_warps, num_stages, use_dot = config
    if K % block_k or not (use_dot or M == 1):
        raise ValueError(f"config {config}: block_k must divide K={K}, and the FMA loop (use_dot 0) serves M == 1 only")
    if not use_dot and not aligned:
        raise ValueError(f"config {config}: the FMA loop reads the weight as words: the tensor and its rows must start "
                         "at multiples of 4 values")
    if not use_dot and x.storage_offset() % 4:  # the batch-1 loop reads x 8 bytes at a time
        x = x.clone()
    chunks = K // block_k
    chunks_per_split = _ceil_div(chunks, split_k)
    split_k = _ceil_div(chunks, chunks_per_split)
    out = torch.empty((M, N // 2 if gated else N), dtype=x.dtype, device=x.device)
    partial = torch.empty((split_k, M, N), dtype=torch.float32, device=x.device) if split_k > 1 else out
    row_blocks = _ceil_div(N, block_n)
    tickets = out
    if split_k > 1:
        tickets = _split_tickets(x.device, row_blocks) if eager else torch.zeros(row_blocks, dtype=torch.int32,
                                                                                   device=x.device)
    has_scale, has_bias = scale is not None, bias is not None
    # Launched programmatically, the product reads its first weight step while the kernel before it ends; it lets the
    # next kernel start only after its last program's K loop: started earlier, that kernel (and those it lets start in
    # turn) would wait in SM slots the product's programs need (ChatGLM2-6B decode on an H100, tok/s: int4 445, bf16
    # 220, int8 337 starting it at the grid's end; 381, 213, 331 at once; int4 417 launched plainly)
    pdl = eager and _programmatic_launch(x)
    # Unused pointer arguments get any tensor; the constexpr flags keep the kernel from reading them.
    _wrap(_small_batch_linear_kernel)[(row_blocks, split_k)](
        x, weight, scale if has_scale else x, bias if has_bias else x, out, partial, tickets,
        M, N, K, x.stride(0), weight.stride(0), chunks_per_split, split_k,
        BITS=bits, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_M=MAX_ROWS if use_dot else 1,
        USE_DOT=bool(use_dot), PARTIAL=split_k > 1, HAS_SCALE=has_scale, HAS_BIAS=has_bias,
        DOT_IN_FP32=_INTERPRETED and x.dtype == torch.bfloat16, PDL=pdl, BYTE_PERMUTE=not _INTERPRETED,
        SPLITS_BLOCK=_splits_block(M, split_k), GATED=gated,
        num_warps=num_warps, num_stages=num_stages,
        **_launch_options(pdl),
    )
    return out


def _splits_block(M, split_k):
    """How the last split program reads the partials: all at once (a power of two >= split_k) where they are one row
    of at most MAX_SPLITS_AT_ONCE splits; else 1, one split after another."""
    splits_block = triton.next_power_of_2(split_k)
    return splits_block if M == 1 and 1 < splits_block <= MAX_SPLITS_AT_ONCE else 1


_SPLIT_TICKETS = {}


def _split_tickets(device, row_blocks):
    """The int32 counters from which a row block's split programs take tickets (the last one sums the partials). The
    last split zeroes its counter again, so one zeroed buffer per device serves every call while the calls on a device
    run one after another, as a process's decode loop runs them on its stream (inside torch.compile's graphs each call
    gets zeroed counters of its own)."""
    if row_blocks > MAX_ROW_BLOCKS:
        raise ValueError(f"{row_blocks} row blocks: at most {MAX_ROW_BLOCKS}")
    key = str(device)
    if key not in _SPLIT_TICKETS:
        _SPLIT_TICKETS[key] = torch.zeros(MAX_ROW_BLOCKS, dtype=torch.int32, device=device)
    return _SPLIT_TICKETS[key]


def _programmatic_launch(x):
    """Whether the decode kernels on x's device launch programmatically (PDL, Hopper and newer): each kernel starts
    while the one before it finishes, does what does not depend on it (a product's first weight step), then waits
    for it (griddepcontrol.wait); all but the products let the next one start at once. That hides most of the gap
    between the ~10 kernels of a decoded layer. Off in the interpreter and inside torch.compile (whose launcher takes
    no such option)."""
    return (PROGRAMMATIC_LAUNCH and triton is not None and x.is_cuda and not _INTERPRETED
            and not torch.compiler.is_compiling() and _capability(x.device) >= (9, 0))


@functools.lru_cache(maxsize=None)
def _capability_of(device_index):
    return torch.cuda.get_device_capability(device_index)


def _capability(device):
    return _capability_of(device.index if device.index is not None else torch.cuda.current_device())


def _launch_options(pdl):
    return {"launch_pdl": True} if pdl else {}


def _register_op():
    """The registered op, or the plain function where torch has no triton_op (< 2.6) or triton runs interpreted.

    Every copy of this file (one per model folder, plus the copies transformers makes of a model folder) is imported
    as its own module; identical copies share one registration (the name carries a hash of this file), a changed
    file gets its own."""
    triton_op = getattr(torch.library, "triton_op", None)
    if triton is None or triton_op is None or _INTERPRETED:
        return _small_batch_linear_2d
    try:
        digest = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:12]
    except OSError:
        digest = "unhashed"
    namespace, name = "chatglm_kernels", f"small_batch_linear_{digest}"
    if hasattr(getattr(torch.ops, namespace), name):
        return getattr(getattr(torch.ops, namespace), name)
    return triton_op(f"{namespace}::{name}", _small_batch_linear_2d, mutates_args=())


_op = _register_op() if triton is not None else None


def small_batch_kernel_applies(x, in_features, bits=None):
    """Whether small_batch_linear can compute a linear layer with `in_features` inputs on x; if not, use F.linear.

    True only with Triton available, x on CUDA (or any device under TRITON_INTERPRET=1), x in bf16/fp16, at most
    MAX_ROWS rows, in_features a multiple of MIN_BLOCK_K (INT4_MIN_BLOCK_K for bits=4), and no gradient needed for
    x (the kernel has no backward)."""
    if triton is None or not (x.is_cuda or _INTERPRETED):
        return False
    if x.dtype not in (torch.bfloat16, torch.float16) or x.dim() == 0 or x.shape[-1] != in_features:
        return False
    if in_features % MIN_BLOCK_K or not 1 <= x.numel() // in_features <= MAX_ROWS:
        return False
    if bits == 4 and in_features % INT4_MIN_BLOCK_K:
        return False
    return not (x.requires_grad and torch.is_grad_enabled())


def small_batch_linear(x, weight, bias=None, scale=None, bits=None, *, gated=False, config=None):
    """F.linear(x, dequantized weight, bias) for x [..., K] with at most MAX_ROWS rows, accumulated in fp32.

    weight: float [N, K] in x's dtype (bits None), int8 [N, K] (bits 8) or packed int4 int8 [N, K/2] (bits 4), with
    unit stride along its last dim; scale: [N], any float dtype, required for 8 and 4 bits; bias: [N] or None. Returns
    [..., N] in x's dtype; gated (N even): silu(y[..., :N/2]) * y[..., N/2:] of that result y, [..., N/2], the same
    bits as triton_swiglu(y) in one launch. `config` overrides launch_config (tests, benchmarks). Check
    small_batch_kernel_applies() first: shapes it refuses raise ValueError here."""
    if triton is None:
        raise RuntimeError("small_batch_linear needs Triton (pip install triton); use F.linear instead")
    bits = _format_bits(bits)
    K = x.shape[-1]
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"x must be bf16 or fp16, got {x.dtype}")
    if K % MIN_BLOCK_K:
        raise ValueError(f"in_features={K} is not a multiple of {MIN_BLOCK_K}")
    M = x.numel() // K
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"x has {M} rows; the kernel serves 1..{MAX_ROWS}")
    stored_k = K // 2 if bits == 4 else K
    if weight.dim() != 2 or weight.shape[1] != stored_k or weight.stride(1) != 1:
        raise ValueError(f"weight must be [N, {stored_k}] with unit stride along dim 1 for x [..., {K}] and "
                         f"bits={bits or None}, got shape {tuple(weight.shape)}, strides {weight.stride()}")
    N = weight.shape[0]
    if bits == 0 and weight.dtype != x.dtype:
        raise ValueError(f"float weight dtype {weight.dtype} differs from x's {x.dtype}")
    if bits and (weight.dtype != torch.int8 or scale is None or scale.shape != (N,)):
        raise ValueError(f"{bits}-bit weights need an int8 weight and a scale of shape [{N}]")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must have shape [{N}], got {tuple(bias.shape)}")
    if gated and N % 2:
        raise ValueError(f"gated needs an even number of output rows ([gate | up]), got {N}")
    if any(t is not None and t.device != x.device for t in (weight, bias, scale)):
        raise ValueError("x, weight, bias and scale must be on one device")
    x2d = x.reshape(M, K)
    if x2d.stride(1) != 1:
        x2d = x2d.contiguous()
    scale = scale.contiguous() if bits else None
    bias = bias.contiguous() if bias is not None else None
    out = _op(x2d, weight, bias, scale, bits, None if config is None else [int(v) for v in config],
              not torch.compiler.is_compiling(), bool(gated))
    return out.reshape(*x.shape[:-1], out.shape[-1])


def one_row_kernel_applies(x, weight, bias=None):
    """Whether small_batch_linear, not cuBLAS, should compute F.linear(x, weight, bias) for a float weight: x is one
    row (a batch-1 decode step), where the batch-1 loop streams the weight faster than cuBLAS does (ChatGLM2-6B's and
    GLM-4-9B's four layer shapes on an H100: 3-15 % per product, docs/benchmarks.md); weight and bias in x's dtype on
    x's device, and no gradient wanted for any of them (the kernel has no backward)."""
    if x.numel() != x.shape[-1] or weight.dim() != 2 or weight.stride(1) != 1 or weight.dtype != x.dtype:
        return False
    if weight.device != x.device or (bias is not None and (bias.dtype != x.dtype or bias.device != x.device)):
        return False
    if torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad)):
        return False
    return small_batch_kernel_applies(x, weight.shape[1])


def decode_linear(x, weight, bias=None):
    """F.linear(x, weight, bias), through small_batch_linear where one_row_kernel_applies."""
    if one_row_kernel_applies(x, weight, bias):
        return small_batch_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def _streamed_operands(linear, x):
    """(weight, bias, scale, bits) with which small_batch_linear computes linear(x) in a decode step: a plain
    nn.Linear where one_row_kernel_applies, a quantized layer (an int8 `weight` with `weight_scale` and `bits` 8 or 4,
    as quantization.QuantizedLinear) where small_batch_kernel_applies; else None (adapters' layers, and the rest)."""
    if type(linear) is torch.nn.Linear:
        return (linear.weight, linear.bias, None, None) if one_row_kernel_applies(x, linear.weight, linear.bias) else None
    bits = getattr(linear, "bits", None)
    if bits in (4, 8) and isinstance(getattr(linear, "weight_scale", None), torch.Tensor):
        if linear.weight.dtype == torch.int8 and small_batch_kernel_applies(x, linear.in_features, bits):
            return linear.weight, linear.bias, linear.weight_scale, bits
    return None


def decode_product(linear, x):
    """linear(x) in a decode step (inference on the model's own weights: no module hooks to run): through
    small_batch_linear where it streams the layer's weight (_streamed_operands), any other module (an adapter's layer)
    called as it is."""
    operands = _streamed_operands(linear, x)
    return linear(x) if operands is None else small_batch_linear(x, *operands)


def decode_swiglu_product(linear, x, swiglu):
    """swiglu(linear(x)) in a decode step, for a layer of rows [gate | up]: silu(gate) * up in the product's own launch
    where small_batch_linear streams the layer's weight, the same bits as the two launches; else
    swiglu(decode_product(linear, x))."""
    operands = _streamed_operands(linear, x)
    if operands is None or linear.out_features % 2:
        return swiglu(decode_product(linear, x))
    return small_batch_linear(x, *operands, gated=True)


def elementwise_kernels_apply(x):
    """Whether triton_rms_norm, triton_swiglu and triton_rotary can take x (and the other arguments of the same call):
    Triton available, x on CUDA (or any device under TRITON_INTERPRET=1), a float dtype. They have backward passes
    of their own, so training takes them too."""
    return triton is not None and (x.is_cuda or _INTERPRETED) and x.dtype in (torch.bfloat16, torch.float16, torch.float32)


def _rows(x):
    """x [..., D] as rows [R, D] with unit stride along D (a view where possible)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _warps(block):
    return 4 if block <= 1024 else 8 if block <= 4096 else 16


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_states, weight, eps):
        rows = _rows(hidden_states)
        out = torch.empty(rows.shape, dtype=hidden_states.dtype, device=hidden_states.device)
        training = any(ctx.needs_input_grad)  # (forward itself runs with grad mode off)
        # (unused pointer arguments get any tensor; the constexpr flag keeps the kernel from writing it)
        inv_rms = torch.empty(rows.shape[0], dtype=torch.float32, device=hidden_states.device) if training else out
        if rows.numel():
            H = rows.shape[1]
            block = triton.next_power_of_2(H)
            pdl = _programmatic_launch(rows)
            _rms_norm_kernel[(rows.shape[0],)](rows, weight.contiguous(), out, inv_rms, rows.stride(0), H, eps,
                                               SAVE_INV_RMS=training, BLOCK=block, PDL=pdl, num_warps=_warps(block),
                                               **_launch_options(pdl))
        if training:  # the input in its own dtype and one fp32 per row, no fp32 copy of the input
            ctx.save_for_backward(rows.contiguous(), weight, inv_rms)
        return out.view(hidden_states.shape)

    @staticmethod
    def backward(ctx, grad):
        rows, weight, inv_rms = ctx.saved_tensors
        R, H = rows.shape
        grad_rows = grad.reshape(R, H).contiguous()
        dx = torch.empty_like(rows)
        weight_grad = ctx.needs_input_grad[1]
        # One row per program where only dx is needed; with the weight's gradient, a fixed number of programs, each
        # summing its rows' share in registers (few fp32 partials to add up).
        programs = min(R, PROGRAMS_PER_SM * _device_sm_count(rows.device)) if weight_grad else R
        rows_per_program = _ceil_div(R, programs) if R else 0
        programs = _ceil_div(R, rows_per_program) if R else 0
        partials = torch.empty(programs, H, dtype=torch.float32, device=rows.device) if weight_grad else dx
        if R:
            block = triton.next_power_of_2(H)
            _rms_norm_backward_kernel[(programs,)](rows, weight.contiguous(), inv_rms, grad_rows, dx, partials, R,
                                                   rows_per_program, H, WEIGHT_GRAD=weight_grad, BLOCK=block,
                                                   num_warps=_warps(block))
        dweight = partials.sum(0).to(weight.dtype) if weight_grad else None
        return dx.view(grad.shape), dweight, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_and_up):
        rows = _rows(gate_and_up)
        F = rows.shape[1] // 2
        out = torch.empty(rows.shape[0], F, dtype=gate_and_up.dtype, device=gate_and_up.device)
        if rows.numel():
            block = min(triton.next_power_of_2(F), 1024)
            pdl = _programmatic_launch(rows)
            _swiglu_kernel[(rows.shape[0], _ceil_div(F, block))](rows, out, rows.stride(0), F, BLOCK=block, PDL=pdl,
                                                                 num_warps=4, **_launch_options(pdl))
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(rows.contiguous())
        return out.view(*gate_and_up.shape[:-1], F)

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        F = rows.shape[1] // 2
        grad_rows = grad.reshape(-1, F).contiguous()
        dx = torch.empty_like(rows)
        if rows.numel():
            block = min(triton.next_power_of_2(F), 1024)
            _swiglu_backward_kernel[(rows.shape[0], _ceil_div(F, block))](rows, grad_rows, dx, F, BLOCK=block, num_warps=4)
        return dx.view(*grad.shape[:-1], 2 * F)


def _angle_tables(cos, sin, qkv):
    """cos, sin [B or 1, S, 1, P] as views [B, S, 1, P] over qkv [B, S, ...] that the kernels read in place, by their
    (batch, position) strides: one layout for both, a unit last stride (a copy only where they lack it)."""
    tables = [t.expand(*qkv.shape[:2], 1, t.shape[-1]) for t in (cos, sin)]
    if any(t.stride() != tables[0].stride() or t.stride(-1) != 1 for t in tables):
        tables = [t.contiguous() for t in tables]
    return tables


def _rotate(source_rows, cos, sin, out_rows, heads, head_dim, sign):
    """_rotary_kernel over rows (unit stride along the last dim; source and target rows may be wider than the heads),
    row b * S + s rotated by the angles (b, s) of the tables of _angle_tables."""
    if source_rows.numel():
        _rotary_kernel[(source_rows.shape[0],)](
            source_rows, cos, sin, out_rows, source_rows.stride(0), out_rows.stride(0), heads, cos.shape[1],
            cos.stride(0), cos.stride(1), sign, HEAD_DIM=head_dim, PAIRS=cos.shape[-1],
            HEADS_BLOCK=triton.next_power_of_2(heads), num_warps=4,
        )


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, heads, head_dim):
        if cos.requires_grad or sin.requires_grad:
            raise ValueError("triton_rotary has no gradient for the angles (positions are not trained)")
        if qkv.dim() != 3:
            raise ValueError(f"triton_rotary takes qkv [B, S, width], got {tuple(qkv.shape)}")
        rows = _rows(qkv)
        cos, sin = _angle_tables(cos, sin, qkv)
        out = torch.empty(rows.shape[0], heads * head_dim, dtype=qkv.dtype, device=qkv.device)
        _rotate(rows, cos, sin, out, heads, head_dim, 1.0)
        if ctx.needs_input_grad[0]:  # a rotation is linear: only the angles are kept (views of the model's tables)
            ctx.save_for_backward(cos, sin)
            ctx.heads, ctx.head_dim, ctx.width = heads, head_dim, rows.shape[1]
        return out.view(*qkv.shape[:-1], heads, head_dim)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        heads, head_dim = ctx.heads, ctx.head_dim
        grad_rows = grad.reshape(-1, heads * head_dim).contiguous()
        dqkv = torch.empty(grad_rows.shape[0], ctx.width, dtype=grad.dtype, device=grad.device)
        dqkv[:, heads * head_dim:].zero_()  # the heads after the rotated ones (the values) get no gradient here
        _rotate(grad_rows, cos, sin, dqkv, heads, head_dim, -1.0)
        return dqkv.view(*grad.shape[:-2], ctx.width), None, None, None, None


def _rotate_2d(x, tables, sign):
    """_rotary_2d_kernel over x [B, H, S, D]: the rotated copy as [B, H, S, D] (a view of a contiguous [B, S, H, D])."""
    B, H, S, D = x.shape
    out = torch.empty(B, S, H, D, dtype=x.dtype, device=x.device)
    first = tables[0]
    if x.numel():
        _rotary_2d_kernel[(B * S,)](x, *tables, out, x.stride(0), x.stride(2), x.stride(1),
                                    first.stride(0) if first.shape[0] > 1 else 0, first.stride(2), S, H, sign,
                                    QUARTER=D // 4, HEADS_BLOCK=triton.next_power_of_2(H), num_warps=4)
    return out.transpose(1, 2)


class _Rotary2D(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, main_cos, main_sin, block_cos, block_sin):
        tables = (main_cos, main_sin, block_cos, block_sin)
        if any(t.requires_grad for t in tables):
            raise ValueError("triton_rotary_2d has no gradient for the angles (positions are not trained)")
        # The model's tables [B or 1, 1, S, D / 2], read in place (one launch, nothing copied) where they share one
        # layout with a unit last stride; a copy of each otherwise.
        if any(t.stride() != main_cos.stride() or t.shape != main_cos.shape or t.stride(-1) != 1 for t in tables):
            tables = tuple(t.expand(x.shape[0], 1, x.shape[2], t.shape[-1]).contiguous() for t in tables)
        if x.stride(-1) != 1:
            x = x.contiguous()
        if ctx.needs_input_grad[0]:  # a rotation is linear: only the angles are kept (the model's own tensors)
            ctx.save_for_backward(*tables)
        return _rotate_2d(x, tables, 1.0)

    @staticmethod
    def backward(ctx, grad):
        tables = ctx.saved_tensors
        return _rotate_2d(grad if grad.stride(-1) == 1 else grad.contiguous(), tables, -1.0), None, None, None, None


def triton_rms_norm(hidden_states, weight, eps):
    """RMSNorm over the last dim (statistics in fp32, one rounding), in hidden_states' dtype; differentiable (the
    backward saves the input and one fp32 per row)."""
    return _RMSNorm.apply(hidden_states, weight, eps)


def triton_add_rms_norm(hidden_states, update, weight, eps):
    """(hidden_states + update, RMSNorm of that sum) in one launch, for passes without gradients (decoding): the
    residual add of a pre-norm block and the norm after it. Both [..., H] of one shape and dtype."""
    if torch.is_grad_enabled() and (hidden_states.requires_grad or update.requires_grad or weight.requires_grad):
        raise ValueError("triton_add_rms_norm has no backward pass; use it without gradients")
    if update.shape != hidden_states.shape or update.dtype != hidden_states.dtype:
        raise ValueError(f"update {tuple(update.shape)} {update.dtype} does not match {tuple(hidden_states.shape)} "
                         f"{hidden_states.dtype}")
    x, u = hidden_states.contiguous(), update.contiguous()
    total, out = torch.empty_like(x), torch.empty_like(x)
    H = x.shape[-1]
    if x.numel():
        block = triton.next_power_of_2(H)
        pdl = _programmatic_launch(x)
        _add_rms_norm_kernel[(x.numel() // H,)](x, u, weight.contiguous(), total, out, H, eps, BLOCK=block, PDL=pdl,
                                                num_warps=_warps(block), **_launch_options(pdl))
    return total, out


def triton_swiglu(gate_and_up):
    """silu(gate) * up for fused rows [gate | up] [..., 2F] -> [..., F]; differentiable (the backward saves the
    input only)."""
    return _SwiGLU.apply(gate_and_up)


def dequantize_kernel_applies(q, dtype):
    """Whether triton_dequantize can expand q to `dtype`: Triton available, q on CUDA (or any device under
    TRITON_INTERPRET=1), a 16- or 32-bit float dtype."""
    return triton is not None and (q.is_cuda or _INTERPRETED) and dtype in (torch.bfloat16, torch.float16, torch.float32)


def triton_dequantize(q, scale, bits):
    """The float weight scale[r] * q[r, c] [N, K] in scale's dtype, in one pass over the stored int8 [N, K] (bits 8)
    or packed int4 [N, K / 2] (bits 4) weight: the bits of q.to(dtype) * scale[:, None] (each product computed in fp32
    and rounded once), without the int16/int8 temporaries of unpacking in torch."""
    bits = _format_bits(bits)
    if not bits or q.dtype != torch.int8 or q.dim() != 2 or scale.shape != (q.shape[0],):
        raise ValueError(f"expected bits 8 or 4, an int8 weight [N, stored K] and a scale [N]; got bits={bits}, "
                         f"weight {q.dtype} {tuple(q.shape)}, scale {tuple(scale.shape)}")
    N, K = q.shape[0], q.shape[1] * (2 if bits == 4 else 1)
    q, scale = q.contiguous(), scale.contiguous()
    out = torch.empty(N, K, dtype=scale.dtype, device=q.device)
    if out.numel():
        cols = min(triton.next_power_of_2(K), 1024)
        rows = max(1, 4096 // cols)
        _dequantize_kernel[(_ceil_div(N, rows), _ceil_div(K, cols))](q, scale, out, N, K, BITS=bits, ROWS=rows,
                                                                      COLS=cols, num_warps=4)
    return out


def triton_rotary(qkv, cos, sin, heads, head_dim):
    """The first `heads` heads of fused rows qkv [B, S, (heads + ...) * head_dim], rotated by cos, sin [B, S, 1, P]
    (interleaved pairs over the first 2P dims of each head; P a power of two): [B, S, heads, head_dim].
    Differentiable in qkv (the angles take no gradient)."""
    return _Rotary.apply(qkv, cos, sin, heads, head_dim)


def triton_rotary_2d(x, main, block):
    """ChatGLM-6B's 2D rotary of x [B, H, S, D]: the first half of each head by the main position's (cos, sin), the
    second half by the block position's, each [B or 1, 1, S, D / 2] in the rotate-half layout; [B, H, S, D].
    Differentiable in x (the angles take no gradient)."""
    return _Rotary2D.apply(x, *main, *block)


DECODE_BLOCK_N = 64  # cache slots per step of the attention loop
# A long cache is split over programs (then combined) until there are DECODE_PROGRAMS_PER_SM programs per SM, each
# over DECODE_MIN_CHUNK slots at least: one program per sequence and group walking a whole cache leaves most SMs
# idle (H200, batch 1: 45 us at 1,501 of 2,048 slots unsplit, 13 us over 16 chunks of 128).
DECODE_MIN_CHUNK = 128
DECODE_PROGRAMS_PER_SM = 2


def decode_attention_chunk(programs_per_split, capacity, block_n, sm_count=DEFAULT_SM_COUNT):
    """Slots per program for a cache of `capacity` slots (a multiple of block_n): a pure function of the shape, so a
    step always splits the same way."""
    splits = max(1, min(_ceil_div(capacity, DECODE_MIN_CHUNK),
                        _ceil_div(DECODE_PROGRAMS_PER_SM * sm_count, programs_per_split)))
    return _ceil_div(_ceil_div(capacity, splits), block_n) * block_n


def decode_attention_applies(qkv, keys, values, heads, kv_heads, head_dim, pairs):
    """Whether triton_decode_attention can take this step: Triton available, on CUDA (or any device under
    TRITON_INTERPRET=1), one bf16/fp16 token per sequence, contiguous cache buffers of qkv's dtype, whole groups, and
    power-of-two head and rotary widths (on a GPU at least 16 wide, tl.dot's minimum); no gradient needed."""
    if triton is None or not (qkv.is_cuda or _INTERPRETED):
        return False
    if qkv.dtype not in (torch.bfloat16, torch.float16) or keys.dtype != qkv.dtype or values.dtype != qkv.dtype:
        return False
    if qkv.dim() != 3 or qkv.shape[1] != 1 or qkv.stride(-1) != 1 or not (keys.is_contiguous() and values.is_contiguous()):
        return False
    if heads % kv_heads or head_dim & (head_dim - 1) or pairs & (pairs - 1) or 2 * pairs > head_dim:
        return False
    if not _INTERPRETED and head_dim < 16:
        return False
    return not (torch.is_grad_enabled() and qkv.requires_grad)


def triton_decode_attention(qkv, cos, sin, keys, values, valid, slot, heads, kv_heads, head_dim, *, config=None):
    """One decode step's attention over a static cache, with the rotary and the cache write in the same launch.

    qkv: the new tokens' fused rows [B, 1, (heads + 2 * kv_heads) * head_dim] ([q | k | v], as the projection gives
    them); cos, sin: [B or 1, 1, 1, P] (the first 2P dims of each head rotated, interleaved pairs); keys, values:
    one layer's buffers [B, kv_heads, capacity, head_dim]; valid: [B, capacity] bool, the slots attended to; slot: a
    one-element long tensor, where the new key and value go (read on the device: a CUDA graph replays this). The new
    token attends to the valid slots before `slot` and to itself. Returns the attention output [B, 1, heads *
    head_dim] (before the output projection), in qkv's dtype. Check decode_attention_applies() first. `config`
    (block_n, chunk) overrides DECODE_BLOCK_N and decode_attention_chunk (benchmarks; block_n a power of two >= 16,
    chunk a multiple of it)."""
    B, capacity = qkv.shape[0], keys.shape[2]
    if config is not None:
        block_n, chunk = config
    else:
        block_n = DECODE_BLOCK_N
        chunk = decode_attention_chunk(B * kv_heads, capacity, block_n, _device_sm_count(qkv.device))
    splits = _ceil_div(capacity, chunk)
    pairs = cos.shape[-1]
    cos, sin = _angle_tables(cos, sin, qkv)
    group_block = max(16, triton.next_power_of_2(heads // kv_heads))
    out = torch.empty(B, 1, heads * head_dim, dtype=qkv.dtype, device=qkv.device)
    pdl = _programmatic_launch(qkv)
    if splits > 1:
        partial = torch.empty(B * kv_heads * splits * group_block * head_dim, dtype=torch.float32, device=qkv.device)
        stats = torch.empty(B * kv_heads * splits * 2 * group_block, dtype=torch.float32, device=qkv.device)
    else:  # unused pointer arguments get any tensor; SPLIT keeps the kernel from writing them
        partial = stats = out
    if B:
        _decode_attention_kernel[(B * kv_heads, splits)](
            qkv, cos, sin, keys, values, valid, slot, out, partial, stats, qkv.stride(0), cos.stride(0),
            keys.stride(0), keys.stride(1), valid.stride(0), chunk, head_dim ** -0.5,
            HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim, PAIRS=pairs, GROUP_BLOCK=group_block,
            BLOCK_N=block_n, SPLIT=splits > 1, DOT_IN_FP32=_INTERPRETED and qkv.dtype == torch.bfloat16, PDL=pdl,
            num_warps=4, **_launch_options(pdl),
        )
        if splits > 1:
            _decode_attention_combine_kernel[(B * kv_heads, heads // kv_heads)](
                partial, stats, out, splits, HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim,
                GROUP_BLOCK=group_block, SPLITS_BLOCK=triton.next_power_of_2(splits), PDL=pdl, num_warps=4,
                **_launch_options(pdl),
            )
    return out
