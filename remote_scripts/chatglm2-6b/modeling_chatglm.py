"""ChatGLM2-6B model, written for this toolkit to run on current PyTorch and transformers 5.x.

Loads the official checkpoints unchanged (same parameter names and shapes) and computes the same function as the
official code: pre-norm RMSNorm blocks, grouped-query attention with fused QKV, partial interleaved rotary embedding on
the first half of each head, SwiGLU MLP. Internally tensors are batch-first and attention is PyTorch's
`scaled_dot_product_attention`; the KV cache is a transformers `Cache` holding un-expanded key/value groups.
"""
import functools
import inspect
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation.logits_process import (
    LogitsProcessor,
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    SequenceClassifierOutputWithPast,
)

try:  # flash attention over variable-length segments (torch >= 2.10), for packed training rows
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

from .configuration_chatglm import ChatGLMConfig
from .kernels import (
    decode_attention_applies,
    decode_product,
    decode_swiglu_product,
    elementwise_kernels_apply,
    triton_add_rms_norm,
    triton_decode_attention,
    triton_rms_norm,
    triton_rotary,
    triton_swiglu,
)
from .quantization import OUTPUT_LAYER_BITS, QuantizedLinear, check_bits, quantize_model


# transformers 5.2x names the outputs' cache `cache` (`past_key_values` still works there, with a deprecation
# warning at the first forward of every process); 5.17 knows only past_key_values.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


class InvalidScoreLogitsProcessor(LogitsProcessor):
    """Official NaN/Inf guard: if any score is not finite, force token id 5 (kept for identical behaviour)."""

    def __call__(self, input_ids, scores):
        bad = ~torch.isfinite(scores).all()
        forced = torch.zeros_like(scores)
        forced[..., 5] = 5e4
        return torch.where(bad, forced, scores)


# Rows (target tokens) that go through the output layer at once in causal_lm_loss. 1024 rows of fp32 logits are
# 0.25 GiB at ChatGLM2/3's 65024 tokens (0.5 GiB at ChatGLM-6B's 130528); a chunk's backward holds a few such
# copies at once, and the matmuls stay large enough to run at full speed. Read at every call, so tests can force chunks.
LOSS_CHUNK_ROWS = 1024
# With the blocks trained as CUDA graphs (ChatGLMModel.block_graphs), their backward's memory is a pool of its own that
# the loss's temporaries cannot reuse as they reuse the eager blocks' memory; smaller chunks keep the loss's share small.
GRAPHED_LOSS_CHUNK_ROWS = 512


def _chunk_loss(output_layer, hidden_states, targets):
    """Summed fp32 cross-entropy of one chunk of rows: its logits exist only inside this call."""
    logits = output_layer(hidden_states).float()
    return F.cross_entropy(logits, targets.to(logits.device), reduction="sum")


def _loss_rows(count, output_layer):
    """Rows that causal_lm_loss's chunks cover: the targets, at least one chunk. Under DeepSpeed ZeRO-3 every call of
    the output layer gathers its weight from all ranks, so each rank covers the most rows any rank has (its extra
    chunks are empty): ranks with different target counts would otherwise call it unequally often and deadlock."""
    rows = max(count, 1)
    weight = getattr(output_layer, "weight", None)
    if hasattr(weight, "ds_id") and torch.distributed.is_initialized():
        most = torch.tensor([rows], device=weight.device)
        torch.distributed.all_reduce(most, op=torch.distributed.ReduceOp.MAX)
        rows = int(most)
    return rows


def causal_lm_loss(hidden_states, output_layer, labels, num_items_in_batch=None, chunk_rows=None):
    """Position i predicts labels[i+1]; cross-entropy in fp32; -100 is ignored.

    Computed from the final hidden states [B, S, H] without ever building [B, S, vocab] logits: only the positions
    that have a target go through the output layer (in SFT, the answer tokens), `chunk_rows` (default
    LOSS_CHUNK_ROWS) at a time, each chunk under non-reentrant activation checkpointing, so that one chunk's logits,
    their fp32 copy and their gradient are all that exists at a time, in forward and in backward. The output layer
    is called as a module, so that a LoRA-wrapped output layer and device-placement hooks work as in a plain call.

    With `num_items_in_batch` (passed by the Trainer under gradient accumulation) the sum is divided by the number of
    target tokens of the whole accumulated batch, so accumulation gives the same gradient as one large batch.
    Without it, the mean over the target tokens: nan for a batch without targets, as F.cross_entropy's mean gives.
    """
    chunk_rows = chunk_rows or LOSS_CHUNK_ROWS
    targets = labels[:, 1:].to(hidden_states.device)
    keep = targets != -100
    # One boolean index for the whole batch (one host sync), not one per sample.
    hidden_states, targets = hidden_states[:, :-1][keep], targets[keep]
    count = targets.shape[0]
    total = None
    # At least one chunk, even an empty one: a batch without targets still gives a loss on the graph, as before.
    for start in range(0, _loss_rows(count, output_layer), chunk_rows):
        rows = slice(start, start + chunk_rows)
        if torch.is_grad_enabled():
            part = torch.utils.checkpoint.checkpoint(
                _chunk_loss, output_layer, hidden_states[rows], targets[rows], use_reentrant=False
            )
        else:
            part = _chunk_loss(output_layer, hidden_states[rows], targets[rows])
        total = part if total is None else total + part
    return total / (count if num_items_in_batch is None else num_items_in_batch)


# Set to False to run the element-wise functions below eagerly on CUDA too (tests compare both).
FUSE_ELEMENTWISE = True

# Devices whose element-wise functions are fused (CPU tests add "cpu" to check which path runs when).
FUSE_DEVICES = ("cuda",)


def fuses(tensor):
    """Whether work on `tensor` takes the fused paths: fusing on, its device one that fuses, and not inside an
    enclosing compiled region (which fuses the eager formulas itself)."""
    return FUSE_ELEMENTWISE and tensor.device.type in FUSE_DEVICES and not torch.compiler.is_compiling()


def fused_on_cuda(kernel=None):
    """Run the decorated function as one fused kernel forward (and one backward) instead of a chain of small ones,
    saving only what its backward needs, when its first argument is on a CUDA device: `kernel`, a Triton function of
    kernels.py with a backward pass of its own, where one is given and applies; torch.compile (dynamic shapes)
    otherwise. Eager elsewhere (CPU), and inside an enclosing compiled region (the compiled decode step inlines it).

    Our kernels are ready in a fraction of a second (Triton keeps them on disk), where torch.compile takes seconds per
    function and graph, in every new process: the first training step and the first answer wait for neither. Both
    round once, from fp32."""

    def wrap(fn):
        compiled = None

        @functools.wraps(fn)
        def run(*args):
            nonlocal compiled
            if not fuses(args[0]):
                return fn(*args)
            if kernel is not None and elementwise_kernels_apply(args[0]):
                return kernel(*args)
            if compiled is None:
                compiled = torch.compile(fn, dynamic=True)
            return compiled(*args)

        return run

    return wrap


