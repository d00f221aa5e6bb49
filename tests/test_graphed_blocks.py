"""ChatGLM2/3's blocks trained as CUDA graphs (utils/graphed_blocks.py): where they are refused and why, the pieces
that run on any device (kept dropout masks, the flat buffers, the segment room), and on CUDA the graphs' loss and
LoRA gradients against the eager checkpointed blocks: plain, padded and packed rows, a new shape, gradient
accumulation, LoRA dropout, a forward run twice before its backward."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from utils.dataset import PaddingCollator
from utils.graphed_blocks import (Buffers, Capture, block_graphs_of, graph_blocks, graph_length_multiple, refusal,
                                  segment_room)
from utils.lora_dropout import DroppedInputLinear, DropoutLinear, pack_bits, unpack_bits
from utils.model_loading import load_model_and_tokenizer
from utils.training_methods import add_lora

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all"}


def lora_model(model_dir, device="cpu", dtype="fp32", lora=LORA, **overrides):
    model, _ = load_model_and_tokenizer(model_dir, dtype=dtype, device=device, **overrides)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    return add_lora(model, lora) if lora else model


@pytest.mark.parametrize("case, reason", [
    ("chatglm-6b", "not ChatGLM2/3"),
    ("ptuning", "P-tuning"),
    ("hidden_dropout", "hidden_dropout"),
    ("peft_dropout", "a dropout module in the blocks"),
    ("frozen", "nothing in the blocks trains"),
    ("spread", "the blocks are spread over 2 devices"),
    ("cpu", "not on a CUDA device"),
])
def test_refused_where_graphs_would_change_the_training(tiny_model_dirs, case, reason):
    version = "chatglm-6b" if case == "chatglm-6b" else "chatglm3-6b"
    overrides = {"ptuning": {"pre_seq_len": 4}, "hidden_dropout": {"hidden_dropout": 0.1}}.get(case, {})
    if case == "peft_dropout":  # peft's own LoRA dropout, an nn.Dropout in each adapted layer
        model, _ = load_model_and_tokenizer(tiny_model_dirs[version], dtype="fp32", device="cpu")
        model = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.1, target_modules=["query_key_value"]))
    else:
        model = lora_model(tiny_model_dirs[version], lora=None if case in ("frozen", "ptuning") else LORA, **overrides)
        if case == "frozen":
            model.requires_grad_(False)
        if case == "spread":  # as device_map="auto" splits a model over GPUs; "meta" stands for the second one
            model.get_base_model().transformer.encoder.layers[-1].to("meta")
    messages = []
    assert reason in refusal(model)
    assert graph_blocks(model, log=messages.append) is False
    assert messages == [f"graph_blocks: off ({refusal(model)})"]
    assert graph_length_multiple(model) == 1


def test_a_kept_mask_is_drawn_once_and_reused_with_autograds_gradients():
    """DropoutLinear on a kept mask: the drawing pass fills it (keeping about 1 - p), the recompute reads it as it is,
    and DroppedInputLinear's gradients through it are autograd's through the same mask."""
    torch.manual_seed(0)
    layer = DropoutLinear(torch.nn.Linear(32, 8, bias=False), 0.25)
    x = torch.randn(4, 64, 32)
    layer.kept_mask, layer.draw_kept_mask = torch.zeros(x.numel() // 8, dtype=torch.uint8), True
    first = layer(x)
    packed = layer.kept_mask.clone()
    kept = unpack_bits(packed, x.shape)
    assert 0.7 < kept.float().mean() < 0.8
    repacked = torch.zeros_like(packed)
    pack_bits(kept, repacked)
    assert torch.equal(repacked, packed)  # one bit a value, and back
    layer.draw_kept_mask = False
    torch.testing.assert_close(layer(x), first, atol=0, rtol=0)
    assert torch.equal(layer.kept_mask, packed)

    x, weight = x.requires_grad_(), layer.weight
    out = DroppedInputLinear.apply(x, weight, 0.25, None, kept)
    grad = torch.randn_like(out)
    dx, dw = torch.autograd.grad(out, [x, weight], grad)
    expected = F.linear(x * kept / 0.75, weight)
    ex, ew = torch.autograd.grad(expected, [x, weight], grad)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(dx, ex)
    torch.testing.assert_close(dw, ew)


def test_buffers_hand_out_views_of_one_flat_tensor_and_grow_for_a_larger_shape():
    buffers = Buffers("cpu")
    (a, b), grown = buffers.views("checkpoints", torch.float32, [(2, 3), (2, 3)])
    assert grown and a.shape == (2, 3) and b.data_ptr() == a.data_ptr() + 6 * 4
    (c,), grown = buffers.views("checkpoints", torch.float32, [(1, 4)])
    assert not grown and c.data_ptr() == a.data_ptr()
    (d,), grown = buffers.views("checkpoints", torch.float32, [(4, 4)])
    assert grown and d.numel() == 16
    (e,), grown = buffers.views("checkpoints", torch.bfloat16, [(4, 4)])  # a dtype of its own
    assert grown and e.dtype == torch.bfloat16


def test_loading_a_calls_inputs_leaves_the_static_tensors_out_of_autograd(tiny_model_dirs):
    """The embedding output requires grad (enable_input_require_grads): copied under autograd, it would hang every
    step's input and its gradient onto the checkpoint buffer (a leak of two hidden-sized tensors a step)."""
    model = lora_model(tiny_model_dirs["chatglm2-6b"])
    layers = model.get_base_model().transformer.encoder.layers
    hidden = torch.randn(2, 8, model.config.hidden_size, requires_grad=True)
    rotary = (torch.randn(2, 8, 1, 4), torch.randn(2, 8, 1, 4))
    made = Capture(SimpleNamespace(layers=layers, buffers=Buffers("cpu")), hidden, None, rotary, (False, torch.bfloat16))
    made.load(hidden, None, rotary)
    assert torch.equal(made.checkpoints[0], hidden.detach())
    assert not made.checkpoints[0].requires_grad and made.checkpoints[0].grad_fn is None


