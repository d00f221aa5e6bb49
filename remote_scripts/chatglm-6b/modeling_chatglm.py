"""ChatGLM-6B (GLM) model, written for this toolkit to run on current PyTorch and transformers 5.x.

Loads the official checkpoints unchanged (same parameter names and shapes) and computes the same function as the
official code: post-LN "DeepNorm" blocks (residual = sqrt(56) * normalised input, for any depth), per-head fused QKV, 2-D rotary
positions (main position | block position), a prefix-LM mask (the context before <sop> is bidirectional), plain GeLU
MLP and an output layer tied to the word embeddings.

Differences from the official code, all on purpose:
- Inputs take the usual 2-D padding mask (1 = token, 0 = pad); the model derives the prefix-LM mask and the 2-D
  positions itself, without per-sample host syncs. The official boolean [B, 1, S, S] mask (True = blocked) is
  still accepted by forward().
- The KV cache is a transformers `Cache` (batch-first), attention is `scaled_dot_product_attention`.
- Rotary angles: frequencies are rounded to fp16 exactly as the official module builds them; the angles are
  computed in fp32 and rounded to fp16 for half-precision models, which reproduces the official fp32 and fp16
  tables (bf16 models get the fp16 table the model was trained with instead of a coarser bf16 one).
"""
import functools
import math
import re
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
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_chatglm import ChatGLMConfig
from .kernels import elementwise_kernels_apply, triton_rotary_2d
from .quantization import QuantizedLinear, check_bits, quantize_model


# transformers 5.2x names the outputs' cache `cache` (`past_key_values` still works there, with a deprecation
# warning at the first forward of every process); 5.17 knows only past_key_values.
# Copied from remote_scripts/chatglm2-6b/modeling_chatglm.py:CACHE_FIELD
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


# Copied from remote_scripts/chatglm2-6b/modeling_chatglm.py:InvalidScoreLogitsProcessor
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
# Copied from remote_scripts/chatglm2-6b/modeling_chatglm.py:LOSS_CHUNK_ROWS
LOSS_CHUNK_ROWS = 1024


# Copied from remote_scripts/chatglm2-6b/modeling_chatglm.py:_chunk_loss
def _chunk_loss(output_layer, hidden_states, targets):
    """Summed fp32 cross-entropy of one chunk of rows: its logits exist only inside this call."""
    logits = output_layer(hidden_states).float()
    return F.cross_entropy(logits, targets.to(logits.device), reduction="sum")


# Copied from remote_scripts/chatglm2-6b/modeling_chatglm.py:_loss_rows
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


# Copied from remote_scripts/chatglm2-6b/modeling_chatglm.py:causal_lm_loss
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


class RotaryEmbedding(nn.Module):
    """Frequencies for one 64-dim half of a head. `inv_freq` is a buffer only so that the state dict has the official
    key; like the official code we never read it back, the table always comes from the formula."""

    def __init__(self, dim, base=10000.0, device=None):
        super().__init__()
        self.dim = dim
        self.base = base
        self.register_buffer("inv_freq", self.frequencies(device), persistent=True)

    def frequencies(self, device=None):
        # The official module rounds the frequencies to fp16 when it is built; the trained weights expect that.
        exact = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim))
        return exact.half().float()

    def frequency_table(self, device):
        """The frequencies, computed eagerly once per device and kept outside the state dict: compiled code computing
        the power differently by one ulp can land on the other side of an fp16 rounding and change a frequency."""
        table = self.__dict__.get("_frequency_table")
        if table is None or table.device != torch.device(device):
            table = self.frequencies("cpu").to(device)
            self.__dict__["_frequency_table"] = table
        return table

    def forward(self, positions, dtype):
        """positions [B, S] -> (cos, sin), each [B, 1, S, dim] (frequencies repeated for the rotate-half layout)."""
        angles = positions[..., None].float() * self.frequency_table(positions.device)
        if dtype != torch.float32:
            angles = angles.half().float()  # the official half-precision table holds fp16 angles
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos()[:, None].to(dtype), angles.sin()[:, None].to(dtype)


# Set to False to run the element-wise functions below eagerly on CUDA too (tests compare both).
# Copied from remote_scripts/chatglm2-6b/modeling_chatglm.py:FUSE_ELEMENTWISE
FUSE_ELEMENTWISE = True