@fused_on_cuda(kernel=triton_rms_norm)
def rms_norm(hidden_states, weight, eps):
    # Statistics in fp32 (fp16 squares overflow), one cast back at the end, as the official code does.
    hidden_fp32 = hidden_states.float()
    hidden_fp32 = hidden_fp32 * torch.rsqrt(hidden_fp32.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * hidden_fp32).to(hidden_states.dtype)


@fused_on_cuda(kernel=triton_swiglu)
def swiglu(gate_and_up):
    """Fused rows [gate | up] -> silu(gate) * up."""
    gate, up = gate_and_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-5, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, hidden_states):
        return rms_norm(hidden_states, self.weight, self.eps)


def add_rms_norm(hidden_states, update, norm):
    """(hidden_states + update, norm of that sum): the residual add and the RMSNorm after it as one kernel on the
    devices that fuse, in passes without gradients (decoding); the add and the norm's forward elsewhere. update None:
    nothing to add."""
    if update is None:
        return hidden_states, norm(hidden_states)
    if (isinstance(norm, RMSNorm) and fuses(hidden_states) and not torch.is_grad_enabled()
            and elementwise_kernels_apply(hidden_states)):
        return triton_add_rms_norm(hidden_states, update, norm.weight, norm.eps)
    hidden_states = hidden_states + update
    return hidden_states, norm(hidden_states)


class RotaryEmbedding(nn.Module):
    """Frequencies of the partial rotary embedding. `inv_freq` is kept as a buffer only so that the state dict has
    the official key; like the official code we never read it, the table always comes from the formula in fp32."""

    def __init__(self, dim, rope_ratio=1.0, device=None):
        super().__init__()
        self.dim = dim
        self.base = 10000.0 * rope_ratio
        self.register_buffer("inv_freq", self.frequencies(device), persistent=True)

    def frequencies(self, device=None):
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim))

    def forward(self, position_ids, dtype):
        """position_ids [B, S] -> (cos, sin), each [B, S, 1, dim/2] in `dtype` (angles computed in fp32)."""
        angles = position_ids[..., None, None].float() * self.frequencies(position_ids.device)
        return angles.cos().to(dtype), angles.sin().to(dtype)


@fused_on_cuda(kernel=triton_rotary)
def apply_rotary(qkv, cos, sin, heads, head_dim):
    """Interleaved (GPT-J style) rotation of the first 2*cos.shape[-1] dims of each head; the rest pass through.
    qkv: fused rows [B, S, (heads + ...) * head_dim], of which the first `heads` heads are rotated (the queries and
    keys: one call for both); cos, sin: [B, S, 1, head_dim / 4]. Returns [B, S, heads, head_dim]. The slicing happens
    here, on the projection's dense output, so that torch.compile sees the same layout for every batch and length."""
    x = qkv[..., : heads * head_dim].unflatten(-1, (heads, head_dim))
    rot_dim = cos.shape[-1] * 2
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    x_even, x_odd = x_rot.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((x_even * cos - x_odd * sin, x_odd * cos + x_even * sin), dim=-1).flatten(-2)
    return torch.cat((rotated, x_pass), dim=-1)


def is_packed(attention_mask, query_len, past_len):
    """Whether a prefill's attention_mask holds the segment ids of packed samples (any value > 1)."""
    return attention_mask is not None and past_len == 0 and query_len > 1 and bool((attention_mask > 1).any())


def attends_in_runs(attention_mask, query_len, past_len):
    """Whether a prefill's attention_mask makes each run of equal values attend causally to itself alone: packed
    samples (segment ids), or padded rows with one run of tokens, padding on either side (the padding run then attends
    to itself, where the dense mask lets it see every key; its outputs are never used either way). A row without
    padding has no mask at all (plain causal attention). Over a cache (past_len > 0, a 0/1 mask): each row's one run
    of new tokens, which then also attends to the cached tokens its mask marks (PackedSegments' past)."""
    if attention_mask is None or query_len < 2:
        return False
    new = attention_mask[:, past_len:]
    tokens = new == 1
    token_runs = tokens[:, 0].int() + (tokens[:, 1:] & ~tokens[:, :-1]).sum(-1)
    if past_len:
        return bool((token_runs.max() <= 1) & (attention_mask <= 1).all())  # one host sync
    return bool((new > 1).any() | ((token_runs.max() <= 1) & ~tokens.all()))  # one host sync


def build_attention_mask(attention_mask, query_len, past_len, prefix_len):
    """Boolean mask [B, 1, q, prefix+past+q] with True = may attend, or None where SDPA needs none
    (plain causal prefill, or one query token that sees everything).

    attention_mask: [B, past+q] with 1 = token, 0 = padding (prefix positions are always visible).
    Padded query rows see every key so that no softmax row is empty (their outputs are never used).
    Packed samples (utils/dataset.py PackedDataset): a prefill's mask holds segment ids 1, 2, 3, ... (0 = padding);
    a token then attends causally to the tokens of its own segment only (block-diagonal causal mask)."""
    key_len = prefix_len + past_len + query_len
    if is_packed(attention_mask, query_len, past_len):
        segments = attention_mask
        allowed = torch.ones(query_len, query_len, dtype=torch.bool, device=segments.device).tril()[None]
        allowed = allowed & (segments[:, :, None] == segments[:, None, :]) & (segments != 0)[:, None, :]
        allowed = torch.cat((allowed.new_ones(*allowed.shape[:2], prefix_len), allowed), dim=-1)
        return (allowed | (segments == 0)[:, :, None])[:, None]
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and (query_len == 1 or key_len == query_len):
        return None
    device = attention_mask.device if attention_mask is not None else None
    query_pos = torch.arange(query_len, device=device)[:, None] + prefix_len + past_len
    allowed = (torch.arange(key_len, device=device)[None, :] <= query_pos)[None]
    if padded:
        if attention_mask.shape[-1] != past_len + query_len:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions, expected past {past_len} + new {query_len}"
            )
        keep = attention_mask.bool()
        key_keep = torch.cat((keep.new_ones(keep.shape[0], prefix_len), keep), dim=-1)
        allowed = (allowed & key_keep[:, None, :]) | ~keep[:, -query_len:, None]
    return allowed[:, None]


