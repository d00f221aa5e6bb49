"""GLM-4's decode step (transformers' GlmForCausalLM, Glm4ForCausalLM) on ChatGLM2's static KV cache and kernels.

GLM-4 keeps ChatGLM2's block: grouped queries, the interleaved rotary on the first half of each head, RMSNorms, a
SwiGLU MLP. So its step runs what ChatGLM2's runs: one [q | k | v] product, each residual add fused into the norm
after it, and the rotary, the cache write and attention in one launch (kernels.triton_decode_attention), where
transformers' step runs a chain of small kernels and attends over the whole static cache. No torch.compile is
involved, so the first answer of a chat decodes at full speed at once (utils.decode_engine captures the step as a CUDA
graph). q, k and v run as one product where they are plain linear layers on CUDA (refresh_fused_projections); the
other projections, the MLP, the norms' weights and the output layer are the model's own modules, PEFT's adapter layers
and quantized layers included (so are q, k and v there). Where the kernels do not apply (CPU, fp32), the same step
runs eagerly: rotary, cache write, grouped SDPA over the valid slots.
"""
import logging

import torch
import torch.nn.functional as F

from utils.glm_layers import FusedSwiGLUMLP
from utils.remote_code import remote_module

MODEL_TYPES = ("glm", "glm4")
# The fused q/k/v copy is made only where the device keeps this much free beside it: on a card that the weights nearly
# fill, GLM-4 decodes on the three products rather than running out of memory later (the KV cache, a longer answer).
FUSED_COPY_HEADROOM = 2 * 2**30

logger = logging.getLogger(__name__)


def chatglm2_modeling():
    """ChatGLM2's model file: its StaticKVCache, rotary and fused decode attention serve GLM-4 unchanged."""
    return remote_module("chatglm2-6b", "modeling_chatglm")


def chatglm2_kernels():
    return remote_module("chatglm2-6b", "kernels")


def decoder_of(model):
    """The GlmForCausalLM / Glm4ForCausalLM under a PEFT wrapper, or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def serves(model):
    """Whether this step can decode `model`: a GLM-4 of transformers' classes with SiLU MLPs and grouped queries."""
    config = getattr(decoder_of(model), "config", None)
    return (getattr(config, "model_type", None) in MODEL_TYPES and getattr(config, "hidden_act", None) in ("silu", "swish")
            and config.num_attention_heads % config.num_key_value_heads == 0)


def static_cache(model, batch, needed, dtype, device):
    """The model's StaticKVCache for this batch size with room for `needed` slots, kept on the model and reused while
    it fits (the buffers' addresses are what a captured step reads)."""
    modeling, config = chatglm2_modeling(), decoder_of(model).config
    capacity = modeling.static_cache_capacity(needed, config.max_position_embeddings)
    cache = model.__dict__.get("_glm_static_kv")
    if cache is None or not cache.fits(batch, capacity, dtype, device):
        model.__dict__["_glm_static_kv"] = None  # free the old buffers before allocating new ones
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        cache = modeling.StaticKVCache(config.num_hidden_layers, batch, config.num_key_value_heads, capacity, head_dim,
                                       (1,), dtype, device)
        model.__dict__["_glm_static_kv"] = cache
    return cache


def refresh_fused_projections(model):
    """Each layer's q, k and v weights and biases copied into one [q | k | v] product, kept on the model and refreshed
    at each generation's start (the weights may have changed since: training, merging), where the kernels fuse (CUDA)
    and the three are plain linear layers (no adapter, no quantization). At batch 1 the three separate products cost
    as much as two of the fused one (k's and v's 2 MB weights are read at a fraction of the bandwidth): GLM-4-9B on an
    H100, 30.3 against 16.0 us per layer. The price is a second copy of those weights (1.5 GB on GLM-4-9B), made only
    with FUSED_COPY_HEADROOM to spare (else, once said, this model keeps the three products)."""
    layers = decoder_of(model).model.layers
    projections = [(layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj) for layer in layers]
    weight = projections[0][0].weight
    if not chatglm2_modeling().fuses(weight) or any(type(linear) is not torch.nn.Linear for three in projections
                                                     for linear in three):
        model.__dict__.pop("_glm_fused_qkv", None)
        return
    fused = model.__dict__.get("_glm_fused_qkv")
    if fused is False:  # no room for the copy
        return
    if fused is None or fused[0][0].dtype != weight.dtype or fused[0][0].device != weight.device:
        model.__dict__.pop("_glm_fused_qkv", None)  # the old copy's memory counts as free
        size = sum(linear.weight.numel() for three in projections for linear in three) * weight.element_size()
        free = device_bytes_free(weight.device)
        if free is not None and free < size + FUSED_COPY_HEADROOM:
            logger.warning("GLM-4 decodes q, k and v as three products (%.2f GiB free on %s: one fused product would "
                           "take %.2f GiB of it)", free / 2**30, weight.device, size / 2**30)
            model.__dict__["_glm_fused_qkv"] = False
            return
        with torch.inference_mode(False):  # ordinary tensors, written again under any grad mode
            fused = [(torch.empty(sum(linear.out_features for linear in three), weight.shape[1], dtype=weight.dtype,
                                  device=weight.device),
                      None if three[0].bias is None else torch.empty(sum(linear.out_features for linear in three),
                                                                     dtype=weight.dtype, device=weight.device))
                     for three in projections]
        model.__dict__["_glm_fused_qkv"] = fused
    with torch.no_grad():
        for (fused_weight, fused_bias), three in zip(fused, projections):
            torch.cat([linear.weight for linear in three], out=fused_weight)
            if fused_bias is not None:
                torch.cat([linear.bias for linear in three], out=fused_bias)


