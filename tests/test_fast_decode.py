"""The static-cache decode path of stream_generate (what chat, predict and inference_test use on CUDA) against the plain
path, on tiny models with peaked random weights. On CPU the static step runs eagerly ("static"); on a CUDA machine the
same checks also run the step captured as a CUDA graph ("graph") and its torch.compile'd version ("compiled")."""
import sys

import pytest
import torch

from conftest import VERSIONS
from utils.decode_engine import stream_generate
from utils.model_loading import load_model_and_tokenizer, remote_module

PROMPTS = ["你好", "ChatGLM-6B是清华大学开源的模型。请介绍一下自己", "Hello\nworld\t!"]
FAST_MODES = ["static"] + (["graph", "compiled"] if torch.cuda.is_available() else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class RecordScores:
    """Logits processor that keeps a copy of the scores of every step and changes nothing."""

    def __init__(self):
        self.scores = []

    def __call__(self, input_ids, scores):
        self.scores.append(scores.clone())
        return scores


class ForceTokens:
    """Logits processor that makes each step pick the given token ([B, steps]): two decoders compared along one path
    (near ties of two rounding orders would otherwise send them down different ones)."""

    def __init__(self, tokens):
        self.tokens, self.step = tokens, 0

    def __call__(self, input_ids, scores):
        # 1 at the token, 0 elsewhere: finite (ChatGLM's guard replaces scores with an infinity by a fixed token)
        forced = torch.zeros_like(scores)
        forced.scatter_(1, self.tokens[:, self.step:self.step + 1].to(scores.device), 1.0)
        self.step += 1
        return forced


def decode(model, batch, mode, force=None, **kwargs):
    """(new ids, the scores of every step, the cache) of stream_generate (utils.decode_engine's, which our model files
    bind as their own); `force`: the tokens each step takes (its scores are recorded before)."""
    recorder = RecordScores()
    *_, (new_ids, cache) = stream_generate(
        model, batch["input_ids"], batch["attention_mask"], max_new_tokens=24, eos_token_id=[-1], decode=mode,
        logits_processor=[recorder] + ([ForceTokens(force)] if force is not None else []), **kwargs,
    )
    return new_ids, torch.stack(recorder.scores), cache


def assert_within_rounding(scores, expected, ids, scale=5e-3):
    """Scores of two rounding orders along one path: the largest difference within `scale` of the largest score (fp16
    differences are relative to the scores' scale, not element by element: near-zero scores differ by as much as the
    largest), and each picked token the expected scores' pick or within that difference of it."""
    scores, expected = scores.float(), expected.float()
    tolerance = scale * expected.abs().max()
    assert (scores - expected).abs().max() <= tolerance, ((scores - expected).abs().max(), tolerance)
    picked = expected.gather(-1, ids.T[..., None].to(expected.device))[..., 0]  # [steps, B]
    assert (expected.amax(-1) - picked).max() <= 2 * tolerance


@pytest.fixture(scope="module")
def models(trainable_models):
    return {v: load_model_and_tokenizer(trainable_models[v], dtype="fp32", device=DEVICE) for v in VERSIONS}


@pytest.mark.parametrize("mode", FAST_MODES)
@pytest.mark.parametrize("version", VERSIONS)
def test_fast_path_gives_the_plain_path_tokens_and_scores(version, mode, models):
    model, tokenizer = models[version]
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt").to(DEVICE)
    assert (batch["attention_mask"][:, 0] == 0).any(), "left padding must be exercised"
    # The repetition penalty keeps random tiny models (v1 above all) from repeating one token, so that every step
    # feeds a different token back.
    plain_ids, plain_scores, plain_cache = decode(model, batch, "plain", do_sample=False, repetition_penalty=1.5)
    fast_ids, fast_scores, fast_cache = decode(model, batch, mode, do_sample=False, repetition_penalty=1.5)
    assert fast_ids.tolist() == plain_ids.tolist()
    assert len(set(plain_ids[0].tolist())) > 3, "a degenerate answer would not test much"
    torch.testing.assert_close(fast_scores, plain_scores, atol=1e-4, rtol=1e-4)
    assert fast_cache.get_seq_length() == plain_cache.get_seq_length()
    # Sampling: the same random draws give the same tokens.
    torch.manual_seed(3)
    sampled_plain = decode(model, batch, "plain", do_sample=True, top_p=0.9, temperature=0.8)[0]
    torch.manual_seed(3)
    sampled_fast = decode(model, batch, mode, do_sample=True, top_p=0.9, temperature=0.8)[0]
    assert sampled_fast.tolist() == sampled_plain.tolist()


@pytest.mark.parametrize("version", VERSIONS)
def test_fast_path_with_a_p_tuning_prefix(version, trainable_models):
    model, tokenizer = load_model_and_tokenizer(trainable_models[version], dtype="fp32", device=DEVICE, pre_seq_len=4)
    with torch.no_grad():
        for param in model.transformer.prefix_encoder.parameters():
            param.normal_(std=1.0)
    model.eval()
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt").to(DEVICE)
    plain_ids, plain_scores, _ = decode(model, batch, "plain", do_sample=False)
    for mode in FAST_MODES:
        fast_ids, fast_scores, cache = decode(model, batch, mode, do_sample=False)
        assert fast_ids.tolist() == plain_ids.tolist()
        torch.testing.assert_close(fast_scores, plain_scores, atol=1e-4, rtol=1e-4)
        assert cache.get_seq_length() == 4 + batch["input_ids"].shape[1] + 23


@pytest.mark.parametrize("version", ["chatglm2-6b", "chatglm3-6b"])
def test_chat_continues_from_a_static_cache_and_refuses_a_stale_one(version, models):
    model, tokenizer = models[version]
    kwargs = dict(do_sample=False, max_new_tokens=6, return_past_key_values=True)

    def turn(query, history, cache, mode):
        *_, (response, history, cache) = model.stream_chat(tokenizer, query, history, past_key_values=cache, decode=mode, **kwargs)
        return response, history, cache

    plain_first = turn("你好", [], None, "plain")
    plain_second = turn("再见", plain_first[1], plain_first[2], "plain")
    fast_first = turn("你好", [], None, "static")
    assert type(fast_first[2]).__name__ == "StaticCacheRef"
    fast_second = turn("再见", fast_first[1], fast_first[2], "static")
    assert fast_first[:2] == plain_first[:2] and fast_second[:2] == plain_second[:2]
    assert fast_second[2].get_seq_length() == plain_second[2].get_seq_length()
    # fast_first's cache shares buffers with the model's later generations: continuing it now must fail loudly.
    with pytest.raises(RuntimeError, match="overwritten by a later generation"):
        turn("再见", fast_first[1], fast_first[2], "static")


def test_cache_sizes_are_few_powers_of_two_within_the_limit():
    capacity = remote_module("chatglm2-6b", "modeling_chatglm").static_cache_capacity
    assert [capacity(n, 32768) for n in (1, 256, 257, 1000, 5000)] == [256, 256, 512, 1024, 8192]
    assert capacity(300, 400) == 400 and capacity(500, 400) == 500  # over the model's limit: exactly what is needed


def test_compiled_decoding_needs_cuda_and_unknown_modes_are_refused(models):
    model, tokenizer = models["chatglm2-6b"]
    ids = tokenizer(["你好"], return_tensors="pt")["input_ids"]
    with pytest.raises(ValueError, match="one of auto, plain, static, graph, compiled"):
        next(model.stream_generate(ids, max_new_tokens=2, decode="fast"))
    if not torch.cuda.is_available():
        for mode in ("graph", "compiled"):
            with pytest.raises(ValueError, match="needs the model on a CUDA device"):
                next(model.stream_generate(ids, max_new_tokens=2, decode=mode))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_a_captured_decode_step_follows_adapter_switches_and_folding(trainable_models):
    """A CUDA graph replays the kernels and tensors it recorded: switching the adapter off, or folding it into the
    weights, must capture again rather than replay the old step."""
    from utils.adapters import fold_adapter
    from utils.training_methods import add_lora

    model, tokenizer = load_model_and_tokenizer(trainable_models["chatglm2-6b"], dtype="fp32", device="cuda")
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt").to("cuda")
    base_ids = decode(model, batch, "plain", do_sample=False)[0]
    adapted = add_lora(model, {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "query_key_value"}).eval()
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    adapter_ids = decode(adapted, batch, "plain", do_sample=False)[0]
    assert adapter_ids.tolist() != base_ids.tolist(), "the adapter must change the answer for this test to mean anything"
    assert decode(adapted, batch, "graph", do_sample=False)[0].tolist() == adapter_ids.tolist()
    with adapted.disable_adapter():
        assert decode(adapted, batch, "graph", do_sample=False)[0].tolist() == base_ids.tolist()
    assert decode(adapted, batch, "graph", do_sample=False)[0].tolist() == adapter_ids.tolist()
    folded = fold_adapter(adapted)
    assert decode(folded, batch, "graph", do_sample=False)[0].tolist() == adapter_ids.tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused element-wise kernels run on CUDA only")
@pytest.mark.parametrize("version", VERSIONS)
def test_fused_elementwise_kernels_give_the_eager_loss_and_gradients(version, trainable_models):
    """ChatGLM2/3: our Triton kernels with their backward passes; ChatGLM-6B: its functions through torch.compile."""
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_model_and_tokenizer(trainable_models[version], dtype="fp32", device="cuda")
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["query_key_value", "dense_h_to_4h"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)  # non-zero B, so that every LoRA weight gets a gradient
    # The class was loaded from the model folder's own copy of modeling_chatglm.py: switch that module's flag.
    modeling = __import__(type(model.base_model.model).__module__, fromlist=["FUSE_ELEMENTWISE"])
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt").to("cuda")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    results = {}
    for fused in (False, True):
        modeling.FUSE_ELEMENTWISE = fused
        model.zero_grad()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        results[fused] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    modeling.FUSE_ELEMENTWISE = True
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-5, rtol=1e-5)
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused decode kernels run on CUDA only")
@pytest.mark.parametrize("version", ["chatglm2-6b", "chatglm3-6b"])
def test_fused_decode_step_on_cuda_gives_the_eager_attentions_scores(version, trainable_models):
    """fp16 on CUDA, the step captured as a CUDA graph: the fused attention (rotary, cache write, attention in one
    kernel) and the adds inside the norms give the scores of the same step with the eager attention, within fp16
    rounding, along the fused step's tokens. (On the CPU, tests/test_kernels.py runs the same kernels in Triton's
    interpreter.)"""
    model, tokenizer = load_model_and_tokenizer(trainable_models[version], dtype="fp16", device="cuda")
    modeling = sys.modules[type(model).__module__]
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt").to("cuda")
    fused_ids, fused_scores, _ = decode(model, batch, "graph", do_sample=False, repetition_penalty=1.5)
    applies = modeling.decode_attention_applies
    modeling.decode_attention_applies = lambda *args: False
    model.__dict__.pop("_decode_graph", None)  # the captured step would replay the fused kernel
    try:
        _, eager_scores, _ = decode(model, batch, "graph", force=fused_ids, do_sample=False, repetition_penalty=1.5)
    finally:
        modeling.decode_attention_applies = applies
        model.__dict__.pop("_decode_graph", None)
    assert len(set(fused_ids[0].tolist())) > 3
    assert_within_rounding(fused_scores, eager_scores, fused_ids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the int8/int4 decode kernels run on CUDA only")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("version", ["chatglm-6b", "chatglm2-6b"])
def test_quantized_decoding_kernels_match_the_dequantizing_path(version, bits, trainable_models):
    from transformers.cache_utils import DynamicCache

    model, tokenizer = load_model_and_tokenizer(trainable_models[version], dtype="bf16", device="cuda")
    model.quantize(bits)
    quantization = __import__(type(model).__module__.rsplit(".", 1)[0] + ".quantization", fromlist=["small_batch_linear"])
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt").to("cuda")
    kernel, applies = quantization.small_batch_linear, quantization.small_batch_kernel_applies
    calls = []

    @torch.inference_mode()  # as in decoding: the kernel has no backward, so inputs that need grad never reach it
    def second_step_logits(use_kernel):
        """Logits of one decode step (3 rows: the kernel's case) after the same prefill (many rows: dequantized)."""
        quantization.small_batch_linear = lambda *args, **kwargs: calls.append(1) or kernel(*args, **kwargs)
        if not use_kernel:
            quantization.small_batch_kernel_applies = lambda *args: False
        try:
            cache = DynamicCache(config=model.config)
            first = model(**batch, past_key_values=cache, use_cache=True).logits[:, -1]
            sequence = torch.cat((batch["input_ids"], first.argmax(-1, keepdim=True)), dim=1)
            mask = torch.cat((batch["attention_mask"], torch.ones_like(sequence[:, -1:])), dim=1)
            inputs = model.prepare_inputs_for_generation(sequence, past_key_values=cache, attention_mask=mask)
            return model(**inputs).logits[:, -1].float()
        finally:
            quantization.small_batch_linear, quantization.small_batch_kernel_applies = kernel, applies

    dequantized = second_step_logits(use_kernel=False)
    assert not calls
    with_kernel = second_step_logits(use_kernel=True)
    # The kernel ran for the decode step (K = 64 layers of int4 fall back: they need 128 | K).
    assert calls
    # The kernel sums exact q * x products in fp32; the fallback rounds s * q to bf16 first: close, not equal.
    assert ((with_kernel - dequantized).norm() / dequantized.norm()).item() < 2e-2
    # The compiled CUDA-graph step runs the same kernel: its second-step scores match the eager ones.
    eager = decode(model, batch, "plain", do_sample=False)[1][1]
    compiled = decode(model, batch, "compiled", do_sample=False)[1][1]
    assert ((compiled - eager).norm() / eager.norm()).item() < 2e-2


def test_elementwise_functions_without_a_kernel_compile_once_for_training_batches(monkeypatch):
    """fused_on_cuda's fallback, for a function without a kernel of ours (or where its kernel does not apply: a CUDA
    machine without Triton): in training (gradients on) it compiles once, for every batch size and length, and gives
    the eager values. Run on CPU with a backend that only counts what torch.compile hands it, on a fresh copy of
    ChatGLM-6B's 2D rotary (the module's own takes triton_rotary_2d, tests/test_kernels.py)."""
    modeling = remote_module("chatglm-6b", "modeling_chatglm")
    compilations = []

    def counting_backend(graph_module, example_inputs):
        compilations.append(graph_module)
        return graph_module.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: real_compile(fn, backend=counting_backend, **kwargs))
    monkeypatch.setattr(modeling, "FUSE_DEVICES", ("cuda", "cpu"))
    torch._dynamo.reset()
    apply_rotary_2d = modeling.fused_on_cuda()(modeling.apply_rotary_2d.__wrapped__)
    heads, head_dim = 4, 16
    for batch, seq in [(2, 48), (4, 60), (3, 7), (12, 160)]:
        x = torch.randn(seq, batch, heads, head_dim, requires_grad=True)
        main, block = ((torch.randn(seq, batch, 1, head_dim // 2), torch.randn(seq, batch, 1, head_dim // 2)) for _ in "mb")
        output = apply_rotary_2d(x, main, block)
        torch.testing.assert_close(output, modeling.apply_rotary_2d.__wrapped__(x, main, block), atol=1e-5, rtol=1e-5)
        output.sum().backward()
    assert len(compilations) == 1