class PackedSegments:
    """Packed or padded rows for flash attention's variable-length kernel: the batch flattened to one sequence of
    tokens, cut where the mask's value changes or a row begins. Each segment (padding runs included: their outputs are
    never used) attends causally to itself only, as build_attention_mask's dense mask has it, but with no [S, S] mask,
    no work on the blocks outside the diagonal, and nothing that depends on the shape: SDPA with a dense mask goes to
    cuDNN first, which builds a plan for every new (batch, length): 40 ms to 1.8 s each on an H100.

    Over a cache of past_len tokens per row (a DynamicCache: evaluation's shared prompt prefix, a padded prefill after
    earlier turns), each segment's keys are the cached tokens its row's mask marks, then its own tokens; flash
    attention aligns a causal query run to the end of its keys, so token i sees the cached ones and its run up to i."""

    def __init__(self, segments, past_len=0):
        batch, seq = segments.shape[0], segments.shape[1] - past_len
        flat = segments[:, past_len:].reshape(-1)
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = flat[1:] != flat[:-1]
        starts[::seq] = True
        bounds = torch.cat((starts.nonzero().flatten(), flat.new_tensor([flat.numel()])))
        lengths = bounds[1:] - bounds[:-1]
        self.cu_seqlens = self.cu_seqlens_k = bounds.to(torch.int32)
        self.max_len = self.max_len_k = int(lengths.max())  # the one host sync per forward (a few over a cache)
        self.batch, self.seq, self.past_len, self.key_index = batch, seq, past_len, None
        if past_len:
            self._add_past(segments[:, :past_len] != 0, bounds, lengths)

    def _add_past(self, cached, bounds, lengths):
        """key_index: for each segment, its row's marked cached positions, then its own, as indices into the rows'
        keys flattened [B * (past_len + seq)]; cu_seqlens_k and max_len_k to match."""
        seq, width = self.seq, self.past_len + self.seq
        segment_ids = torch.arange(len(lengths), device=bounds.device)
        segment_rows = bounds[:-1] // seq
        row_counts = cached.sum(-1)
        counts = row_counts[segment_rows]  # cached keys of each segment: its row's
        key_lengths = counts + lengths
        cu_keys = torch.cat((key_lengths.new_zeros(1), key_lengths.cumsum(0)))
        total_cached, total = int(counts.sum()), int(cu_keys[-1])
        self.cu_seqlens_k = cu_keys.to(torch.int32)
        self.max_len_k = int(key_lengths.max())
        rows, positions = cached.nonzero().unbind(-1)  # row-major: each row's cached positions in order
        row_first = row_counts.cumsum(0) - row_counts
        owner = torch.repeat_interleave(segment_ids, counts, output_size=total_cached)
        rank = torch.arange(total_cached, device=bounds.device) - (counts.cumsum(0) - counts)[owner]
        cached_keys = (rows * width + positions)[row_first[segment_rows[owner]] + rank]
        token = torch.arange(self.batch * seq, device=bounds.device)
        token_owner = torch.repeat_interleave(segment_ids, lengths, output_size=len(token))
        own_keys = token // seq * width + self.past_len + token % seq
        self.key_index = torch.empty(total, dtype=torch.long, device=bounds.device)
        self.key_index[cu_keys[owner] + rank] = cached_keys
        self.key_index[cu_keys[token_owner] + counts[token_owner] + token - bounds[token_owner]] = own_keys

    @staticmethod
    def applies(attention_mask, query_len, past_len, prefix_len, hidden_states, dropout):
        """Where the variable-length kernel can replace the dense mask: a packed or padded prefill on CUDA in
        fp16/bf16, with no P-tuning prefix (seen by every segment) and no attention dropout."""
        return (varlen_attn is not None and hidden_states.is_cuda and hidden_states.dtype in (torch.float16, torch.bfloat16)
                and not prefix_len and not dropout and attends_in_runs(attention_mask, query_len, past_len))

    def keys_of_segments(self, k):
        """k [B, S, kv_heads, d] (with a past: [B, past_len + S, kv_heads, d], the cache's rows) -> the keys of
        each segment in turn, [cu_seqlens_k[-1], kv_heads, d]."""
        k = k.reshape(-1, *k.shape[2:])
        return k if self.key_index is None else k.index_select(0, self.key_index)

    def attend(self, q, k, v):
        """q [B, S, heads, d], k and v [B, S, kv_heads, d] (with a past: the cache's rows, [B, past_len + S,
        kv_heads, d]) -> [B, S, heads * d]. Fewer key/value heads than query heads are passed as they are (flash
        attention's grouped-query support)."""
        q = q.reshape(self.batch * self.seq, *q.shape[2:])
        k, v = self.keys_of_segments(k), self.keys_of_segments(v)
        out = varlen_attn(q, k, v, self.cu_seqlens, self.cu_seqlens_k, self.max_len, self.max_len_k,
                          window_size=(-1, 0),
                          **({"enable_gqa": True} if VARLEN_HAS_GQA_FLAG and k.shape[1] != q.shape[1] else {}))
        return out.reshape(self.batch, self.seq, -1)


# torch >= 2.12 asks for grouped-query attention by name; 2.10/2.11 accept fewer key/value heads as they are.
VARLEN_HAS_GQA_FLAG = varlen_attn is not None and "enable_gqa" in inspect.signature(varlen_attn).parameters