def test_segment_room_is_a_power_of_two_that_holds_the_bounds():
    class Segments:
        def __init__(self, count):
            self.cu_seqlens = torch.zeros(count + 1, dtype=torch.int32)

    assert segment_room(Segments(3)) == 16
    assert segment_room(Segments(15)) == 16
    assert segment_room(Segments(16)) == 32
    assert segment_room(Segments(40)) == 64


def test_the_collator_pads_to_the_multiple_it_is_given():
    rows = [{"input_ids": [5] * 33, "labels": [1] * 33}, {"input_ids": [6] * 3, "labels": [2] * 3}]
    batch = PaddingCollator(pad_token_id=0, multiple=32)(rows)
    assert batch["input_ids"].shape == (2, 64)
    assert batch["attention_mask"][0].tolist() == [1] * 33 + [0] * 31
    assert batch["labels"][1].tolist() == [2] * 3 + [-100] * 61
    assert PaddingCollator(pad_token_id=0)(rows)["input_ids"].shape == (2, 33)


# ---- CUDA: the graphs against the eager checkpointed blocks ----

def batch_of(kind, vocab, device, batch=2, seq=64):
    generator = torch.Generator().manual_seed({"plain": 1, "padded": 2, "packed": 3}[kind] + seq)
    input_ids = torch.randint(100, vocab, (batch, seq), generator=generator)
    mask = torch.ones_like(input_ids)
    if kind == "padded":
        mask[1, seq - seq // 3:] = 0
    elif kind == "packed":  # segment ids 1, 2, 3 and padding at the end of the second row
        mask[0, seq // 4:] = 2
        mask[1, seq // 2:] = 2
        mask[1, seq - seq // 8:] = 0
    labels = torch.where(mask > 0, input_ids, -100)
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def lora_grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def step(model, batch, zero=True):
    if zero:
        model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    return loss.detach()


def set_graphs(model, graphs):
    model.get_base_model().transformer.block_graphs = graphs


def graphed_cuda_model(model_dir, lora=LORA):
    """(a bf16 LoRA model on CUDA whose blocks train as graphs, its BlockGraphs)"""
    model = lora_model(model_dir, device="cuda", dtype="bf16", lora=lora)
    with torch.no_grad():  # LoRA B starts at zero: make the adapters matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model.train()
    assert graph_blocks(model, log=lambda message: None)
    return model, block_graphs_of(model)


@pytest.fixture(scope="module")
def cuda_model(tiny_model_dirs):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return graphed_cuda_model(tiny_model_dirs["chatglm2-6b"])


def assert_same_step(model, graphs, batch):
    set_graphs(model, None)
    eager_loss = step(model, batch)
    eager = lora_grads(model)
    set_graphs(model, graphs)
    graph_loss = step(model, batch)
    graphed = lora_grads(model)
    torch.testing.assert_close(graph_loss, eager_loss, rtol=1e-3, atol=1e-3)
    assert graphed.keys() == eager.keys() and len(eager) > 0
    for name in eager:
        torch.testing.assert_close(graphed[name], eager[name], rtol=2e-2, atol=1e-4, msg=name)
    return graph_loss


@needs_cuda
@pytest.mark.parametrize("kind", ["plain", "padded", "packed"])
def test_graphs_give_the_eager_loss_and_gradients(cuda_model, kind):
    model, graphs = cuda_model
    vocab = model.config.padded_vocab_size
    assert_same_step(model, graphs, batch_of(kind, vocab, "cuda"))
    before = len(graphs.captures)
    assert_same_step(model, graphs, batch_of(kind, vocab, "cuda"))  # a replay of the capture
    assert len(graphs.captures) == before
    assert_same_step(model, graphs, batch_of(kind, vocab, "cuda", batch=3, seq=96))  # a larger shape: grows
    assert_same_step(model, graphs, batch_of(kind, vocab, "cuda", seq=32))  # a smaller one: views of the same


@needs_cuda
def test_graph_gradients_accumulate_over_steps_and_evaluation_runs_eagerly(cuda_model):
    model, graphs = cuda_model
    vocab = model.config.padded_vocab_size
    first, second = batch_of("plain", vocab, "cuda"), batch_of("padded", vocab, "cuda")
    set_graphs(model, None)
    step(model, first)
    step(model, second, zero=False)
    eager = lora_grads(model)
    set_graphs(model, graphs)
    step(model, first)
    step(model, second, zero=False)
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(grad, eager[name], rtol=2e-2, atol=1e-4, msg=name)
    model.eval()
    try:
        with torch.no_grad():
            generation = graphs.generation
            model(**first)
            assert graphs.generation == generation  # not through the graphs
    finally:
        model.train()


@needs_cuda
def test_steps_on_the_graphs_hold_no_more_memory_than_the_first(cuda_model):
    model, graphs = cuda_model
    batch = batch_of("padded", model.config.padded_vocab_size, "cuda")
    allocated = []
    for _ in range(4):
        step(model, batch)
        torch.cuda.synchronize()
        allocated.append(torch.cuda.memory_allocated())
    assert allocated[1:] == allocated[:1] * 3, allocated


@needs_cuda
def test_a_second_forward_before_the_backward_is_refused(cuda_model):
    model, graphs = cuda_model
    batch = batch_of("plain", model.config.padded_vocab_size, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        first = model(**batch).loss
        model(**batch)
    with pytest.raises(RuntimeError, match="a forward ran again before this one's backward"):
        first.backward()


@needs_cuda
def test_lora_dropout_in_the_graphs_is_the_eager_dropout_on_the_same_masks(tiny_model_dirs):
    model, graphs = graphed_cuda_model(tiny_model_dirs["chatglm3-6b"], lora={**LORA, "dropout": 0.2})
    batch = batch_of("packed", model.config.padded_vocab_size, "cuda")
    graph_loss = step(model, batch)
    graphed = lora_grads(model)
    (made,) = graphs.captures.values()
    masks = [pair for layer_masks in made.kept_masks for pair in layer_masks]
    assert len(masks) == 2 * 4
    assert all(0.7 < unpack_bits(kept, (kept.numel() * 8,)).float().mean() < 0.9 for _, kept in masks)
    drawn = [kept.clone() for _, kept in masks]
    again = step(model, batch)  # a replay draws new masks
    assert not torch.equal(again, graph_loss) and not torch.equal(masks[0][1], drawn[0])
    for (module, kept), old in zip(masks, drawn):  # the eager blocks on the first step's masks
        kept.copy_(old)
    set_graphs(model, None)
    try:
        for module, kept in masks:
            module.kept_mask, module.draw_kept_mask = kept, False
        eager_loss = step(model, batch)
    finally:
        for module, _ in masks:
            module.kept_mask = None
    torch.testing.assert_close(graph_loss, eager_loss, rtol=1e-3, atol=1e-3)
    for name, grad in lora_grads(model).items():
        torch.testing.assert_close(graphed[name], grad, rtol=2e-2, atol=1e-4, msg=name)
