"""Which attention kernels transformers' own models (GLM-4) may take when we run them on batches of varying shape.

With a dense mask (padded prompts, the static cache's mask, evaluation's and training's padded batches), torch 2.11
tries cuDNN's attention first, and cuDNN builds an execution plan for every new (batch, length): 40 ms to 1.8 s the
first time it sees a shape, where flash attention or the memory-efficient kernel cost 0.3-0.7 ms (docs/benchmarks.md,
"Padded prefills through flash attention's segments"). Prompts of new lengths and length-bucketed batches meet new
shapes all the time, so these calls leave cuDNN out. (ChatGLM's model files reach flash attention's variable-length
kernel themselves.) The fixed-shape decode step, captured once per cache size, keeps torch's choice.

torch keeps the enabled backends in process-wide flags, and `sdpa_kernel` restores the flags it found on exit; a lock
keeps two threads (an answer, the compiler's or the server's) from restoring each other's state out of order.
"""
import contextlib
import threading

from torch.nn.attention import SDPBackend, sdpa_kernel

NO_PER_SHAPE_PLANS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_FLAGS = threading.RLock()


@contextlib.contextmanager
def without_per_shape_plans(active=True):
    """SDPA inside this block takes flash, memory-efficient or math attention, never cuDNN's (with active=False:
    torch's choice, as outside)."""
    if not active:
        yield
        return
    with _FLAGS, sdpa_kernel(NO_PER_SHAPE_PLANS):
        yield