def segment_starts(segments):
    """[B, S] index of the first token of each token's segment (a segment: a run of equal ids in `segments`)."""
    index = torch.arange(segments.shape[-1], device=segments.device).expand_as(segments)
    new = torch.ones_like(segments, dtype=torch.bool)
    new[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return torch.where(new, index, 0).cummax(-1).values


def segment_positions(segments):
    """[B, S] 0-based positions that restart at each segment of `segments` (padding: its own run)."""
    return torch.arange(segments.shape[-1], device=segments.device) - segment_starts(segments)


class StaticKVCache:
    """Keys and values of every layer in per-layer buffers of fixed size [B, kv_heads, capacity, head_dim], plus the
    decoding state (next slot, next positions, which slots hold real tokens) as device tensors.

    Fixed shapes and addresses let one decode step be captured as a CUDA graph and replayed for every token (the
    gpt-fast recipe); every update happens on the device, so a step needs no host sync. The prompt is prefilled by the
    ordinary forward pass into a DynamicCache and copied in with `load`. A model keeps one and reuses it while batch,
    capacity and dtype stay the same: callers get `StaticCacheRef` handles, which notice when a later generation has
    reused the buffers."""

    def __init__(self, num_layers, batch, num_kv_heads, capacity, head_dim, position_shape, dtype, device):
        self.capacity = capacity
        # One buffer per layer rather than one [layers, ...] tensor: compiled, an in-place write into a slice of a
        # larger graph input becomes a copy of the whole input (measured on ChatGLM-6B: ~1.6 ms of a 7.9 ms token).
        self.keys = [torch.zeros(batch, num_kv_heads, capacity, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros_like(keys) for keys in self.keys]
        self.valid = torch.zeros(batch, capacity, dtype=torch.bool, device=device)  # False: padding or not yet filled
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # where the next token's key/value goes
        self.positions = torch.zeros(batch, *position_shape, dtype=torch.long, device=device)  # of the next token
        self.length = 0  # host-side count of filled slots (prefix included), kept in step with `slot`
        self.serial = 0  # bumped by every load, so that stale handles can be detected
        for tensor in (*self.keys, *self.values, self.valid, self.slot, self.positions):
            torch._dynamo.mark_static_address(tensor)

    def fits(self, batch, capacity, dtype, device):
        first = self.keys[0]
        return (first.shape[0], self.capacity, first.dtype, first.device) == (batch, capacity, dtype, device)

    @torch.no_grad()
    def load(self, cache, attention_mask, prefix_len, next_positions):
        """Copy a prefilled DynamicCache in; attention_mask [B, n] covers its non-prefix slots."""
        length = cache.get_seq_length()
        for layer_idx, layer in enumerate(cache.layers):
            self.keys[layer_idx][:, :, :length] = layer.keys
            self.values[layer_idx][:, :, :length] = layer.values
        self.valid.zero_()
        self.valid[:, :prefix_len] = True
        self.valid[:, prefix_len:length] = attention_mask.bool()
        self.slot.fill_(length)
        self.positions.copy_(next_positions)
        self.length = length
        self.serial += 1
        return StaticCacheRef(self)

    def update(self, key, value, layer_idx):
        """Write one step's key/value [B, kv_heads, 1, head_dim] at `slot`; attention reads the whole buffer (the
        slots not yet written are masked by `valid`)."""
        self.keys[layer_idx].index_copy_(2, self.slot, key)
        self.values[layer_idx].index_copy_(2, self.slot, value)
        return self.keys[layer_idx], self.values[layer_idx]


class StaticCacheRef:
    """What stream_generate yields as the cache on the static path: the filled part of a StaticKVCache, valid until
    the model's next generation reuses the buffers. Passing it back to continue a conversation copies it out first."""

    def __init__(self, cache):
        self.cache, self.serial, self.length = cache, cache.serial, cache.length

    def get_seq_length(self, layer_idx=0):
        return self.length

    def to_dynamic(self, config):
        if self.serial != self.cache.serial:
            raise RuntimeError(
                "this KV cache was overwritten by a later generation of the same model (the static cache is reused); "
                "continue a conversation before starting another one, or decode with decode='plain'"
            )
        dynamic = DynamicCache(config=config)
        for layer_idx in range(len(self.cache.keys)):
            dynamic.update(
                self.cache.keys[layer_idx][:, :, : self.length].clone(),
                self.cache.values[layer_idx][:, :, : self.length].clone(),
                layer_idx,
            )
        return dynamic


def static_cache_capacity(needed, limit):
    """Slots to allocate: a power of two >= 256 (few distinct sizes, so few recompilations), at most `limit`."""
    capacity = 256
    while capacity < needed:
        capacity *= 2
    return max(min(capacity, limit), needed)


def fused_decode_attention(qkv, rotary, cache, layer_idx, heads, kv_heads, head_dim):
    """A decode step's rotary, cache write and attention as one Triton kernel (kernels.triton_decode_attention), on
    the devices that fuse (see fuses); None where the eager path runs (CPU, inside torch.compile)."""
    keys, values = cache.keys[layer_idx], cache.values[layer_idx]
    pairs = rotary[0].shape[-1]
    if not fuses(qkv) or not decode_attention_applies(qkv, keys, values, heads, kv_heads, head_dim, pairs):
        return None
    return triton_decode_attention(qkv, *rotary, keys, values, cache.valid, cache.slot, heads, kv_heads, head_dim)


def make_linear(bits, in_features, out_features, bias, device=None):
    """nn.Linear, or QuantizedLinear (int8 / packed int4 weight + per-row scale) for bits 8 or 4: the blocks' layers
    take config.quantization_bit, the output layer config.output_layer_quantization_bit, so that a quantized
    checkpoint loads directly."""
    if bits:
        return QuantizedLinear(in_features, out_features, bits, bias=bias, device=device)
    return nn.Linear(in_features, out_features, bias=bias, device=device)


class SelfAttention(nn.Module):
    def __init__(self, config, layer_idx, device=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.num_kv_heads = config.multi_query_group_num if config.multi_query_attention else self.num_heads
        self.attention_dropout = config.attention_dropout
        projection = self.num_heads * self.head_dim
        self.query_key_value = make_linear(
            config.quantization_bit,
            config.hidden_size,
            projection + 2 * self.num_kv_heads * self.head_dim,
            bias=config.add_bias_linear or config.add_qkv_bias,
            device=device,
        )
        self.dense = make_linear(config.quantization_bit, projection, config.hidden_size, bias=config.add_bias_linear,
                                 device=device)

    def forward(self, hidden_states, attention_mask, rotary, prefix_key=None, prefix_value=None, past_key_values=None):
        batch, seq, _ = hidden_states.shape
        if isinstance(past_key_values, StaticKVCache) and not self.training:  # a decode step
            qkv = decode_product(self.query_key_value, hidden_states)
            context = fused_decode_attention(
                qkv, rotary, past_key_values, self.layer_idx, self.num_heads, self.num_kv_heads, self.head_dim
            )
            if context is not None:
                return decode_product(self.dense, context)
        else:
            qkv = self.query_key_value(hidden_states)
        # Fused rows: [q of all heads | k of all groups | v of all groups]; q and k are rotated in one call.
        rotated_heads = self.num_heads + self.num_kv_heads
        qk = apply_rotary(qkv, *rotary, rotated_heads, self.head_dim)
        v = qkv[..., rotated_heads * self.head_dim :].unflatten(-1, (self.num_kv_heads, self.head_dim))
        if isinstance(attention_mask, PackedSegments):
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=2)
            if past_key_values is not None:  # a padded prompt's prefill: the cache keeps every position, padding too
                keys, values = past_key_values.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
                if attention_mask.past_len:  # the new tokens see the cached ones too
                    k, v = keys.transpose(1, 2), values.transpose(1, 2)
            return self.dense(attention_mask.attend(q, k, v))
        q, k = qk.transpose(1, 2).split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.transpose(1, 2)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        elif prefix_key is not None:
            k, v = torch.cat((prefix_key, k), dim=2), torch.cat((prefix_value, v), dim=2)
        # Query head n uses key/value group n // (heads / groups), which is what enable_gqa does.
        if seq == 1 and self.num_kv_heads != self.num_heads and not self.training:
            # One new token: the heads of a group become that group's queries, so no key/value is repeated.
            grouped = q.reshape(batch, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
            context = F.scaled_dot_product_attention(grouped, k, v, attn_mask=attention_mask)
            context = context.reshape(batch, 1, self.num_heads * self.head_dim)
        else:
            context = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attention_mask,
                is_causal=attention_mask is None and seq > 1,
                dropout_p=self.attention_dropout if self.training else 0.0,
                enable_gqa=self.num_kv_heads != self.num_heads,
            )
            context = context.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.dense(context)


class MLP(nn.Module):
    def __init__(self, config, device=None):
        super().__init__()
        # Fused rows: [gate | up]; SiLU goes on the gate half.
        bits, bias = config.quantization_bit, config.add_bias_linear
        self.dense_h_to_4h = make_linear(bits, config.hidden_size, config.ffn_hidden_size * 2, bias=bias, device=device)
        self.dense_4h_to_h = make_linear(bits, config.ffn_hidden_size, config.hidden_size, bias=bias, device=device)
        # True: dense_h_to_4h and the activation run again in backward, and the block keeps the MLP's input instead of
        # dense_h_to_4h's output, its largest saved activation (the training option --recompute_mlp_blocks)
        self.recompute_activation = False

    def forward(self, hidden_states):
        if self.recompute_activation and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return self.dense_4h_to_h(torch.utils.checkpoint.checkpoint(self.activated, hidden_states, use_reentrant=False))
        return self.dense_4h_to_h(self.activated(hidden_states))

    def activated(self, hidden_states):
        return swiglu(self.dense_h_to_4h(hidden_states))

    def decode(self, hidden_states):
        """forward() in a decode step (inference): the products through kernels.decode_product, SwiGLU in the first
        one's launch (kernels.decode_swiglu_product)."""
        return decode_product(self.dense_4h_to_h, decode_swiglu_product(self.dense_h_to_4h, hidden_states, swiglu))


def make_norm(config, device=None):
    if config.rmsnorm:
        return RMSNorm(config.hidden_size, eps=config.layernorm_epsilon, device=device)
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon, device=device)


class GLMBlock(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx, device=None):
        super().__init__()
        self.post_norm_residual = config.apply_residual_connection_post_layernorm
        self.input_layernorm = make_norm(config, device)
        self.self_attention = SelfAttention(config, layer_idx, device=device)
        self.post_attention_layernorm = make_norm(config, device)
        self.mlp = MLP(config, device=device)
        self.hidden_dropout = config.hidden_dropout

    def forward(self, hidden_states, attention_mask, rotary, prefix_key=None, prefix_value=None, past_key_values=None):
        normed = self.input_layernorm(hidden_states)
        attention_out = self.self_attention(normed, attention_mask, rotary, prefix_key, prefix_value, past_key_values)
        residual = normed if self.post_norm_residual else hidden_states
        hidden_states = residual + F.dropout(attention_out, p=self.hidden_dropout, training=self.training)
        normed = self.post_attention_layernorm(hidden_states)
        residual = normed if self.post_norm_residual else hidden_states
        return residual + F.dropout(self.mlp(normed), p=self.hidden_dropout, training=self.training)

    def decode(self, hidden_states, update, attention_mask, rotary, cache):
        """forward() of a pre-norm block for one step on the static cache, without gradients, with the residual stream
        carried as (hidden_states, update): the block's last add is left to the next block, so that every add runs
        fused into the norm after it. Returns the new (hidden_states, update)."""
        hidden_states, normed = add_rms_norm(hidden_states, update, self.input_layernorm)
        attention_out = self.self_attention(normed, attention_mask, rotary, past_key_values=cache)
        hidden_states, normed = add_rms_norm(hidden_states, attention_out, self.post_attention_layernorm)
        return hidden_states, self.mlp.decode(normed)


class GLMTransformer(nn.Module):
    def __init__(self, config, device=None):
        super().__init__()
        self.layers = nn.ModuleList([GLMBlock(config, i, device=device) for i in range(config.num_layers)])
        self.final_layernorm = make_norm(config, device) if config.post_layer_norm else None


class Embedding(nn.Module):
    def __init__(self, config, device=None):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size, device=device)
        self.fp32_residual_connection = config.fp32_residual_connection

    def forward(self, input_ids):
        embeddings = self.word_embeddings(input_ids)
        return embeddings.float() if self.fp32_residual_connection else embeddings


