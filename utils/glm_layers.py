"""GLM-4's RMSNorms and SwiGLU MLPs (transformers' Glm and Glm4 classes) on our Triton kernels: one kernel each way
instead of a chain of small ones, and for backward only what it needs.

GLM-4 keeps ChatGLM2's block, so the kernels are ChatGLM2/3's (`remote_scripts/chatglm2-6b/kernels.py`). Where they
apply (CUDA, a float dtype, the norm's weight in the input's dtype, not inside torch.compile, which fuses the eager
formula itself), the layers below run them; elsewhere they run transformers' formula, bit for bit. What that changes:
- training: each norm keeps its bf16 input and one fp32 per row for backward, not an fp32 copy of the input; the MLP
  keeps its gate_up output only, not also the SiLU's output (GLM-4-9B: 43 KiB less per token and block, of 178);
- decoding (utils/glm_decode.py's step, captured as a CUDA graph): fewer, larger kernels per block;
- with recompute_activation set, an MLP keeps its input only and makes gate_up's output again in backward (the
  training option --recompute_mlp_blocks), for a step that must fit in less memory.
The modules keep the originals' parameters under the same names, so state dicts, adapters and exports are unchanged.
"""
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

FUSED_MODEL_TYPES = ("glm", "glm4")


class FusedRMSNorm(nn.Module):
    """A GLM RMSNorm (`weight`, `variance_epsilon`) through triton_rms_norm."""

    def __init__(self, norm, kernels):
        super().__init__()
        self.weight, self.variance_epsilon = norm.weight, norm.variance_epsilon
        # the functions, not their module: a model holding a module object can be neither copied nor pickled
        self.kernel_applies, self.rms_norm = kernels.elementwise_kernels_apply, kernels.triton_rms_norm

    def forward(self, hidden_states):
        if (not torch.compiler.is_compiling() and self.weight.dtype == hidden_states.dtype
                and self.kernel_applies(hidden_states)):
            return self.rms_norm(hidden_states, self.weight, self.variance_epsilon)
        input_dtype = hidden_states.dtype  # transformers' GlmRMSNorm / Glm4RMSNorm
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class FusedSwiGLUMLP(nn.Module):
    """A GLM MLP (`gate_up_proj`, SiLU, `down_proj`) with silu(gate) * up through triton_swiglu. With
    `recompute_activation` set (as our model files' MLPs: utils.training_methods.recompute_mlps), gate_up_proj and the
    SiLU run again in backward: the block keeps the MLP's input, not gate_up's output, its largest saved activation."""

    def __init__(self, mlp, kernels):
        super().__init__()
        self.gate_up_proj, self.down_proj, self.activation_fn = mlp.gate_up_proj, mlp.down_proj, mlp.activation_fn
        self.kernel_applies, self.swiglu = kernels.elementwise_kernels_apply, kernels.triton_swiglu
        self.recompute_activation = False

    def forward(self, hidden_states):
        if self.recompute_activation and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            # the region ends before down_proj, whose backward needs no input when its weight is frozen
            return self.down_proj(checkpoint(self.activated, hidden_states, use_reentrant=False))
        return self.down_proj(self.activated(hidden_states))

    def activated(self, hidden_states):
        return self.swiglu_of(self.gate_up_proj(hidden_states))

    def swiglu_of(self, gate_and_up):
        if not torch.compiler.is_compiling() and self.kernel_applies(gate_and_up):
            return self.swiglu(gate_and_up)
        gate, up = gate_and_up.chunk(2, dim=-1)
        return up * self.activation_fn(gate)


def fuse_norms_and_mlps(model, kernels):
    """Replaces, in place, every RMSNorm and SiLU MLP of a GLM-4 model (model_type glm or glm4, also under a PEFT
    wrapper) by the fused layers above, which call `kernels` (remote_scripts/chatglm2-6b/kernels.py as
    utils.model_loading.remote_module imports it). Other models are left as they are. Returns how many modules were
    replaced."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in FUSED_MODEL_TYPES:
        return 0
    silu = getattr(config, "hidden_act", None) in ("silu", "swish")
    replaced = {}
    for name, module in model.named_modules():
        if isinstance(module, (FusedRMSNorm, FusedSwiGLUMLP)):
            continue
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            replaced[name] = FusedRMSNorm(module, kernels)
        elif silu and hasattr(module, "gate_up_proj") and hasattr(module, "down_proj"):
            replaced[name] = FusedSwiGLUMLP(module, kernels)
    for name, module in replaced.items():
        model.set_submodule(name, module)
    return len(replaced)

