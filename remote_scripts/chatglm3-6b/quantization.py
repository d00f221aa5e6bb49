"""Weight-only int8 / int4 quantization of the ChatGLM blocks (written for this toolkit).

The scheme and the checkpoint layout are those of the official `-int8` / `-int4` checkpoints:
- symmetric, one scale per output row: s_r = max_c |W_rc| / (2^(bits-1) - 1), i.e. /127 for int8 and /7 for int4;
- q_rc = round(W_rc / s_r) with round-half-to-even, kept in [-127, 127] (int8) or [-7, 7] (int4);
- int4 values are packed two per byte along the row: byte j of a row holds column 2j in its HIGH nibble and column
  2j+1 in its low nibble, giving an int8 tensor [out, in/2];
- state dict of a quantized layer: `weight` (int8 [out, in] or [out, in/2]), `weight_scale` ([out], the model's
  float dtype) and the unchanged full-precision `bias`, if the layer has one.

With few rows (decoding) on CUDA, the forward pass streams the stored int8 / packed int4 weight through the Triton
kernel of kernels.py, which applies the row scales to its fp32 sums. Otherwise (prefill, training, CPU) it dequantizes
the whole weight (w = s_r * q) in the dtype of the activations and does an ordinary matmul. cpm_kernels is not needed.
The quantized weights are not trainable; gradients still flow to the inputs (and biases), with the weight dequantized
again in the backward pass instead of kept (DequantizingLinear), so that P-tuning or LoRA on an int4 base stays small.

`quantize_model` quantizes the four linear layers of every block (query_key_value, the attention output dense,
dense_h_to_4h, dense_4h_to_h). ChatGLM2/3's `model.quantize(bits)` also stores the output layer in int8
(OUTPUT_LAYER_BITS, whatever the blocks' bits) and says so in config.json's output_layer_quantization_bit, so that the
official checkpoints (a float output layer, no such key) load as they are. ChatGLM-6B's output layer is its word
embeddings and stays in full precision, as do every model's embeddings and norms.
"""
import re

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import dequantize_kernel_applies, small_batch_kernel_applies, small_batch_linear, triton_dequantize

SUPPORTED_BITS = (4, 8)
# The output layer (65024 x 4096) is read once a token: in bf16 it was 8 % of an int8 model's bytes and 0.13 ms of its
# 2.9 ms token on an H100. 8 bits keep it precise where the blocks take 4, as llama.cpp's 4-bit files keep theirs at 8.
OUTPUT_LAYER_BITS = 8
QUANTIZED_LAYERS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
# Module paths of those layers: transformer.layers.N.attention.* (v1), transformer.encoder.layers.N.self_attention.*
# (v2/v3), and *.mlp.* in both.
BLOCK_LINEAR_PATTERN = re.compile(
    r"(^|\.)layers\.\d+\.(attention\.(query_key_value|dense)|self_attention\.(query_key_value|dense)"
    r"|mlp\.(dense_h_to_4h|dense_4h_to_h))$"
)