class PrefixEncoder(nn.Module):
    """P-tuning v2 prefix: per layer one key and one value of `pre_seq_len` positions for every key/value group."""

    def __init__(self, config):
        super().__init__()
        num_kv_heads = config.multi_query_group_num if config.multi_query_attention else config.num_attention_heads
        width = config.num_layers * config.kv_channels * num_kv_heads * 2
        self.prefix_projection = config.prefix_projection
        self.embedding = nn.Embedding(config.pre_seq_len, width)
        if self.prefix_projection:
            self.trans = nn.Sequential(
                nn.Linear(width, config.hidden_size), nn.Tanh(), nn.Linear(config.hidden_size, width)
            )

    def forward(self, prefix):
        embedded = self.embedding(prefix)
        return self.trans(embedded) if self.prefix_projection else embedded


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _supports_sdpa = True

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.freeze_all_but_prefix()  # loading builds fresh parameters, so the freeze of __init__ is gone
        model.freeze_quantized_weights()
        return loaded

    def freeze_all_but_prefix(self):
        """P-tuning v2 trains only the prefix encoder, as in the official model."""
        if self.config.pre_seq_len:
            for name, param in self.named_parameters():
                param.requires_grad = "prefix_encoder." in name

    def freeze_quantized_weights(self):
        """Quantized weights and their scales are never trained (loading re-creates them with requires_grad set)."""
        for module in self.modules():
            if isinstance(module, QuantizedLinear):
                module.weight.requires_grad_(False)
                module.weight_scale.requires_grad_(False)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, RotaryEmbedding):
            init.copy_(module.inv_freq, module.frequencies(module.inv_freq.device))
        elif isinstance(module, QuantizedLinear):
            init.zeros_(module.weight)
            init.ones_(module.weight_scale)
            if module.bias is not None:
                init.zeros_(module.bias)

    def get_position_ids(self, input_ids, attention_mask=None):
        """0-based positions of the real tokens; left padding gets position 0 (as the official tokenizer gives).
        With a mask, only the mask counts (it may also cover cached tokens that input_ids lacks)."""
        if attention_mask is None:
            return torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        # Rows of packed samples (segment ids > 1 in the mask): positions restart at each segment. Chosen per row
        # without a host sync; a 0/1 row keeps the positions above.
        return torch.where((attention_mask > 1).any(-1, keepdim=True), segment_positions(attention_mask), positions)