def device_bytes_free(device):
    """Bytes the caching allocator can still hand out on `device`: the driver's free memory and what the allocator
    holds unused; None off CUDA (no limit known)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def add_norm(modeling, kernels, hidden_states, update, norm):
    """(hidden_states + update, norm of the sum): one kernel where the element-wise kernels apply; update None: the
    norm alone."""
    if update is None:
        return hidden_states, norm(hidden_states)
    if (modeling.fuses(hidden_states) and kernels.elementwise_kernels_apply(hidden_states)
            and norm.weight.dtype == hidden_states.dtype):
        return kernels.triton_add_rms_norm(hidden_states, update, norm.weight, norm.variance_epsilon)
    hidden_states = hidden_states + update
    return hidden_states, norm(hidden_states)


def attention(modeling, attn, normed, rotary, cache, layer_idx, fused_qkv):
    """One token's self-attention [B, 1, heads * head_dim] before the output projection, its key and value written
    into the cache. fused_qkv: (weight, bias) of the layer's [q | k | v] product, or None (the three modules)."""
    heads, kv_heads = attn.config.num_attention_heads, attn.config.num_key_value_heads
    if fused_qkv is not None:
        qkv = chatglm2_kernels().decode_linear(normed, *fused_qkv)
    else:
        qkv = torch.cat((project(attn.q_proj, normed), project(attn.k_proj, normed), project(attn.v_proj, normed)),
                        dim=-1)
    context = modeling.fused_decode_attention(qkv, rotary, cache, layer_idx, heads, kv_heads, attn.head_dim)
    if context is not None:
        return context
    batch, head_dim = qkv.shape[0], attn.head_dim
    qk = modeling.apply_rotary(qkv, *rotary, heads + kv_heads, head_dim).transpose(1, 2)
    value = qkv[..., (heads + kv_heads) * head_dim:].unflatten(-1, (kv_heads, head_dim)).transpose(1, 2)
    query, key = qk.split([heads, kv_heads], dim=1)
    keys, values = cache.update(key, value, layer_idx)
    # query head n reads key/value group n // (heads / kv_heads): each group's heads become its queries
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, head_dim)
    context = F.scaled_dot_product_attention(grouped, keys, values, attn_mask=cache.valid[:, None, None, :])
    return context.reshape(batch, 1, heads * head_dim)


def project(linear, x):
    """linear(x) through the kernels' one-row product where it applies (kernels.decode_product)."""
    return chatglm2_kernels().decode_product(linear, x)


def mlp(layer_mlp, x):
    """A block's MLP on one token: FusedSwiGLUMLP's products through the kernels' one-row product, SwiGLU in the
    first one's launch (kernels.decode_swiglu_product); the module itself otherwise."""
    if not isinstance(layer_mlp, FusedSwiGLUMLP):
        return layer_mlp(x)
    activated = chatglm2_kernels().decode_swiglu_product(layer_mlp.gate_up_proj, x, layer_mlp.swiglu_of)
    return project(layer_mlp.down_proj, activated)


def static_decode_step(model, input_ids, cache):
    """fp32 logits [B, vocab] of one new token per sequence (input_ids [B, 1]) at `cache.positions`, attending to the
    cache's valid slots and itself; advances the cache. Nothing here depends on host values: a CUDA graph replays it.
    The fused q/k/v products are those of the last refresh_fused_projections."""
    modeling, kernels, decoder = chatglm2_modeling(), chatglm2_kernels(), decoder_of(model)
    body = decoder.model
    fused_qkv = model.__dict__.get("_glm_fused_qkv") or [None] * len(body.layers)
    cache.valid.index_fill_(1, cache.slot, True)
    hidden_states = body.embed_tokens(input_ids)
    cos, sin = body.rotary_emb(hidden_states, cache.positions)  # [B, 1, rotary dims], each angle twice
    pairs = cos.shape[-1] // 2
    rotary = (cos[..., None, :pairs], sin[..., None, :pairs])  # ChatGLM2's layout: [B, 1, 1, pairs]
    update = None  # the residual add of each sublayer runs fused into the norm after it
    for layer_idx, layer in enumerate(body.layers):
        hidden_states, normed = add_norm(modeling, kernels, hidden_states, update, layer.input_layernorm)
        context = attention(modeling, layer.self_attn, normed, rotary, cache, layer_idx, fused_qkv[layer_idx])
        update = project(layer.self_attn.o_proj, context)
        if hasattr(layer, "post_self_attn_layernorm"):  # GLM-4-0414 (glm4): sublayer outputs are normed too
            update = layer.post_self_attn_layernorm(update)
        hidden_states, normed = add_norm(modeling, kernels, hidden_states, update, layer.post_attention_layernorm)
        update = mlp(layer.mlp, normed)
        if hasattr(layer, "post_mlp_layernorm"):
            update = layer.post_mlp_layernorm(update)
    hidden_states = add_norm(modeling, kernels, hidden_states, update, body.norm)[1]
    logits = decoder.lm_head(hidden_states[:, -1]).float()
    cache.slot.add_(1)
    cache.positions.add_(1)
    return logits