# Copied from remote_scripts/chatglm2-6b/modeling_chatglm.py:FUSE_DEVICES
FUSE_DEVICES = ("cuda",)


# Copied from remote_scripts/chatglm2-6b/modeling_chatglm.py:fuses
def fuses(tensor):
    """Whether work on `tensor` takes the fused paths: fusing on, its device one that fuses, and not inside an
    enclosing compiled region (which fuses the eager formulas itself)."""
    return FUSE_ELEMENTWISE and tensor.device.type in FUSE_DEVICES and not torch.compiler.is_compiling()


# Copied from remote_scripts/chatglm2-6b/modeling_chatglm.py:fused_on_cuda
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


def scaled_residual(normed, alpha, update):
    """DeepNorm residual: alpha * normalised input + the sublayer's output, in one kernel (one rounding, as compiled
    code has it)."""
    return torch.add(update, normed, alpha=alpha)


def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


@fused_on_cuda(kernel=triton_rotary_2d)
def apply_rotary_2d(x, main, block):
    """First half of each head rotated by the main position, second half by the block position (rotate-half pairs)."""
    x_main, x_block = x.chunk(2, dim=-1)
    x_main = x_main * main[0] + rotate_half(x_main) * main[1]
    x_block = x_block * block[0] + rotate_half(x_block) * block[1]
    return torch.cat((x_main, x_block), dim=-1)


# Copied from remote_scripts/chatglm2-6b/modeling_chatglm.py:is_packed
def is_packed(attention_mask, query_len, past_len):
    """Whether a prefill's attention_mask holds the segment ids of packed samples (any value > 1)."""
    return attention_mask is not None and past_len == 0 and query_len > 1 and bool((attention_mask > 1).any())


# Copied from remote_scripts/chatglm2-6b/modeling_chatglm.py:segment_starts
def segment_starts(segments):
    """[B, S] index of the first token of each token's segment (a segment: a run of equal ids in `segments`)."""
    index = torch.arange(segments.shape[-1], device=segments.device).expand_as(segments)
    new = torch.ones_like(segments, dtype=torch.bool)
    new[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return torch.where(new, index, 0).cummax(-1).values


# Copied from remote_scripts/chatglm2-6b/modeling_chatglm.py:StaticKVCache
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


# Copied from remote_scripts/chatglm2-6b/modeling_chatglm.py:StaticCacheRef
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


# Copied from remote_scripts/chatglm2-6b/modeling_chatglm.py:static_cache_capacity
def static_cache_capacity(needed, limit):
    """Slots to allocate: a power of two >= 256 (few distinct sizes, so few recompilations), at most `limit`."""
    capacity = 256
    while capacity < needed:
        capacity *= 2
    return max(min(capacity, limit), needed)

def make_linear(config, in_features, out_features, device=None):
    """A block's linear layer (all have a bias in v1): nn.Linear, or QuantizedLinear (int8 / packed int4 weight +
    per-row scale) when config.quantization_bit is 4 or 8, so that a quantized checkpoint loads directly."""
    if config.quantization_bit:
        return QuantizedLinear(in_features, out_features, config.quantization_bit, bias=True, device=device)
    return nn.Linear(in_features, out_features, device=device)


class SelfAttention(nn.Module):
    def __init__(self, config, layer_idx, device=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query_key_value = make_linear(config, config.hidden_size, 3 * config.hidden_size, device=device)
        self.dense = make_linear(config, config.hidden_size, config.hidden_size, device=device)
        self.rotary_emb = RotaryEmbedding(self.head_dim // 2, device=device)

    def forward(self, hidden_states, attention_mask, rotary, prefix_key=None, prefix_value=None, past_key_values=None):
        batch, seq, _ = hidden_states.shape
        # Fused rows come in per-head blocks of [q | k | v].
        qkv = self.query_key_value(hidden_states).view(batch, seq, self.num_heads, 3 * self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.split(self.head_dim, dim=-1))
        main, block = rotary
        q, k = apply_rotary_2d(q, main, block), apply_rotary_2d(k, main, block)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        elif prefix_key is not None:
            k, v = torch.cat((prefix_key, k), dim=2), torch.cat((prefix_value, v), dim=2)
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=attention_mask is None and seq > 1)
        return self.dense(context.transpose(1, 2).reshape(batch, seq, -1))


class GLU(nn.Module):
    """The official name; the MLP is plain (not gated): dense_4h_to_h(gelu_tanh(dense_h_to_4h(x)))."""

    def __init__(self, config, device=None):
        super().__init__()
        inner = config.inner_hidden_size or 4 * config.hidden_size
        self.dense_h_to_4h = make_linear(config, config.hidden_size, inner, device=device)
        self.dense_4h_to_h = make_linear(config, inner, config.hidden_size, device=device)
        # True: dense_h_to_4h and the activation run again in backward, and the block keeps the MLP's input instead of
        # dense_h_to_4h's output, its largest saved activation (the training option --recompute_mlp_blocks)
        self.recompute_activation = False

    def forward(self, hidden_states):
        if self.recompute_activation and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            return self.dense_4h_to_h(torch.utils.checkpoint.checkpoint(self.activated, hidden_states, use_reentrant=False))
        return self.dense_4h_to_h(self.activated(hidden_states))

    def activated(self, hidden_states):
        return F.gelu(self.dense_h_to_4h(hidden_states), approximate="tanh")


class GLMBlock(GradientCheckpointingLayer):
    def __init__(self, config, layer_idx, device=None):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon, device=device)
        self.attention = SelfAttention(config, layer_idx, device=device)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon, device=device)
        self.mlp = GLU(config, device=device)
        # The official blocks never receive num_layers and use their default of 28 whatever the depth: sqrt(56).
        self.alpha = math.sqrt(2 * 28)

    def forward(self, hidden_states, attention_mask, rotary, prefix_key=None, prefix_value=None, past_key_values=None):
        normed = self.input_layernorm(hidden_states)
        attention_out = self.attention(normed, attention_mask, rotary, prefix_key, prefix_value, past_key_values)
        hidden_states = scaled_residual(normed, self.alpha, attention_out)
        normed = self.post_attention_layernorm(hidden_states)
        return scaled_residual(normed, self.alpha, self.mlp(normed))