class ChatGLMModel(ChatGLMPreTrainedModel):
    def __init__(self, config: ChatGLMConfig, device=None, empty_init=True):
        super().__init__(config)
        # 4 / 8: the blocks are built with quantized layers, so an int4/int8 checkpoint (e.g. chatglm2-6b-int4) loads;
        # the output layer too where config.json says so (our quantized folders).
        for key in ("quantization_bit", "output_layer_quantization_bit"):
            if getattr(config, key):
                check_bits(getattr(config, key), f"config.json {key}")
        self.num_layers = config.num_layers
        self.num_kv_heads = config.multi_query_group_num if config.multi_query_attention else config.num_attention_heads
        self.head_dim = config.kv_channels
        self.embedding = Embedding(config, device=device)
        self.rotary_pos_emb = RotaryEmbedding(config.kv_channels // 2, rope_ratio=getattr(config, "rope_ratio", 1.0), device=device)
        self.encoder = GLMTransformer(config, device=device)
        self.output_layer = make_linear(config.output_layer_quantization_bit, config.hidden_size, config.padded_vocab_size,
                                        bias=False, device=device)
        self.pre_seq_len = config.pre_seq_len or 0
        if self.pre_seq_len:
            self.prefix_encoder = PrefixEncoder(config)
            self.prefix_dropout = nn.Dropout(0.1)
        self.gradient_checkpointing = False
        # Set by the toolkit (utils/graphed_blocks.py): a callable (hidden_states, mask, rotary) -> hidden_states that
        # trains the blocks as CUDA graphs; used in training forwards with gradients, without cache, prefix or
        # output_hidden_states.
        self.block_graphs = None
        self.post_init()
        self.freeze_all_but_prefix()

    def get_input_embeddings(self):
        return self.embedding.word_embeddings

    def quantize(self, bits):
        """Quantize the four linear layers of every block in place to int8 (bits=8) or int4 (bits=4), and the output
        layer to int8 (OUTPUT_LAYER_BITS) whatever bits is, each with one scale per output row; record them in
        config.quantization_bit and config.output_layer_quantization_bit (so the saved model reloads quantized).
        bits=0 leaves the model as it is. Returns the model."""
        if bits == 0:
            return self
        check_bits(bits)
        current = self.config.quantization_bit or 0
        if current == bits:
            return self
        if current:
            raise ValueError(f"the model is already quantized to {current} bits; load its float weights to quantize to {bits}")
        if type(self.output_layer) is not nn.Linear:  # checked before any layer changes
            raise TypeError(f"output_layer is a {type(self.output_layer).__name__}, not an nn.Linear: merge adapters into "
                            "the weights (merge_and_unload) before quantizing")
        quantize_model(self, bits)
        self.output_layer = QuantizedLinear.from_linear(self.output_layer, OUTPUT_LAYER_BITS)
        self.config.quantization_bit = bits
        self.config.output_layer_quantization_bit = OUTPUT_LAYER_BITS
        return self

    def set_input_embeddings(self, value):
        self.embedding.word_embeddings = value

    def get_prompt(self, batch_size, device, dtype):
        """Prefix keys/values per layer, each [B, groups, pre_seq_len, head_dim]."""
        prefix = torch.arange(self.pre_seq_len, device=device)[None].expand(batch_size, -1)
        past = self.prefix_encoder(prefix).to(dtype)
        past = past.view(batch_size, self.pre_seq_len, self.num_layers * 2, self.num_kv_heads, self.head_dim)
        past = self.prefix_dropout(past).permute(2, 0, 3, 1, 4)  # [2L, B, groups, pre, d]
        return [(past[2 * i], past[2 * i + 1]) for i in range(self.num_layers)]

    def forward(
        self,
        input_ids=None,
        position_ids=None,
        attention_mask=None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds=None,
        use_cache=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if isinstance(past_key_values, (tuple, list)):
            raise TypeError("past_key_values must be a transformers Cache (e.g. DynamicCache), not a tuple")
        hidden_states = self.embedding(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seq = hidden_states.shape[:2]
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        cached = past_key_values.get_seq_length() if past_key_values is not None else 0

        prefix_kv = [(None, None)] * self.num_layers
        if self.pre_seq_len and cached == 0:
            prefix_kv = self.get_prompt(batch, hidden_states.device, hidden_states.dtype)
            if past_key_values is not None:
                # Put the prefix into the cache once; later steps see it as past.
                for layer_idx, (key, value) in enumerate(prefix_kv):
                    past_key_values.update(key, value, layer_idx)
                prefix_kv = [(None, None)] * self.num_layers
                cached = self.pre_seq_len
        past_len = max(cached - self.pre_seq_len, 0)

        if position_ids is None:
            if attention_mask is not None:
                position_ids = self.get_position_ids(hidden_states, attention_mask)[:, -seq:]
            else:
                position_ids = torch.arange(past_len, past_len + seq, device=hidden_states.device).expand(batch, -1)
        rotary = self.rotary_pos_emb(position_ids, hidden_states.dtype)
        # (over a cache, only one whose update returns each row's past and new keys: not the static cache's buffers)
        if (PackedSegments.applies(attention_mask, seq, past_len, self.pre_seq_len, hidden_states,
                                   self.training and self.config.attention_dropout)
                and not (past_len and isinstance(past_key_values, StaticKVCache))):
            mask = PackedSegments(attention_mask, past_len)
        else:
            mask = build_attention_mask(attention_mask, seq, past_len, self.pre_seq_len)

        all_hidden_states = () if output_hidden_states else None
        if (self.block_graphs is not None and self.training and torch.is_grad_enabled() and past_key_values is None
                and not self.pre_seq_len and not output_hidden_states):
            hidden_states = self.block_graphs(hidden_states, mask, rotary)
        else:
            for layer, (prefix_key, prefix_value) in zip(self.encoder.layers, prefix_kv):
                if output_hidden_states:
                    all_hidden_states += (hidden_states,)
                hidden_states = layer(hidden_states, mask, rotary, prefix_key, prefix_value, past_key_values=past_key_values)
        if self.encoder.final_layernorm is not None:
            hidden_states = self.encoder.final_layernorm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            **{CACHE_FIELD: past_key_values if use_cache else None},
            hidden_states=all_hidden_states,
        )
        return output if return_dict is not False else output.to_tuple()

    def decode_hidden_states(self, input_ids, cache: StaticKVCache):
        """Final hidden states [B, 1, H] of one new token per sequence, at `cache.positions`, attending to the valid
        slots of `cache`. The lean body of forward() for the static path: nothing here depends on host values."""
        hidden_states = self.embedding(input_ids)
        rotary = self.rotary_pos_emb(cache.positions, hidden_states.dtype)
        mask = cache.valid[:, None, None, :]
        final_norm = self.encoder.final_layernorm
        if self.config.apply_residual_connection_post_layernorm or final_norm is None:
            for layer in self.encoder.layers:
                hidden_states = layer(hidden_states, mask, rotary, past_key_values=cache)
            return hidden_states if final_norm is None else final_norm(hidden_states)
        update = None  # pre-norm blocks: each residual add fused into the norm after it
        for layer in self.encoder.layers:
            hidden_states, update = layer.decode(hidden_states, update, mask, rotary, cache)
        return add_rms_norm(hidden_states, update, final_norm)[1]


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, GenerationMixin):
    def __init__(self, config: ChatGLMConfig, empty_init=True, device=None):
        super().__init__(config)
        self.max_sequence_length = config.seq_length
        self.transformer = ChatGLMModel(config, device=device)
        self.post_init()

    def get_output_embeddings(self):
        return self.transformer.output_layer

    def quantize(self, bits):
        """Weight-only int8 (bits=8) / int4 (bits=4) quantization of the blocks in place, as the official
        `model.quantize(bits)`, and of the output layer to int8 (see ChatGLMModel.quantize); embeddings and norms stay
        in full precision. Returns the model."""
        self.transformer.quantize(bits)
        self.config.quantization_bit = self.transformer.config.quantization_bit
        self.config.output_layer_quantization_bit = self.transformer.config.output_layer_quantization_bit
        return self

    def set_output_embeddings(self, value):
        self.transformer.output_layer = value

    def forward(
        self,
        input_ids=None,
        position_ids=None,
        attention_mask=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_hidden_states=None,
        return_dict=None,
        logits_to_keep=0,
        num_items_in_batch=None,
        **kwargs,
    ):
        """Causal LM forward. With `labels`, the loss comes from causal_lm_loss (the output layer runs only on the
        positions that have a target, in checkpointed chunks). `logits` ([B, S or logits_to_keep, vocab]) are
        computed when there are no labels or the model is in eval mode; in training mode with labels they are None,
        so that training never materialises the full logits (the Trainer and train_deepspeed.py read only the loss
        then; evaluation runs in eval mode and gets both). `logits_to_keep` trims the logits, never the loss."""
        outputs = self.transformer(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        hidden_states = outputs.last_hidden_state
        output_layer = self.transformer.output_layer
        chunk_rows = GRAPHED_LOSS_CHUNK_ROWS if self.transformer.block_graphs is not None else None
        loss = (causal_lm_loss(hidden_states, output_layer, labels, num_items_in_batch, chunk_rows)
                if labels is not None else None)
        logits = None
        if labels is None or not self.training:
            if logits_to_keep:
                # made dense: on a strided slice F.linear runs a batched product that reads the whole output
                # layer once per row (5 ms per 25-row batch on an H100, where the product itself takes 0.2)
                hidden_states = hidden_states[:, -logits_to_keep:].contiguous()
            logits = output_layer(hidden_states)
        output = CausalLMOutputWithPast(
            loss=loss, logits=logits, **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)}, hidden_states=outputs.hidden_states
        )
        return output if return_dict is not False else output.to_tuple()

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, attention_mask=None, use_cache=True, logits_to_keep=None, **kwargs
    ):
        # Positions always come from the full sequence and its padding mask, never from cache bookkeeping.
        position_ids = self.get_position_ids(input_ids, attention_mask)
        cached = past_key_values.get_seq_length() if past_key_values is not None else 0
        seen = max(cached - self.transformer.pre_seq_len, 0)
        inputs = {
            "input_ids": input_ids[:, seen:],
            "position_ids": position_ids[:, seen:],
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
            "use_cache": use_cache,
        }
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        return inputs

    def logits_processors(self, do_sample, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, logits_processor=None):
        """What stream_generate does to the logits, in order (utils.decode_engine applies the same list)."""
        processors = LogitsProcessorList()
        if repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
        processors.extend(logits_processor or [])
        processors.append(InvalidScoreLogitsProcessor())
        if do_sample:
            if temperature != 1.0:
                processors.append(TemperatureLogitsWarper(temperature))
            if top_k:
                processors.append(TopKLogitsWarper(top_k))
            if top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p))
        return processors

    @torch.inference_mode()
    def stream_generate(
        self,
        input_ids,
        attention_mask=None,
        past_key_values=None,
        max_length=None,
        max_new_tokens=None,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        repetition_penalty=1.0,
        eos_token_id=None,
        logits_processor=None,
        decode="plain",
    ):
        """Token-by-token decoding with a growing DynamicCache, on a plain loop. Yields (new_token_ids [B, n], cache)
        after every step.

        attention_mask covers the cached tokens too (excluding any P-tuning prefix). Stops when every sequence has
        produced one of `eos_token_id`, or at `max_new_tokens` / total `max_length`. A model loaded by the project's
        utils.model_loading decodes through utils.decode_engine instead (the same tokens, from a static cache with the
        step replayed as a CUDA graph); this loop is its decode="plain"."""
        if decode not in ("plain", "auto"):
            raise ValueError(f"decode={decode!r}: this loop decodes plainly (utils.decode_engine has the other modes)")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if isinstance(past_key_values, StaticCacheRef):
            past_key_values = past_key_values.to_dynamic(self.config)
        if past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        eos = torch.tensor(eos_token_id if eos_token_id is not None else self.config.eos_token_id, device=input_ids.device).flatten()
        prompt_len = input_ids.shape[1]
        if max_new_tokens is None:
            max_new_tokens = (max_length or self.max_sequence_length) - attention_mask.shape[1]
        if max_new_tokens < 1:
            raise ValueError(f"prompt of {attention_mask.shape[1]} tokens leaves no room under max_length={max_length}")
        processors = self.logits_processors(do_sample, temperature, top_k, top_p, repetition_penalty, logits_processor)
        unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        sequence, step_ids = input_ids, input_ids  # step_ids: tokens the cache has not seen yet
        for _ in range(max_new_tokens):
            position_ids = self.get_position_ids(sequence, attention_mask)[..., -step_ids.shape[1]:]
            outputs = self(
                input_ids=step_ids,
                position_ids=position_ids,
                attention_mask=attention_mask,
                past_key_values=past_key_values,
                use_cache=True,
                logits_to_keep=1,
            )
            scores = processors(sequence, outputs.logits[:, -1].float())
            if do_sample:
                next_tokens = torch.multinomial(F.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                next_tokens = scores.argmax(-1)
            next_tokens = torch.where(unfinished, next_tokens, eos[0])
            step_ids = next_tokens[:, None]
            sequence = torch.cat((sequence, step_ids), dim=1)
            attention_mask = torch.cat((attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)), dim=1)
            unfinished &= ~torch.isin(next_tokens, eos)
            yield sequence[:, prompt_len:], past_key_values
            if not unfinished.any():
                break

    @staticmethod
    def advance_positions(positions):
        """Positions of the next token from those of the current one, in place: one further along."""
        return positions.add_(1)

    def static_cache(self, batch, needed, dtype, device):
        """The model's StaticKVCache for this batch size, with room for `needed` slots (reused when it fits)."""
        capacity = static_cache_capacity(needed, self.max_sequence_length + self.transformer.pre_seq_len)
        cache = self.__dict__.get("_static_kv")
        if cache is None or not cache.fits(batch, capacity, dtype, device):
            self.__dict__["_static_kv"] = None  # free the old buffers before allocating new ones
            transformer = self.transformer
            cache = StaticKVCache(
                transformer.num_layers, batch, transformer.num_kv_heads, capacity, transformer.head_dim, (1,), dtype, device
            )
            self.__dict__["_static_kv"] = cache
        return cache

    def static_decode_step(self, input_ids, cache):
        """fp32 logits [B, vocab] of one new token per sequence from the static cache, which it advances (the
        step utils.decode_engine runs eagerly or replays)."""
        cache.valid.index_fill_(1, cache.slot, True)
        hidden_states = self.transformer.decode_hidden_states(input_ids, cache)
        logits = self.transformer.output_layer(hidden_states[:, -1]).float()
        cache.slot.add_(1)
        self.advance_positions(cache.positions)
        return logits

    @staticmethod
    def process_response(response):
        return response.strip().replace("[[训练时间]]", "2023年")

    def _chat_inputs(self, tokenizer, query, history, past_key_values):
        if past_key_values is None or not history:
            inputs = tokenizer([tokenizer.build_prompt(query, history=history)], return_tensors="pt")
            return inputs["input_ids"].to(self.device), inputs["attention_mask"].to(self.device), None
        # Continue from a cache: encode only the new turn and drop its dummy-prefix piece, as the official code does.
        turn = f"\n\n[Round {len(history) + 1}]\n\n问：{query}\n\n答："
        input_ids = torch.tensor([tokenizer.encode(turn, add_special_tokens=False)[1:]], device=self.device)
        past = past_key_values.get_seq_length() - self.transformer.pre_seq_len
        attention_mask = torch.ones(1, past + input_ids.shape[1], dtype=torch.long, device=self.device)
        return input_ids, attention_mask, past_key_values

    def stream_chat(
        self,
        tokenizer,
        query: str,
        history=None,
        past_key_values=None,
        max_length: int = 8192,
        do_sample=True,
        top_p=0.8,
        temperature=0.8,
        logits_processor=None,
        return_past_key_values=False,
        **kwargs,
    ):
        """Yields (response so far, history + this turn) as tokens arrive; with `return_past_key_values` also the
        cache, which a later call can continue from."""
        history = list(history or [])
        input_ids, attention_mask, past_key_values = self._chat_inputs(tokenizer, query, history, past_key_values)
        gen_kwargs = dict(max_length=max_length, do_sample=do_sample, top_p=top_p, temperature=temperature)
        gen_kwargs.update(kwargs)
        for new_ids, cache in self.stream_generate(
            input_ids, attention_mask, past_key_values, eos_token_id=[tokenizer.eos_token_id], logits_processor=logits_processor, **gen_kwargs
        ):
            ids = new_ids[0].tolist()
            if ids and ids[-1] == tokenizer.eos_token_id:
                ids = ids[:-1]
            response = tokenizer.decode(ids)
            # Hold back a half-decoded multi-byte character.
            if response and response[-1] != "\ufffd":
                response = self.process_response(response)
                new_history = history + [(query, response)]
                yield (response, new_history, cache) if return_past_key_values else (response, new_history)

    def chat(self, tokenizer, query: str, history=None, max_length: int = 8192, num_beams=1, do_sample=True, top_p=0.8, temperature=0.8, logits_processor=None, **kwargs):
        if num_beams != 1:
            raise ValueError("chat() decodes one beam; use generate() for beam search")
        result = ("", list(history or []) + [(query, "")])
        for result in self.stream_chat(tokenizer, query, history, max_length=max_length, do_sample=do_sample, top_p=top_p, temperature=temperature, logits_processor=logits_processor, **kwargs):
            pass
        return result


