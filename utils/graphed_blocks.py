"""ChatGLM2/3's checkpointed blocks replayed as two CUDA graphs per batch shape, so that a training step no longer waits
for the host to launch each block's kernels (QLoRA's ~3,300 small kernels a step cost the host more time than the GPU).

Per shape (batch, length, mask, autocast) there are two graphs:
- forward: every block without gradients, each block's input kept (the checkpoints gradient checkpointing keeps);
- backward: from the last block down, each block run again from its checkpoint with gradients, then
  torch.autograd.grad for its input and its trainable parameters; the parameters' gradients are added into fixed
  tensors that are bound to `.grad`, so that they accumulate as autograd's would (gradient accumulation included).

Everything a graph reads or writes outside itself (checkpoints, gradients, rotary tables, masks, LoRA dropout masks)
lives in flat tensors sized for the largest shape seen, of which every capture takes views: a new shape costs a capture
(about two eager steps), not memory. Nothing allocated inside a graph outlives its replay, so all graphs share one
memory pool and replay in any order. LoRA's dropout draws its masks from the device generator inside the forward
graph (new masks at each replay), keeps them one bit a value, and the backward graph reads the same masks.

`graph_blocks(model, log)` installs it where it applies, and otherwise logs why not."""
import copy
from collections import OrderedDict
from contextlib import contextmanager

import torch
from torch import nn

from utils.lora_dropout import DropoutLinear

# Captures kept (least recently used dropped); each holds two graphs, the memory they share is one pool.
MAX_CAPTURES = 32
# Where graphs run, batches are padded to a multiple of this many tokens, so that few shapes are captured.
LENGTH_MULTIPLE = 32


def transformer_of(model):
    """The ChatGLM-style `transformer` of a model or of the peft model around it, or None."""
    return getattr(model.get_base_model() if hasattr(model, "get_base_model") else model, "transformer", None)


def refusal(model):
    """Why the blocks of `model` cannot run as graphs, or None where they can."""
    transformer = transformer_of(model)
    if transformer is None or not hasattr(transformer, "block_graphs"):
        return "not ChatGLM2/3 with this toolkit's model code (remote_scripts)"
    config = transformer.config
    if transformer.pre_seq_len:
        return "P-tuning's prefix"
    if config.hidden_dropout or config.attention_dropout:
        return "hidden_dropout / attention_dropout is set (its masks would be drawn again differently in backward)"
    layers = transformer.encoder.layers
    if any(isinstance(m, nn.Dropout) and m.p > 0 for m in layers.modules()):
        return "a dropout module in the blocks (LoRA's dropout on a device where it is not redrawn)"
    if any(isinstance(m, DropoutLinear) and m.p > 0 and m.in_features % 8 for m in layers.modules()):
        return "LoRA dropout on a layer whose input width is not a multiple of 8 (its mask is kept one bit a value)"
    if not any(p.requires_grad for p in layers.parameters()):
        return "nothing in the blocks trains"
    devices = {p.device for p in layers.parameters()}
    if len(devices) > 1:
        return f"the blocks are spread over {len(devices)} devices (one graph runs on one)"
    if not next(layers.parameters()).is_cuda:
        return "the blocks are not on a CUDA device"
    return None


def graph_blocks(model, log=print):
    """Run the blocks of a ChatGLM2/3 model that trains with gradient checkpointing as CUDA graphs (see the module's
    docstring). Returns whether it did; where not, logs why."""
    reason = refusal(model)
    if reason is not None:
        log(f"graph_blocks: off ({reason})")
        return False
    transformer = transformer_of(model)
    transformer.block_graphs = BlockGraphs(transformer.encoder.layers)
    log("graph_blocks: the blocks train as CUDA graphs (one capture per batch shape)")
    return True


def block_graphs_of(model):
    """The BlockGraphs a model (or a peft model around it) trains its blocks with, or None."""
    return getattr(transformer_of(model), "block_graphs", None)