def check_bits(bits, source="quantization bits"):
    """4 or 8 as an int; anything else is a ValueError that says what is allowed."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(
            f"{source}={bits!r} is not supported: use 8 (int8) or 4 (int4, two values per byte); 0 means no quantization"
        )
    return bits


def max_level(bits):
    """Largest quantized magnitude: 127 for 8 bits, 7 for 4 bits."""
    return 2 ** (check_bits(bits) - 1) - 1


def pack_int4(values):
    """int values in [-8, 7], [out, in] with `in` even -> int8 [out, in/2]; column 2j in the high nibble."""
    if values.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even number of columns, got {values.shape[-1]}")
    nibbles = values.to(torch.int16) & 0xF
    packed = (nibbles[..., 0::2] << 4) | nibbles[..., 1::2]  # 0..255
    return torch.where(packed > 127, packed - 256, packed).to(torch.int8)


def unpack_int4(packed):
    """Inverse of pack_int4: int8 [out, in/2] -> int8 [out, in] with values in [-8, 7] (both nibbles sign-extended)."""
    wide = packed.to(torch.int16)  # sign-extends the byte, so an arithmetic shift sign-extends the high nibble
    high = wide >> 4
    low = ((wide & 0xF) ^ 8) - 8
    return torch.stack((high, low), dim=-1).flatten(-2).to(torch.int8)


def quantize_weight(weight, bits, scale_dtype=None):
    """A float weight [out, in] -> (q, scale).

    q: int8 [out, in] for 8 bits, packed int8 [out, in/2] for 4 bits. scale: [out] in `scale_dtype` (default: the
    weight's dtype). The scales and the rounding are computed in fp32 whatever the weight's dtype; a row of zeros gets
    scale 0 and q = 0."""
    bits = check_bits(bits)
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(weight.shape)}")
    if bits == 4 and weight.shape[1] % 2:
        raise ValueError(f"int4 needs an even number of input features to pack two per byte, got {weight.shape[1]}")
    levels = max_level(bits)
    exact = weight.detach().float()
    scale = exact.abs().amax(dim=1) / levels
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(exact / divisor[:, None]).clamp_(-levels, levels).to(torch.int8)  # torch.round: half to even
    if bits == 4:
        q = pack_int4(q)
    return q, scale.to(scale_dtype or weight.dtype)


def dequantize_weight(q, scale, bits, dtype=None):
    """w = scale_row * q as a float [out, in] tensor in `dtype` (default: the scale's dtype). On CUDA one Triton pass
    (kernels.triton_dequantize, the same bits): training and prefill on a quantized base dequantize every layer in
    forward and again in backward, and unpacking int4 in torch writes and reads int16 temporaries several times."""
    bits = check_bits(bits)
    dtype = dtype or scale.dtype
    if dequantize_kernel_applies(q, dtype):
        return triton_dequantize(q, scale.to(dtype), bits)
    if bits == 4:
        q = unpack_int4(q)
    return q.to(dtype) * scale.to(dtype)[:, None]


class DequantizingLinear(torch.autograd.Function):
    """F.linear(x, dequantized weight, bias) that keeps only the stored int8 / int4 weight for the backward pass and
    dequantizes it again there: the gradient with respect to x (P-tuning or LoRA on a quantized base) then costs no
    full-precision copy of every layer's weight held from the forward to the backward pass."""

    @staticmethod
    def forward(ctx, x, weight, scale, bits, bias):
        ctx.save_for_backward(weight, scale)
        ctx.bits, ctx.has_bias = bits, bias is not None
        return F.linear(x, dequantize_weight(weight, scale, bits, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        weight, scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize_weight(weight, scale, ctx.bits, grad_out.dtype)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, None, None, None, grad_bias


class QuantizedLinear(nn.Module):
    """A linear layer with an int8 (or packed int4) weight and per-row scales; y = x (s * q)^T + b.

    `weight` and `weight_scale` are parameters without gradient (so the state dict has the official keys);
    `bias` stays in full precision. A fresh layer holds zeros (scale 1): fill it from a checkpoint or use
    `from_linear`."""

    def __init__(self, in_features, out_features, bits, bias=True, device=None, dtype=None):
        super().__init__()
        self.bits = check_bits(bits)
        if self.bits == 4 and in_features % 2:
            raise ValueError(f"int4 needs an even number of input features to pack two per byte, got {in_features}")
        self.in_features = in_features
        self.out_features = out_features
        dtype = dtype or torch.get_default_dtype()
        stored_in = in_features if self.bits == 8 else in_features // 2
        self.weight = nn.Parameter(torch.zeros(out_features, stored_in, dtype=torch.int8, device=device), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, dtype=dtype, device=device), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear, bits):
        """The quantized form of an nn.Linear (same device; scale and bias keep the linear layer's dtype)."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, bits, bias=False, device="meta", dtype=weight.dtype)
        q, scale = quantize_weight(weight, bits)
        layer.weight = nn.Parameter(q, requires_grad=False)
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)
        layer.bias = linear.bias
        return layer

    def dequantized_weight(self, dtype=None):
        return dequantize_weight(self.weight, self.weight_scale, self.bits, dtype or self.weight_scale.dtype)

    def forward(self, x):
        if small_batch_kernel_applies(x, self.in_features, self.bits):  # decoding on CUDA: stream the int8/int4 weight as it is
            return small_batch_linear(x, self.weight, self.bias, scale=self.weight_scale, bits=self.bits)
        if torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            return DequantizingLinear.apply(x, self.weight, self.weight_scale, self.bits, self.bias)
        weight = self.dequantized_weight(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, bias={self.bias is not None}"


def block_linear_names(model):
    """Names of the modules that quantization replaces (the four linear layers of every block)."""
    return [name for name, _ in model.named_modules() if BLOCK_LINEAR_PATTERN.search(name)]


@torch.no_grad()
def quantize_model(model, bits):
    """Replace the four linear layers of every block of `model` by QuantizedLinear, in place; returns the model.

    The layers must be plain nn.Linear: merge LoRA adapters first (PeftModel.merge_and_unload), and an already
    quantized model cannot be quantized again (load its float weights instead)."""
    bits = check_bits(bits)
    names = block_linear_names(model)
    if not names:
        raise ValueError(f"{type(model).__name__}: no ChatGLM block layers ({', '.join(QUANTIZED_LAYERS)}) found to quantize")
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, QuantizedLinear):
            raise ValueError(f"{name} is already quantized ({module.bits} bits); start from the float weights")
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"{name} is a {type(module).__name__}, not an nn.Linear: merge adapters into the weights "
                "(merge_and_unload) before quantizing"
            )
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantizedLinear.from_linear(parent.get_submodule(child), bits))
    return model


def quantized_layers(model):
    """(name, QuantizedLinear) pairs of a model."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, QuantizedLinear)]