class PrefixEncoder(nn.Module):
    """P-tuning v2 prefix: per layer one key and one value of `pre_seq_len` positions for every head."""

    def __init__(self, config):
        super().__init__()
        width = config.num_layers * config.hidden_size * 2
        self.prefix_projection = config.prefix_projection
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.pre_seq_len, config.hidden_size)
            self.trans = nn.Sequential(
                nn.Linear(config.hidden_size, config.hidden_size), nn.Tanh(), nn.Linear(config.hidden_size, width)
            )
        else:
            self.embedding = nn.Embedding(config.pre_seq_len, width)

    # Copied from remote_scripts/chatglm2-6b/modeling_chatglm.py:PrefixEncoder.forward
    def forward(self, prefix):
        embedded = self.embedding(prefix)
        return self.trans(embedded) if self.prefix_projection else embedded


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _supports_sdpa = True

    # Copied from remote_scripts/chatglm2-6b/modeling_chatglm.py:ChatGLMPreTrainedModel.from_pretrained
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.freeze_all_but_prefix()  # loading builds fresh parameters, so the freeze of __init__ is gone
        model.freeze_quantized_weights()
        return loaded

    # Copied from remote_scripts/chatglm2-6b/modeling_chatglm.py:ChatGLMPreTrainedModel.freeze_all_but_prefix
    def freeze_all_but_prefix(self):
        """P-tuning v2 trains only the prefix encoder, as in the official model."""
        if self.config.pre_seq_len:
            for name, param in self.named_parameters():
                param.requires_grad = "prefix_encoder." in name

    # Copied from remote_scripts/chatglm2-6b/modeling_chatglm.py:ChatGLMPreTrainedModel.freeze_quantized_weights
    def freeze_quantized_weights(self):
        """Quantized weights and their scales are never trained (loading re-creates them with requires_grad set)."""
        for module in self.modules():
            if isinstance(module, QuantizedLinear):
                module.weight.requires_grad_(False)
                module.weight_scale.requires_grad_(False)

    # Copied from remote_scripts/chatglm2-6b/modeling_chatglm.py:ChatGLMPreTrainedModel._init_weights
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
        """[B, 2, S] 2-D positions of a full sequence, counted from its first real token (left padding gets 0).

        Row 0 (main): the index before <sop>, the [gMASK] (else [MASK]) index from <sop> on.
        Row 1 (block): 0 before <sop>, then 1, 2, 3, ..."""
        batch, seq = input_ids.shape
        index = torch.arange(seq, device=input_ids.device)
        relative = index.expand(batch, -1) if attention_mask is None else (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        context_len = first_index(input_ids == self.config.bos_token_id, default=seq)
        gmask, mask = input_ids == self.config.gmask_token_id, input_ids == self.config.mask_token_id
        mask_index = first_index(gmask, default=first_index(mask, default=(context_len - 1).clamp(min=0)))
        after = index[None] >= context_len[:, None]
        start = relative.gather(1, context_len.clamp(max=seq - 1)[:, None])
        main = torch.where(after, relative.gather(1, mask_index[:, None]), relative)
        block = torch.where(after, relative - start + 1, 0)
        positions = torch.stack((main, block), dim=1)
        if attention_mask is None or attention_mask.dim() != 2:
            return positions
        # Rows of packed samples (segment ids > 1 in the mask): the same 2-D positions, restarting at each segment.
        # Chosen per row without a host sync; a 0/1 row keeps the positions above.
        segments = attention_mask
        relative = index - segment_starts(segments)
        context = first_in_segment(input_ids == self.config.bos_token_id, segments, seq)
        no_mask = first_in_segment(mask, segments, (context - 1).clamp(min=0))
        mask_index = first_in_segment(gmask, segments, no_mask).clamp(max=seq - 1)
        after = index >= context
        main = torch.where(after, relative.gather(1, mask_index), relative)
        block = torch.where(after, index - context + 1, 0)
        packed = (segments > 1).any(-1)[:, None, None]
        return torch.where(packed, torch.stack((main, block), dim=1), positions)


def check_no_quantized_embeddings(config):
    if getattr(config, "quantization_embeddings", False):
        raise ValueError(
            "config.json sets quantization_embeddings=true (quantized word embeddings and lm_head): not supported by "
            "this code; use a checkpoint with quantized blocks only (e.g. chatglm-6b-int4 / -int8) or the float weights"
        )


def first_index(hits, default):
    """Index of the first True per row, `default` where a row has none."""
    index = hits.int().argmax(-1)
    return torch.where(hits.any(-1), index, torch.as_tensor(default, device=hits.device))


def first_in_segment(hits, segments, default):
    """[B, S]: for each token, the index of the first True of `hits` in its segment (a run of equal ids in
    `segments`, [B, S]; each id names one run, as in a packed row), `default` (a number or [B, S]) where none."""
    batch, seq = hits.shape
    index = torch.arange(seq, device=hits.device).expand(batch, -1)
    firsts = torch.full((batch, seq + 1), seq, dtype=torch.long, device=hits.device)
    firsts = firsts.scatter_reduce(1, segments.long(), torch.where(hits, index, seq), "amin").gather(1, segments.long())
    return torch.where(firsts < seq, firsts, torch.as_tensor(default, device=hits.device))


def build_glm_attention_mask(input_ids, attention_mask, query_len, past_len, prefix_len, bos_token_id):
    """Boolean mask [B, 1, q, prefix+past+q] with True = may attend, or None where SDPA needs none.

    Prefill: key j is visible from query i iff j is in the context (before <sop>) or j <= i. Decoding: every earlier
    key. Padding keys are hidden; padded query rows see every key so that no softmax row is empty.
    Packed samples (utils/dataset.py PackedDataset): a prefill's 2-D mask holds segment ids 1, 2, 3, ... (0 =
    padding); the same prefix-LM mask then holds within each segment, and no key of another segment is visible."""
    if attention_mask is not None and attention_mask.dim() == 4:
        allowed = ~attention_mask.bool()  # official format: True = blocked
        if prefix_len:
            allowed = torch.cat((allowed.new_ones(*allowed.shape[:-1], prefix_len), allowed), dim=-1)
        return allowed | ~allowed.any(-1, keepdim=True)  # fully blocked (pad) rows: avoid NaN
    if is_packed(attention_mask, query_len, past_len):
        segments = attention_mask
        index = torch.arange(query_len, device=input_ids.device)
        context = first_in_segment(input_ids == bos_token_id, segments, query_len)  # per query token
        allowed = (index[None, None, :] <= index[None, :, None]) | (index[None, None, :] < context[:, :, None])
        allowed = allowed & (segments[:, :, None] == segments[:, None, :]) & (segments != 0)[:, None, :]
        allowed = torch.cat((allowed.new_ones(*allowed.shape[:2], prefix_len), allowed), dim=-1)
        return (allowed | (segments == 0)[:, :, None])[:, None]
    key_len = prefix_len + past_len + query_len
    padded = attention_mask is not None and not bool(attention_mask.all())
    key_index = torch.arange(key_len, device=input_ids.device) - prefix_len  # prefix columns are negative: visible
    query_index = torch.arange(query_len, device=input_ids.device) + past_len
    allowed = key_index[None, None, :] <= query_index[None, :, None]
    if past_len == 0:
        context_len = first_index(input_ids == bos_token_id, default=query_len)
        allowed = allowed | (key_index[None, None, :] < context_len[:, None, None])
    elif query_len == 1 and not padded:
        return None
    if padded:
        keep = attention_mask.bool()
        key_keep = torch.cat((keep.new_ones(keep.shape[0], prefix_len), keep), dim=-1)
        allowed = (allowed & key_keep[:, None, :]) | ~keep[:, -query_len:, None]
    return allowed[:, None]


class ChatGLMModel(ChatGLMPreTrainedModel):
    def __init__(self, config: ChatGLMConfig, empty_init=True, device=None):
        super().__init__(config)
        # 4 / 8: the blocks are built with quantized layers, so an int4/int8 checkpoint (e.g. chatglm-6b-int4) loads.
        if config.quantization_bit:
            check_bits(config.quantization_bit, "config.json quantization_bit")
            check_no_quantized_embeddings(config)
        self.num_layers = config.num_layers
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, device=device)
        self.layers = nn.ModuleList([GLMBlock(config, i, device=device) for i in range(config.num_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon, device=device)
        self.pre_seq_len = config.pre_seq_len or 0
        if self.pre_seq_len:
            self.prefix_encoder = PrefixEncoder(config)
            self.prefix_dropout = nn.Dropout(0.1)
        self.gradient_checkpointing = False
        self.post_init()
        self.freeze_all_but_prefix()

    def get_input_embeddings(self):
        return self.word_embeddings

    def quantize(self, bits):
        """Quantize the four linear layers of every block in place to int8 (bits=8) or int4 (bits=4), with one scale
        per output row, and record it in config.quantization_bit (so the saved model reloads quantized). bits=0
        leaves the model as it is. The word embedding stays in full precision. Returns the model."""
        if bits == 0:
            return self
        check_bits(bits)
        current = self.config.quantization_bit or 0
        if current == bits:
            return self
        if current:
            raise ValueError(f"the model is already quantized to {current} bits; load its float weights to quantize to {bits}")
        check_no_quantized_embeddings(self.config)
        quantize_model(self, bits)
        self.config.quantization_bit = bits
        return self

    def set_input_embeddings(self, value):
        self.word_embeddings = value

    def get_prompt(self, batch_size, device, dtype):
        """Prefix keys/values per layer, each [B, heads, pre_seq_len, head_dim]."""
        prefix = torch.arange(self.pre_seq_len, device=device)[None].expand(batch_size, -1)
        past = self.prefix_encoder(prefix).to(dtype)
        past = past.view(batch_size, self.pre_seq_len, self.num_layers * 2, self.num_heads, self.head_dim)
        past = self.prefix_dropout(past).permute(2, 0, 3, 1, 4)  # [2L, B, heads, pre, d]
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
        if input_ids is None:
            raise ValueError("ChatGLM-6B needs input_ids: the <sop> and [gMASK] tokens define its positions and mask")
        hidden_states = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seq = input_ids.shape
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        cached = past_key_values.get_seq_length() if past_key_values is not None else 0

        prefix_kv = [(None, None)] * self.num_layers
        if self.pre_seq_len and cached == 0:
            prefix_kv = self.get_prompt(batch, hidden_states.device, hidden_states.dtype)
            if past_key_values is not None:
                for layer_idx, (key, value) in enumerate(prefix_kv):
                    past_key_values.update(key, value, layer_idx)
                prefix_kv = [(None, None)] * self.num_layers
                cached = self.pre_seq_len
        past_len = max(cached - self.pre_seq_len, 0)

        if position_ids is None:
            if past_len:
                raise ValueError("ChatGLM-6B decoding with a cache needs position_ids (generate() supplies them)")
            if not bool((input_ids == self.config.bos_token_id).any(-1).all()):
                raise ValueError(f"ChatGLM-6B inputs need a <sop> token (id {self.config.bos_token_id}) in every sequence")
            position_ids = self.get_position_ids(input_ids, attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None)
        main = self.layers[0].attention.rotary_emb(position_ids[:, 0], hidden_states.dtype)
        block = self.layers[0].attention.rotary_emb(position_ids[:, 1], hidden_states.dtype)
        mask = build_glm_attention_mask(input_ids, attention_mask, seq, past_len, self.pre_seq_len, self.config.bos_token_id)

        all_hidden_states = () if output_hidden_states else None
        for layer, (prefix_key, prefix_value) in zip(self.layers, prefix_kv):
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states = layer(hidden_states, mask, (main, block), prefix_key, prefix_value, past_key_values=past_key_values)
        hidden_states = self.final_layernorm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)
        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            **{CACHE_FIELD: past_key_values if use_cache else None},
            hidden_states=all_hidden_states,
        )
        return output if return_dict is not False else output.to_tuple()

    def decode_hidden_states(self, input_ids, cache: StaticKVCache):
        """Final hidden states [B, 1, H] of one new token per sequence, at `cache.positions` [B, 2, 1], attending to
        the valid slots of `cache`. The lean body of forward() for the static path: nothing here depends on host values."""
        hidden_states = self.word_embeddings(input_ids)
        rotary_emb = self.layers[0].attention.rotary_emb
        rotary = (rotary_emb(cache.positions[:, 0], hidden_states.dtype), rotary_emb(cache.positions[:, 1], hidden_states.dtype))
        mask = cache.valid[:, None, None, :]
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask, rotary, past_key_values=cache)
        return self.final_layernorm(hidden_states)


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}

    def __init__(self, config: ChatGLMConfig, empty_init=True, device=None):
        super().__init__(config)
        self.max_sequence_length = config.max_sequence_length
        self.transformer = ChatGLMModel(config, device=device)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device=device)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def quantize(self, bits):
        """Weight-only int8 (bits=8) / int4 (bits=4) quantization of the blocks in place, as the official
        `model.quantize(bits)`; embeddings, norms and lm_head stay in full precision. Returns the model."""
        self.transformer.quantize(bits)
        self.config.quantization_bit = self.transformer.config.quantization_bit
        return self

    def set_output_embeddings(self, value):
        self.lm_head = value

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
        loss = causal_lm_loss(hidden_states, self.lm_head, labels, num_items_in_batch) if labels is not None else None
        logits = None
        if labels is None or not self.training:
            if logits_to_keep:
                # made dense: on a strided slice F.linear runs a batched product that reads the whole output
                # layer once per row (5 ms per 25-row batch on an H100, where the product itself takes 0.2)
                hidden_states = hidden_states[:, -logits_to_keep:].contiguous()
            logits = self.lm_head(hidden_states)
        output = CausalLMOutputWithPast(
            loss=loss, logits=logits, **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)}, hidden_states=outputs.hidden_states
        )
        return output if return_dict is not False else output.to_tuple()

    def prepare_inputs_for_generation(
        self, input_ids, past_key_values=None, attention_mask=None, use_cache=True, logits_to_keep=None, **kwargs
    ):
        # Positions always come from the full sequence (they depend on where <sop> and [gMASK] are).
        position_ids = self.get_position_ids(input_ids, attention_mask)
        cached = past_key_values.get_seq_length() if past_key_values is not None else 0
        seen = max(cached - self.transformer.pre_seq_len, 0)
        inputs = {
            "input_ids": input_ids[:, seen:],
            "position_ids": position_ids[..., seen:],
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
            "use_cache": use_cache,
        }
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        return inputs

    # Copied from remote_scripts/chatglm2-6b/modeling_chatglm.py:ChatGLMForConditionalGeneration.logits_processors
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

    # Copied from remote_scripts/chatglm2-6b/modeling_chatglm.py:ChatGLMForConditionalGeneration.stream_generate
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
        """2-D positions [B, 2, 1] of the next token from those of the current one, in place: after <sop> (block
        position > 0) the block position moves on and the main one stays; a sequence without <sop> is all context,
        where the main position moves on."""
        after_sop = positions[:, 1:] > 0
        return positions.add_(torch.cat((~after_sop, after_sop), dim=1).long())

    def static_cache(self, batch, needed, dtype, device):
        """The model's StaticKVCache for this batch size, with room for `needed` slots (reused when it fits)."""
        capacity = static_cache_capacity(needed, self.max_sequence_length + self.transformer.pre_seq_len)
        cache = self.__dict__.get("_static_kv")
        if cache is None or not cache.fits(batch, capacity, dtype, device):
            self.__dict__["_static_kv"] = None  # free the old buffers before allocating new ones
            transformer = self.transformer
            cache = StaticKVCache(
                transformer.num_layers, batch, transformer.num_heads, capacity, transformer.head_dim, (2, 1), dtype, device
            )
            self.__dict__["_static_kv"] = cache
        return cache

    def static_decode_step(self, input_ids, cache):
        """fp32 logits [B, vocab] of one new token per sequence from the static cache, which it advances (the
        step utils.decode_engine runs eagerly or replays)."""
        cache.valid.index_fill_(1, cache.slot, True)
        hidden_states = self.transformer.decode_hidden_states(input_ids, cache)
        logits = self.lm_head(hidden_states[:, -1]).float()
        cache.slot.add_(1)
        self.advance_positions(cache.positions)
        return logits

    @staticmethod
    def build_prompt(query, history=None):
        """Official v1 format: the bare query without history; with history, [Round i] blocks numbered from 0."""
        if not history:
            return query
        prompt = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
        return prompt + f"[Round {len(history)}]\n问：{query}\n答："

    @staticmethod
    def process_response(response):
        """The tokenizer folds full-width punctuation to ASCII (NFKC); put it back next to Chinese characters."""
        response = response.strip().replace("[[训练时间]]", "2023年")
        for ascii_mark, full_width in ((",", "，"), ("!", "！"), (":", "："), (";", "；"), ("?", "？")):
            mark = re.escape(ascii_mark)
            response = re.sub(r"([\u4e00-\u9fff])" + mark, r"\g<1>" + full_width, response)
            response = re.sub(mark + r"([\u4e00-\u9fff])", full_width + r"\g<1>", response)
        return response

    def stream_chat(
        self,
        tokenizer,
        query: str,
        history=None,
        max_length: int = 2048,
        do_sample=True,
        top_p=0.7,
        temperature=0.95,
        logits_processor=None,
        **kwargs,
    ):
        """Yields (response so far, history + this turn) as tokens arrive."""
        history = list(history or [])
        inputs = tokenizer([self.build_prompt(query, history)], return_tensors="pt")
        input_ids = inputs["input_ids"].to(self.device)
        gen_kwargs = dict(max_length=max_length, do_sample=do_sample, top_p=top_p, temperature=temperature)
        gen_kwargs.update(kwargs)
        for new_ids, _ in self.stream_generate(input_ids, torch.ones_like(input_ids), eos_token_id=[tokenizer.eos_token_id], logits_processor=logits_processor, **gen_kwargs):
            response = tokenizer.decode(new_ids[0].tolist())
            # Hold back a half-decoded multi-byte character.
            if response and response[-1] != "\ufffd":
                response = self.process_response(response)
                yield response, history + [(query, response)]

    def chat(self, tokenizer, query: str, history=None, max_length: int = 2048, num_beams=1, do_sample=True, top_p=0.7, temperature=0.95, logits_processor=None, **kwargs):
        if num_beams != 1:
            raise ValueError("chat() decodes one beam; use generate() for beam search")
        result = ("", list(history or []) + [(query, "")])
        for result in self.stream_chat(tokenizer, query, history, max_length=max_length, do_sample=do_sample, top_p=top_p, temperature=temperature, logits_processor=logits_processor, **kwargs):
            pass
        return result