class ChatGLMForSequenceClassification(ChatGLMPreTrainedModel):
    """Classification from the final hidden state at the last position (left padding keeps it a real token)."""

    def __init__(self, config: ChatGLMConfig, empty_init=True, device=None):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.transformer = ChatGLMModel(config, device=device)
        self.classifier_head = nn.Linear(config.hidden_size, config.num_labels, bias=True)
        self.dropout = nn.Dropout(config.classifier_dropout) if config.classifier_dropout is not None else nn.Identity()
        self.post_init()

    def forward(self, input_ids=None, position_ids=None, attention_mask=None, past_key_values=None, inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None, return_dict=None, **kwargs):
        outputs = self.transformer(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, past_key_values=past_key_values,
            inputs_embeds=inputs_embeds, use_cache=use_cache, output_hidden_states=output_hidden_states,
        )
        pooled = self.dropout(outputs.last_hidden_state[:, -1])
        logits = self.classifier_head(pooled.to(self.classifier_head.weight.dtype))
        loss = None
        if labels is not None:
            if self.config.problem_type is None:
                if self.num_labels == 1:
                    self.config.problem_type = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    self.config.problem_type = "single_label_classification"
                else:
                    self.config.problem_type = "multi_label_classification"
            if self.config.problem_type == "regression":
                loss = F.mse_loss(logits.squeeze(-1).float(), labels.float())
            elif self.config.problem_type == "single_label_classification":
                loss = F.cross_entropy(logits.float(), labels.view(-1))
            else:
                loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
        output = SequenceClassifierOutputWithPast(
            loss=loss, logits=logits, **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)}, hidden_states=outputs.hidden_states
        )
        return output if return_dict is not False else output.to_tuple()
