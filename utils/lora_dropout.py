"""LoRA's dropout drawn again in backward instead of kept: a LoRA layer keeps its input and a seed for backward, not a
dropped copy of the input and a mask of its own.

peft computes lora_B(lora_A(dropout(x))) per adapted layer, so each layer keeps a dropped copy of x for lora_A's
gradient and dropout keeps a mask, even where several layers read the same x (GLM-4's q, k and v: three copies and
three masks of one input). `drop_inside_lora_a` moves the dropout into lora_A: on CUDA (REDRAW_DEVICES) a
DropoutLinear draws its mask from a seed, keeps x itself (one storage for all the layers that read it) and draws the
mask again in backward. GLM-4-9B with LoRA on q, k and v keeps 28 KiB less per token and block (4.4 GiB at 8 x 512).

The masks are drawn as torch's dropout draws them (keep with probability 1 - p, kept values scaled by 1 / (1 - p)
in fp32), from a generator seeded by the default CPU generator: transformers.set_seed, the scripts' resumes and
gradient checkpointing's recompute (which restores the CPU generator) replay them. The weight stays lora_A's Parameter
under its name, so adapters save, load and merge as before."""
import torch
import torch.nn.functional as F
from torch import nn


# Where the masks are drawn again rather than kept. On a GPU a draw is one memory-bound kernel; a CPU draws value by
# value, and a second draw per step made the README's CPU job ~15 % slower, where memory is rarely the limit. Elsewhere
# DropoutLinear applies torch's dropout, as peft does.
REDRAW_DEVICES = ("cuda",)


def keep_mask(x, p, seed):
    """The bool mask of dropout p that the generator seeded with `seed` draws on x's device, in x's logical order
    whatever its strides (so backward's contiguous gradient meets the same mask)."""
    generator = torch.Generator(device=x.device)
    generator.manual_seed(seed)
    return torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - p, generator=generator)


def masked(values, keep, p):
    """values * keep / (1 - p) in one kernel, the scale applied in fp32 as torch's dropout applies it."""
    return torch.ops.aten.native_dropout_backward(values, keep, 1 / (1 - p))


def dropped(x, p, seed):
    """x with dropout p applied by the mask of keep_mask(x, p, seed)."""
    return masked(x, keep_mask(x, p, seed), p)


def product_dtype(x, weight):
    """The dtype lora_A's product runs in: autocast's where it is on for x's device, else the weight's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return weight.dtype


def pack_bits(keep, packed):
    """Write the bool mask `keep` (its size a multiple of 8) into `packed` (uint8, one bit a value)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=keep.device)
    packed.copy_((keep.reshape(-1, 8).to(torch.uint8) << shifts).sum(-1, dtype=torch.uint8))


def unpack_bits(packed, shape):
    """The bool mask of `shape` that pack_bits wrote into `packed`."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed[:, None] >> shifts) & 1).bool().reshape(shape)


class DroppedInputLinear(torch.autograd.Function):
    """dropout(x) @ weight.T, keeping x and the seed for backward, not the dropped x and its mask."""

    @staticmethod
    def forward(ctx, x, weight, p, seed, keep=None):
        """keep: a mask given instead of the seed's (a graphed block's: utils/graphed_blocks.py)."""
        dtype = product_dtype(x, weight)
        ctx.save_for_backward(x, weight)
        ctx.p, ctx.seed, ctx.dtype, ctx.keep = p, seed, dtype, keep
        keep = keep_mask(x, p, seed) if keep is None else keep
        return F.linear(masked(x, keep, p).to(dtype), weight.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.to(ctx.dtype)
        keep = keep_mask(x, ctx.p, ctx.seed) if ctx.keep is None else ctx.keep
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:  # d dropout(x) / dx is the same mask and scale
            grad_x = masked(grad @ weight.to(ctx.dtype), keep, ctx.p).to(x.dtype)
        if ctx.needs_input_grad[1]:
            inputs = masked(x, keep, ctx.p).to(ctx.dtype).reshape(-1, x.shape[-1])
            grad_weight = (grad.reshape(-1, grad.shape[-1]).t() @ inputs).to(weight.dtype)
        return grad_x, grad_weight, None, None, None


class DropoutLinear(nn.Linear):
    """A bias-free lora_A (nn.Linear) with the adapter's dropout inside it (DroppedInputLinear while training)."""

    def __init__(self, lora_a: nn.Linear, p: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.p = lora_a.in_features, lora_a.out_features, p
        self.weight = lora_a.weight
        self.register_parameter("bias", None)
        # Set while a graphed block runs (utils/graphed_blocks.py): the mask to apply, one bit a value (pack_bits),
        # drawn into it first from the device's generator where draw_kept_mask (the forward graph), read as it is
        # otherwise (the recompute).
        self.kept_mask, self.draw_kept_mask = None, False

    def forward(self, x):
        if not self.training or self.p == 0:
            return super().forward(x)
        if self.kept_mask is not None:
            if self.draw_kept_mask:
                keep = torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1 - self.p)
                pack_bits(keep, self.kept_mask)
            else:
                keep = unpack_bits(self.kept_mask, x.shape)
            return DroppedInputLinear.apply(x, self.weight, self.p, None, keep)
        if x.device.type not in REDRAW_DEVICES:
            return super().forward(F.dropout(x, self.p, training=True))
        seed = int(torch.randint(0, 2**62, ()))  # from the CPU generator: no wait for the device
        return DroppedInputLinear.apply(x, self.weight, self.p, seed)

    def extra_repr(self):
        return f"{super().extra_repr()}, dropout={self.p}"


def drop_inside_lora_a(model):
    """Replaces, in place, every (nn.Dropout, nn.Linear lora_A) pair of a peft LoRA model's plain adapters (no
    variant such as DoRA) by (nn.Identity, DropoutLinear). Returns how many pairs were replaced."""
    replaced = 0
    for module in model.modules():
        dropouts, lora_a, variants = (getattr(module, name, None) for name in ("lora_dropout", "lora_A", "lora_variant"))
        if not isinstance(dropouts, nn.ModuleDict) or not isinstance(lora_a, nn.ModuleDict):
            continue
        for adapter, dropout in list(dropouts.items()):
            linear = lora_a[adapter] if adapter in lora_a else None
            if (type(dropout) is nn.Dropout and dropout.p > 0 and type(linear) is nn.Linear and linear.bias is None
                    and adapter not in (variants or {})):
                lora_a[adapter] = DropoutLinear(linear, dropout.p)
                dropouts[adapter] = nn.Identity()
                replaced += 1
    return replaced