def graph_length_multiple(model):
    """The multiple that training batches are padded to: LENGTH_MULTIPLE where the blocks run as graphs, else 1."""
    return LENGTH_MULTIPLE if block_graphs_of(model) is not None else 1


class Buffers:
    """Flat tensors per (role, dtype) on one device, of which captures take views. `views` grows a flat tensor that is
    too small (a new one: whatever held views of the old must be dropped; it returns grown=True)."""

    def __init__(self, device):
        self.device, self.flat = device, {}

    def views(self, role, dtype, shapes):
        sizes = [torch.Size(shape).numel() for shape in shapes]
        flat = self.flat.get((role, dtype))
        grown = flat is None or flat.numel() < sum(sizes)
        if grown:
            self.flat[(role, dtype)] = flat = torch.empty(sum(sizes), dtype=dtype, device=self.device)
        views, start = [], 0
        for shape, size in zip(shapes, sizes):
            views.append(flat[start:start + size].view(shape))
            start += size
        return views, grown


class Capture:
    """The static inputs and outputs of one shape's two graphs, and the graphs."""

    def __init__(self, graphs, hidden, mask, rotary, autocast):
        batch, seq = hidden.shape[:2]
        layers = graphs.layers
        self.autocast = autocast
        self.forward_graph = self.backward_graph = None
        grown = False

        def take(role, dtype, shapes):
            nonlocal grown
            views, role_grown = graphs.buffers.views(role, dtype, shapes)
            grown |= role_grown
            return views

        # checkpoints[i]: block i's input; checkpoints[-1]: the last block's output
        self.checkpoints = take("checkpoints", hidden.dtype, [hidden.shape] * (len(layers) + 1))
        self.grad_output, self.grad_input = take("gradients", hidden.dtype, [hidden.shape] * 2)
        self.rotary = tuple(take(f"rotary{i}", t.dtype, [t.shape])[0] for i, t in enumerate(rotary))
        if mask is None:
            self.mask = None
        elif isinstance(mask, torch.Tensor):
            self.mask = take("mask", mask.dtype, [mask.shape])[0]
        else:  # PackedSegments: its segment bounds padded with empty segments to a fixed room
            self.mask = copy.copy(mask)
            bounds = take("segments", mask.cu_seqlens.dtype, [(segment_room(mask),)])[0]
            self.mask.cu_seqlens = self.mask.cu_seqlens_k = bounds
            self.mask.max_len = self.mask.max_len_k = seq
        dropouts = [[m for m in layer.modules() if isinstance(m, DropoutLinear) and m.p > 0] for layer in layers]
        shapes = [(batch * seq * m.in_features // 8,) for modules in dropouts for m in modules]  # one bit a value
        masks = iter(take("dropout_masks", torch.uint8, shapes) if shapes else [])
        self.kept_masks = [[(m, next(masks)) for m in modules] for modules in dropouts]
        self.grown = grown

    @torch.no_grad()  # a copy under autograd would chain every step's inputs onto the buffers, and keep them
    def load(self, hidden, mask, rotary):
        """Copy one call's inputs into the static tensors."""
        self.checkpoints[0].copy_(hidden)
        for static, given in zip(self.rotary, rotary):
            static.copy_(given)
        if isinstance(self.mask, torch.Tensor):
            self.mask.copy_(mask)
        elif self.mask is not None:
            count = mask.cu_seqlens.numel()
            self.mask.cu_seqlens[:count].copy_(mask.cu_seqlens)
            self.mask.cu_seqlens[count:].fill_(mask.batch * mask.seq)  # empty segments at the end

    @contextmanager
    def running(self, layers, draw_masks):
        """The blocks as a graph runs them: under the call's autocast (without its weight cache, whose casts would
        outlive the capture), without the MLPs' own recompute (the graphs recompute whole blocks; a checkpoint inside
        a capture cannot save the generator's state), LoRA's dropout on the kept masks. Blocks are called through
        forward(), past the checkpointing of GradientCheckpointingLayer.__call__."""
        recomputing = [m for m in layers.modules() if getattr(m, "recompute_activation", False)]
        kept = [pair for masks in self.kept_masks for pair in masks]
        enabled, dtype = self.autocast
        try:
            for module in recomputing:
                module.recompute_activation = False
            for module, mask in kept:
                module.kept_mask, module.draw_kept_mask = mask, draw_masks
            with torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
                yield
        finally:
            for module in recomputing:
                module.recompute_activation = True
            for module, _ in kept:
                module.kept_mask = None

    def run_forward(self, layers):
        with self.running(layers, draw_masks=True), torch.no_grad():
            for i, layer in enumerate(layers):
                self.checkpoints[i + 1].copy_(layer.forward(self.checkpoints[i], self.mask, self.rotary))

    def run_backward(self, layers, params, grads):
        """grads: per block, the tensors its parameters' gradients are added to (None: a warm-up run adds nothing)."""
        grad = self.grad_output
        with self.running(layers, draw_masks=False), torch.enable_grad():
            for i in reversed(range(len(layers))):
                block_input = self.checkpoints[i].detach().requires_grad_()
                output = layers[i].forward(block_input, self.mask, self.rotary)
                grad, *param_grads = torch.autograd.grad(output, [block_input, *params[i]], grad, allow_unused=True)
                if grads is not None:
                    for total, part in zip(grads[i], param_grads):
                        if part is not None:  # a parameter this block's forward does not reach
                            total.add_(part)
        self.grad_input.copy_(grad)


def segment_room(mask):
    """Entries of the static segment bounds: the next power of two that holds the call's, at least 16."""
    return max(16, 1 << (mask.cu_seqlens.numel() - 1).bit_length())


def capture(warm_up, work, pool):
    """A CUDA graph of `work()`, after one eager `warm_up()` on a side stream (Triton's compiles, cuBLAS's
    workspaces, the allocator's first blocks)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm_up()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: the data loader's pinning thread may call the driver while a graph is captured
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        work()
    torch.cuda.empty_cache()  # the warm-up's blocks, cached for a side stream that never runs again
    return graph


class BlockGraphs:
    """The callable ChatGLMModel.forward hands its blocks' work to (`transformer.block_graphs`)."""

    def __init__(self, layers):
        self.layers = layers
        device = next(layers.parameters()).device
        self.buffers = Buffers(device)
        # A leaf that makes autograd call the backward where neither the hidden states nor anything else passed in
        # needs a gradient (the parameters' gradients are written by the graph, outside autograd).
        self.anchor = torch.zeros((), device=device, requires_grad=True)
        self.anchor_step = torch.zeros((), device=device)
        self.pool = torch.cuda.graph_pool_handle()
        # A graph that holds the pool for as long as this object lives: a pool whose graphs are all gone (captures
        # dropped for a larger shape) but which still holds memory cannot take new captures (the allocator asserts).
        self.pool_holder = capture(lambda: None, lambda: self.anchor_step.add_(1), self.pool)
        self.captures = OrderedDict()
        self.generation = 0
        self.params = self.grads = None
        self.bind_parameters()

    def pool_bytes(self):
        """Memory the graphs hold in their pool: reserved once, it never shows in torch.cuda.memory_allocated()."""
        return sum(segment["total_size"] for segment in torch.cuda.memory_snapshot()
                   if tuple(segment.get("segment_pool_id", ())) == tuple(self.pool))

    def bind_parameters(self):
        """The trainable parameters of each block and one flat gradient tensor per dtype holding theirs."""
        self.params = [[p for p in layer.parameters() if p.requires_grad] for layer in self.layers]
        flat = [p for block in self.params for p in block]
        self.param_ids = [id(p) for p in flat]
        by_dtype = {}
        for p in flat:
            by_dtype.setdefault(p.dtype, []).append(p)
        views = {}
        for dtype, group in by_dtype.items():
            total = torch.zeros(sum(p.numel() for p in group), dtype=dtype, device=self.buffers.device)
            start = 0
            for p in group:
                views[id(p)] = total[start:start + p.numel()].view(p.shape)
                start += p.numel()
        self.grads = [[views[id(p)] for p in block] for block in self.params]
        self.captures.clear()  # the graphs add into the old gradient tensors

    def bind_grads(self):
        """Point every trainable parameter's .grad at its fixed tensor: zeroed where .grad was None (after the
        optimizer's zero_grad), kept where it already is (gradient accumulation), copied from any other tensor.
        Returns whether the trainable parameters changed since the last call (the flat gradients are then new)."""
        changed = [id(p) for block in self.layers for p in block.parameters() if p.requires_grad] != self.param_ids
        if changed:
            self.bind_parameters()
        for block, grads in zip(self.params, self.grads):
            for param, fixed in zip(block, grads):
                current = param.grad
                if current is None:
                    fixed.zero_()
                elif current.data_ptr() == fixed.data_ptr():
                    continue
                else:
                    fixed.copy_(current)
                param.grad = fixed
        return changed

    def key(self, hidden, mask, rotary, autocast):
        if mask is None:
            mask_key = None
        elif isinstance(mask, torch.Tensor):
            mask_key = (tuple(mask.shape), mask.dtype)
        else:
            if mask.key_index is not None or mask.past_len:
                raise ValueError("graphed blocks train without a cache: the packed segments have a past")
            mask_key = ("segments", segment_room(mask))
        return tuple(hidden.shape), hidden.dtype, tuple((tuple(t.shape), t.dtype) for t in rotary), mask_key, autocast

    def capture_for(self, hidden, mask, rotary):
        autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        key = self.key(hidden, mask, rotary, autocast)
        found = self.captures.get(key)
        if found is not None:
            self.captures.move_to_end(key)
            return found
        made = Capture(self, hidden, mask, rotary, autocast)
        if made.grown:  # the flat tensors moved: every older capture reads the old ones
            self.captures.clear()
        self.captures[key] = made
        while len(self.captures) > MAX_CAPTURES:
            self.captures.popitem(last=False)
        return made

    def __call__(self, hidden, mask, rotary):
        made = self.capture_for(hidden, mask, rotary)
        made.load(hidden, mask, rotary)
        if made.forward_graph is None:
            run = lambda: made.run_forward(self.layers)  # noqa: E731
            made.forward_graph = capture(run, run, self.pool)
        made.forward_graph.replay()
        self.generation += 1
        return GraphedBlocks.apply(self, made, self.generation, hidden, self.anchor)

    def backward(self, made, generation, grad):
        if generation != self.generation:
            raise RuntimeError(
                "graphed blocks: a forward ran again before this one's backward, and its checkpoints replaced this "
                "one's; call backward before the next training forward, or train with --graph_blocks=false")
        made.grad_output.copy_(grad)
        if self.bind_grads():  # other parameters train now: the graph added into the old ones' gradients
            made.backward_graph = None
        if made.backward_graph is None:
            made.backward_graph = capture(lambda: made.run_backward(self.layers, self.params, None),
                                          lambda: made.run_backward(self.layers, self.params, self.grads), self.pool)
        made.backward_graph.replay()
        return made.grad_input.clone()


class GraphedBlocks(torch.autograd.Function):
    """The blocks as one autograd node: forward replays the forward graph (already done by the caller), backward the
    backward graph."""

    @staticmethod
    def forward(ctx, graphs, made, generation, hidden, anchor):
        ctx.graphs, ctx.made, ctx.generation = graphs, made, generation
        return made.checkpoints[-1].clone()

    @staticmethod
    def backward(ctx, grad):
        grad_input = ctx.graphs.backward(ctx.made, ctx.generation, grad)
        return None, None, None, grad_input if ctx.needs_input_grad[3] else None, None
