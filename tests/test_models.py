"""The model code of the three versions on tiny random models (CPU, fp32 unless said otherwise)."""
import json
import re
import shutil
import sys

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import DynamicCache

from conftest import TOKENIZERS, VERSIONS
from tools.tiny_models import make_tiny_model
from utils.model_loading import ModelFolderError, load_model_and_tokenizer, remote_module

PROMPTS = ["你好", "ChatGLM-6B是清华大学开源的模型。请介绍一下自己", "Hello\nworld\t!"]


def load_auto(model_dir):
    model = AutoModel.from_pretrained(str(model_dir), trust_remote_code=True, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True)


def official_state_dict_shapes(version, config):
    """Key -> shape of the official checkpoints (spec section 3), for any size of config."""
    H, L = config["hidden_size"], config["num_layers"]
    if version == "chatglm-6b":
        V, F_ = config["vocab_size"], config["inner_hidden_size"]
        d = H // config["num_attention_heads"]
        shapes = {"transformer.word_embeddings.weight": (V, H), "lm_head.weight": (V, H),
                  "transformer.final_layernorm.weight": (H,), "transformer.final_layernorm.bias": (H,)}
        for i in range(L):
            p = f"transformer.layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (H,), p + "input_layernorm.bias": (H,),
                p + "attention.query_key_value.weight": (3 * H, H), p + "attention.query_key_value.bias": (3 * H,),
                p + "attention.rotary_emb.inv_freq": (d // 4,),
                p + "attention.dense.weight": (H, H), p + "attention.dense.bias": (H,),
                p + "post_attention_layernorm.weight": (H,), p + "post_attention_layernorm.bias": (H,),
                p + "mlp.dense_h_to_4h.weight": (F_, H), p + "mlp.dense_h_to_4h.bias": (F_,),
                p + "mlp.dense_4h_to_h.weight": (H, F_), p + "mlp.dense_4h_to_h.bias": (H,),
            })
        return shapes
    V, F_, d, G, N = (config[k] for k in ("padded_vocab_size", "ffn_hidden_size", "kv_channels", "multi_query_group_num", "num_attention_heads"))
    qkv = N * d + 2 * G * d
    shapes = {"transformer.embedding.word_embeddings.weight": (V, H), "transformer.rotary_pos_emb.inv_freq": (d // 4,),
              "transformer.encoder.final_layernorm.weight": (H,), "transformer.output_layer.weight": (V, H)}
    for i in range(L):
        p = f"transformer.encoder.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "self_attention.query_key_value.weight": (qkv, H),
            p + "self_attention.query_key_value.bias": (qkv,), p + "self_attention.dense.weight": (H, N * d),
            p + "post_attention_layernorm.weight": (H,), p + "mlp.dense_h_to_4h.weight": (2 * F_, H),
            p + "mlp.dense_4h_to_h.weight": (H, F_),
        })
    return shapes


@pytest.mark.parametrize("version", VERSIONS)
def test_6b_state_dict_matches_official_keys_and_sizes(version):
    config = json.loads((TOKENIZERS / version / "config.json").read_text())
    config_class = remote_module(version, "configuration_chatglm").ChatGLMConfig
    model_class = remote_module(version, "modeling_chatglm").ChatGLMForConditionalGeneration
    with torch.device("meta"):
        model = model_class(config_class(**config))
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == official_state_dict_shapes(version, config)
    total = sum(torch.Size(s).numel() for s in ours.values())
    # Spec 3.5: v1 counts lm_head and the embedding separately (the checkpoint stores both); v2/v3 include inv_freq.
    assert total == {"chatglm-6b": 6_707_929_984, "chatglm2-6b": 6_243_584_032, "chatglm3-6b": 6_243_584_032}[version]


@pytest.mark.parametrize("version", VERSIONS)
def test_auto_classes_load_strictly_with_trust_remote_code(version, tiny_model_dirs):
    model_dir = tiny_model_dirs[version]
    model, info = AutoModel.from_pretrained(str(model_dir), trust_remote_code=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(model).__name__ == "ChatGLMForConditionalGeneration"
    if version != "chatglm-6b":
        causal = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=True)
        assert type(causal).__name__ == "ChatGLMForConditionalGeneration"
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=True)
    assert tokenizer.padding_side == "left"


@pytest.mark.parametrize("version", VERSIONS)
def test_kv_cache_decoding_equals_full_forward(version, tiny_model_dirs):
    model, tokenizer = load_auto(tiny_model_dirs[version])
    input_ids = tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    continuation = torch.tensor([[30, 31, 32, 33, 34]])
    full_ids = torch.cat((input_ids, continuation), dim=1)
    full_logits = model(full_ids).logits
    cache = DynamicCache(config=model.config)
    logits = [model(input_ids, past_key_values=cache, use_cache=True).logits]
    for step in range(continuation.shape[1]):
        sequence = full_ids[:, : input_ids.shape[1] + step + 1]
        inputs = model.prepare_inputs_for_generation(sequence, past_key_values=cache, attention_mask=torch.ones_like(sequence))
        assert inputs["input_ids"].shape[1] == 1
        logits.append(model(**inputs).logits)
    torch.testing.assert_close(torch.cat(logits, dim=1), full_logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("version", VERSIONS)
def test_last_position_logits_come_from_one_plain_product(version, tiny_model_dirs):
    """logits_to_keep=1 (every prefill for generation, the evaluation's forward) gives the full logits' last column,
    through one matrix product of the kept rows: a strided slice would make F.linear a batched product that reads the
    whole output layer once per row."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Products(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in ("mm", "addmm", "bmm", "baddbmm"):
                self.names.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    model, tokenizer = load_auto(tiny_model_dirs[version])
    model.requires_grad_(False)  # frozen, as under an adapter (a trainable weight makes F.linear copy the rows instead)
    batch = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        full = model(**batch).logits
        with Products() as products:
            last = model(**batch, logits_to_keep=1).logits
    torch.testing.assert_close(last, full[:, -1:], atol=2e-5, rtol=1e-4)
    assert "bmm" not in products.names[-1] and products.names[-1] in ("mm", "addmm"), products.names[-3:]


@pytest.mark.parametrize("version", VERSIONS)
def test_save_and_load_round_trip_exactly(version, tiny_model_dirs, tmp_path):
    model, tokenizer = load_auto(tiny_model_dirs[version])
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    reloaded, reloaded_tokenizer = load_model_and_tokenizer(tmp_path, dtype="fp32", device="cpu")
    original = model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    assert reloaded_tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    assert torch.equal(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("version", VERSIONS)
def test_legacy_sharded_bin_checkpoint_loads(version, tmp_path):
    model_dir = make_tiny_model(version, tmp_path / "bin", TOKENIZERS / version, seed=3, weights_format="bin")
    assert len(list(model_dir.glob("pytorch_model-*.bin"))) == 2
    reference = make_tiny_model(version, tmp_path / "st", TOKENIZERS / version, seed=3)
    from_bin, _ = load_model_and_tokenizer(model_dir, dtype="fp32", device="cpu")
    from_st, tokenizer = load_model_and_tokenizer(reference, dtype="fp32", device="cpu")
    ids = tokenizer(PROMPTS[2], return_tensors="pt")["input_ids"]
    assert torch.equal(from_bin(ids).logits, from_st(ids).logits)


@pytest.mark.parametrize("version", VERSIONS)
def test_batched_left_padded_generation_equals_one_by_one(version, tiny_model_dirs):
    model, tokenizer = load_auto(tiny_model_dirs[version])
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    assert (batch["attention_mask"][:, 0] == 0).any(), "the prompts must need padding for this test"
    kwargs = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    batched = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
    width = batch["input_ids"].shape[1]
    for row, prompt in enumerate(PROMPTS):
        single = tokenizer(prompt, return_tensors="pt")
        alone = model.generate(input_ids=single["input_ids"], attention_mask=single["attention_mask"], **kwargs)
        assert batched[row, width:].tolist() == alone[0, single["input_ids"].shape[1]:].tolist(), prompt
        # Our own decode loop (used by chat) gives the same tokens as generate().
        streamed = list(model.stream_generate(single["input_ids"], single["attention_mask"], do_sample=False, max_new_tokens=12, eos_token_id=[-1]))
        assert streamed[-1][0][0].tolist() == alone[0, single["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_and_lora_backward_are_finite(version, dtype, tiny_model_dirs):
    from peft import LoraConfig, get_peft_model

    model = AutoModel.from_pretrained(str(tiny_model_dirs[version]), trust_remote_code=True, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dirs[version]), trust_remote_code=True)
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    reference = AutoModel.from_pretrained(str(tiny_model_dirs[version]), trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        half_logits = model(**batch).logits
        full_logits = reference(**batch).logits
    assert half_logits.dtype == dtype and torch.isfinite(half_logits).all()
    keep = batch["attention_mask"].bool()
    assert (half_logits.float() - full_logits)[keep].abs().max() < 0.05

    # LoRA adapters in fp32 on top of half weights, as the Trainer keeps them: no dtype errors, finite gradients.
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"], lora_dropout=0.0))
    for name, param in lora.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    lora.train()
    labels = batch["input_ids"].masked_fill(~keep, -100)
    loss = lora(**batch, labels=labels).loss
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    grads = [p.grad for n, p in lora.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("version", VERSIONS)
def test_gradient_checkpointing_gives_same_loss_and_gradients(version, tiny_model_dirs):
    model, tokenizer = load_auto(tiny_model_dirs[version])
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    results = []
    for checkpointing in (False, True):
        model.zero_grad()
        if checkpointing:
            model.gradient_checkpointing_enable()
        loss = model(**batch, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), model.get_input_embeddings().weight.grad.clone()))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("projection", [False, True])
def test_p_tuning_prefix_trains_only_the_prefix_and_decodes_with_cache(version, projection, tiny_model_dirs):
    model_dir = tiny_model_dirs[version]
    model, tokenizer = load_model_and_tokenizer(model_dir, dtype="fp32", device="cpu", pre_seq_len=4, prefix_projection=projection)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("transformer.prefix_encoder.") for n in trainable)
    embedding = model.transformer.prefix_encoder.embedding.weight
    expected_width = (
        (model.config.hidden_size if projection else 2 * model.config.num_layers * model.config.hidden_size)
        if version == "chatglm-6b"
        else 2 * model.config.num_layers * model.config.kv_channels * model.config.multi_query_group_num
    )
    assert embedding.shape == (4, expected_width)
    with torch.no_grad():
        for param in model.transformer.prefix_encoder.parameters():
            param.normal_(std=1.0)  # a prefix large enough to change the logits visibly
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    model.train()
    model.gradient_checkpointing_enable()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model(**batch, labels=labels).loss.backward()
    assert embedding.grad is not None and embedding.grad.abs().sum() > 0
    model.gradient_checkpointing_disable()
    model.eval()
    ids = tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    full = model(torch.cat((ids, torch.tensor([[40, 41]])), 1)).logits
    cache = DynamicCache(config=model.config)
    first = model(ids, past_key_values=cache, use_cache=True).logits
    assert cache.get_seq_length() == 4 + ids.shape[1]
    sequence = torch.cat((ids, torch.tensor([[40]])), 1)
    step = model(**model.prepare_inputs_for_generation(sequence, past_key_values=cache, attention_mask=torch.ones_like(sequence))).logits
    torch.testing.assert_close(torch.cat((first, step), 1), full[:, :-1], atol=2e-5, rtol=1e-4)
    without_prefix, _ = load_model_and_tokenizer(model_dir, dtype="fp32", device="cpu")
    assert not torch.allclose(without_prefix(ids).logits, first, atol=1e-3)


def test_loss_ignores_prompt_and_padding_positions(tiny_model_dirs):
    model, tokenizer = load_auto(tiny_model_dirs["chatglm2-6b"])
    ids = tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    labels = ids.clone()
    labels[:, :5] = -100
    logits = model(ids).logits
    expected = torch.nn.functional.cross_entropy(logits[0, 4:-1], ids[0, 5:])
    torch.testing.assert_close(model(ids, labels=labels).loss, expected)


def reference_causal_lm_loss(logits, labels, num_items_in_batch=None):
    """The loss as computed before the chunked path: full logits upcast to fp32, one cross-entropy."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction=reduction)
    return loss if num_items_in_batch is None else loss / num_items_in_batch


def prompt_and_padding_masked_batch(tokenizer):
    """The three prompts left-padded; labels = the ids with padding and each sequence's first 4 tokens at -100."""
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    first_real = (batch["attention_mask"] == 0).sum(1)
    for row, start in enumerate(first_real.tolist()):
        labels[row, start:start + 4] = -100
    return batch, labels


def loss_and_gradients(model, compute_loss):
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    loss = compute_loss()
    loss.backward()
    return loss.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


def assert_same_loss_and_gradients(actual, expected):
    """Loss to 1e-6 relative; each gradient to 1e-5 of its largest entry (fp32 rounding of sums in another order:
    in float64 the two paths agree to 1e-16)."""
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-6, atol=0, equal_nan=True)
    assert len(actual[1]) == len(expected[1])
    for got, want in zip(actual[1], expected[1]):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()) + 1e-12)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("num_items_in_batch", [None, 50])
@pytest.mark.parametrize("chunk_rows", [7, None])
def test_chunked_loss_and_gradients_equal_the_full_logits_formula(version, num_items_in_batch, chunk_rows, tiny_model_dirs, monkeypatch):
    model, tokenizer = load_auto(tiny_model_dirs[version])
    model.train()
    batch, labels = prompt_and_padding_masked_batch(tokenizer)
    targets = int((labels[:, 1:] != -100).sum())
    if chunk_rows:
        # Several chunks, the last one partial.
        monkeypatch.setattr(sys.modules[type(model).__module__], "LOSS_CHUNK_ROWS", chunk_rows)
        assert targets > 2 * chunk_rows and targets % chunk_rows
    expected = loss_and_gradients(model, lambda: reference_causal_lm_loss(model(**batch).logits, labels, num_items_in_batch))
    actual = loss_and_gradients(model, lambda: model(**batch, labels=labels, num_items_in_batch=num_items_in_batch).loss)
    assert all(g.abs().sum() > 0 for g in expected[1][:1])
    assert_same_loss_and_gradients(actual, expected)


@pytest.mark.parametrize("version", VERSIONS)
def test_chunked_loss_calls_a_lora_wrapped_output_layer(version, tiny_model_dirs, monkeypatch):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_auto(tiny_model_dirs[version])
    output_name = "lm_head" if version == "chatglm-6b" else "output_layer"
    # Random A and B: the adapter changes the logits, so a loss that bypassed it would differ.
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value", output_name], lora_dropout=0.0, init_lora_weights=False)
    lora = get_peft_model(model, config)
    assert type(model.get_output_embeddings()) is not torch.nn.Linear
    lora.train()
    monkeypatch.setattr(sys.modules[type(model).__module__], "LOSS_CHUNK_ROWS", 7)
    batch, labels = prompt_and_padding_masked_batch(tokenizer)
    expected = loss_and_gradients(lora, lambda: reference_causal_lm_loss(lora(**batch).logits, labels))
    actual = loss_and_gradients(lora, lambda: lora(**batch, labels=labels).loss)
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert any(output_name in n for n in names) and len(names) == len(actual[1])
    assert_same_loss_and_gradients(actual, expected)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("num_items_in_batch", [None, 5])
def test_loss_of_a_batch_without_targets_is_unchanged(version, num_items_in_batch, tiny_model_dirs):
    # Mean over no targets is nan (as F.cross_entropy gives), a sum over none is 0; backward works and gives zeros.
    model, tokenizer = load_auto(tiny_model_dirs[version])
    model.train()
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    labels = torch.full_like(batch["input_ids"], -100)
    expected = loss_and_gradients(model, lambda: reference_causal_lm_loss(model(**batch).logits, labels, num_items_in_batch))
    actual = loss_and_gradients(model, lambda: model(**batch, labels=labels, num_items_in_batch=num_items_in_batch).loss)
    assert torch.isnan(actual[0]) if num_items_in_batch is None else actual[0] == 0
    assert_same_loss_and_gradients(actual, expected)
    assert all(not g.any() for g in actual[1])


@pytest.mark.parametrize("version", VERSIONS)
def test_training_forward_with_labels_returns_no_logits_and_eval_returns_them(version, tiny_model_dirs):
    model, tokenizer = load_auto(tiny_model_dirs[version])
    batch, labels = prompt_and_padding_masked_batch(tokenizer)
    vocab = model.get_output_embeddings().weight.shape[0]
    model.train()
    saved_shapes = []

    def pack(tensor):
        saved_shapes.append(tuple(tensor.shape))
        return tensor

    # Nothing of vocabulary width is kept for backward (checkpointed chunks keep nothing of their own).
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = model(**batch, labels=labels)
    assert saved_shapes and all(shape[-1:] != (vocab,) for shape in saved_shapes)
    assert outputs.logits is None and torch.isfinite(outputs.loss)
    outputs.loss.backward()
    assert torch.equal(model(**batch, labels=labels, return_dict=False)[0], outputs.loss)
    assert model(**batch).logits.shape == (*labels.shape, vocab)  # no labels: logits as always
    model.eval()
    with torch.no_grad():
        evaluated = model(**batch, labels=labels)
        last = model(**batch, labels=labels, logits_to_keep=1)
    assert evaluated.logits.shape == (*labels.shape, vocab)
    torch.testing.assert_close(evaluated.loss, reference_causal_lm_loss(evaluated.logits, labels), rtol=1e-6, atol=0)
    # logits_to_keep trims the logits, never the loss.
    torch.testing.assert_close(last.logits, evaluated.logits[:, -1:])
    assert torch.equal(last.loss, evaluated.loss)


class ScriptedAnswer:
    """Logits processor that makes any model answer `answer_ids`: chat's prompt, stop and post-processing are then
    checked exactly on a random tiny model. Scores stay finite so that the official NaN/Inf guard stays quiet."""

    def __init__(self, answer_ids):
        self.answer_ids, self.prompt_len = answer_ids, None

    def __call__(self, input_ids, scores):
        self.prompt_len = self.prompt_len or input_ids.shape[1]
        forced = torch.full_like(scores, -1e9)
        forced[:, self.answer_ids[min(input_ids.shape[1] - self.prompt_len, len(self.answer_ids) - 1)]] = 0.0
        return forced


@pytest.mark.parametrize("version", VERSIONS)
def test_chat_and_stream_chat_use_the_official_prompt_and_history(version, tiny_model_dirs):
    model, tokenizer = load_model_and_tokenizer(tiny_model_dirs[version], dtype="fp32", device="cpu")
    answer = {"chatglm-6b": "你好,我是助手!", "chatglm2-6b": "你好，我是助手！", "chatglm3-6b": "\n你好，我是助手！"}[version]
    answer_ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
    response, history = model.chat(tokenizer, "你好", history=[], logits_processor=[ScriptedAnswer(answer_ids)])
    assert response == "你好，我是助手！"  # v1: ASCII punctuation next to Chinese turned back into full-width
    streamed = list(model.stream_chat(tokenizer, "你好", history=[], logits_processor=[ScriptedAnswer(answer_ids)]))
    assert len(streamed) >= 3 and streamed[-1] == (response, history)
    assert all(streamed[-1][0].startswith(partial) for partial, _ in streamed)
    if version == "chatglm3-6b":
        assert history == [{"role": "user", "content": "你好"}, {"role": "assistant", "metadata": "", "content": response}]
        prompt = tokenizer.build_chat_input("谢谢", history=history)["input_ids"][0].tolist()
        first_turn = tokenizer.build_chat_input("你好")["input_ids"][0].tolist()
        assert prompt[: len(first_turn)] == first_turn and prompt[-1] == 64796
    else:
        assert history == [("你好", response)]
        build = model.build_prompt if version == "chatglm-6b" else tokenizer.build_prompt
        assert build("谢谢", history=history) == {
            "chatglm-6b": f"[Round 0]\n问：你好\n答：{response}\n[Round 1]\n问：谢谢\n答：",
            "chatglm2-6b": f"[Round 1]\n\n问：你好\n\n答：{response}\n\n[Round 2]\n\n问：谢谢\n\n答：",
        }[version]


def test_v2_stream_chat_continues_from_the_returned_cache(tiny_model_dirs):
    model, tokenizer = load_model_and_tokenizer(tiny_model_dirs["chatglm2-6b"], dtype="fp32", device="cpu")
    answer_ids = tokenizer.encode("好的", add_special_tokens=False) + [tokenizer.eos_token_id]
    *_, (response, history, cache) = model.stream_chat(
        tokenizer, "你好", history=[], return_past_key_values=True, logits_processor=[ScriptedAnswer(answer_ids)]
    )
    seen = cache.get_seq_length()
    *_, (second, history, cache) = model.stream_chat(
        tokenizer, "再见", history=history, past_key_values=cache, return_past_key_values=True,
        logits_processor=[ScriptedAnswer(answer_ids)],
    )
    turn = tokenizer.encode("\n\n[Round 2]\n\n问：再见\n\n答：", add_special_tokens=False)[1:]
    # The cache grew by exactly the new turn (without its dummy-prefix piece) and the answer tokens.
    assert cache.get_seq_length() == seen + len(turn) + len(answer_ids) - 1
    assert second == "好的" and history[-1] == ("再见", "好的")


def test_v1_response_punctuation_follows_the_official_rule():
    model_class = remote_module("chatglm-6b", "modeling_chatglm").ChatGLMForConditionalGeneration
    assert model_class.process_response(" 你好,世界!ok, fine: [[训练时间]]? ") == "你好，世界！ok, fine: 2023年？"


def test_v3_tool_call_is_parsed_without_eval():
    model_class = remote_module("chatglm3-6b", "modeling_chatglm").ChatGLMForConditionalGeneration
    history = [{"role": "system", "content": "tools", "tools": [{"name": "get_weather"}]}]
    output = "get_weather\n```python\ntool_call(city='北京', days=3)\n```"
    content, new_history = model_class.process_response(output, history)
    assert content == {"name": "get_weather", "parameters": {"city": "北京", "days": 3}}
    assert new_history[-1]["metadata"] == "get_weather" and len(history) == 1
    with pytest.raises(ValueError, match="tool call"):
        model_class.process_response("get_weather\n```python\n__import__('os').system('true')\n```", history)


def test_loader_errors_name_the_file_and_the_fix(tiny_model_dirs, tmp_path):
    with pytest.raises(ModelFolderError, match=re.escape(str(tmp_path / "config.json")) + ".*not found"):
        load_model_and_tokenizer(tmp_path)
    source = tiny_model_dirs["chatglm2-6b"]
    no_weights = tmp_path / "no_weights"
    shutil.copytree(source, no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="no weights found.*model.safetensors"):
        load_model_and_tokenizer(no_weights)
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(source, no_tokenizer)
    (no_tokenizer / "tokenizer.model").unlink()
    with pytest.raises(ModelFolderError, match="tokenizer.model: not found"):
        load_model_and_tokenizer(no_tokenizer)
    small_vocab = tmp_path / "small_vocab"
    shutil.copytree(source, small_vocab)
    config = json.loads((small_vocab / "config.json").read_text())
    config["padded_vocab_size"] = 1000
    (small_vocab / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="64794 tokens but config.json's vocab_size/padded_vocab_size is 1000"):
        load_model_and_tokenizer(small_vocab)
    config["model_type"] = "not_a_model"
    (small_vocab / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="model_type is 'not_a_model'"):
        load_model_and_tokenizer(small_vocab)
    config = {"model_type": "chatglm", "hidden_size": 8}
    (small_vocab / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFolderError, match="cannot tell the ChatGLM version"):
        load_model_and_tokenizer(small_vocab)


def test_version_is_detected_from_the_official_configs():
    from utils.model_loading import detect_model_version

    for version in VERSIONS:
        assert detect_model_version(json.loads((TOKENIZERS / version / "config.json").read_text())) == version


class _PicklePayload:
    """Unpickling this runs code (writes a marker file): what weights_only=True must refuse."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_legacy_bin_is_read_with_weights_only(tmp_path):
    model_dir = make_tiny_model("chatglm2-6b", tmp_path / "bin", TOKENIZERS / "chatglm2-6b", weights_format="bin")
    shard = model_dir / "pytorch_model-00001-of-00002.bin"
    state = torch.load(shard, weights_only=True)
    marker = tmp_path / "payload_ran"
    state["payload"] = _PicklePayload(str(marker))
    torch.save(state, shard)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        load_model_and_tokenizer(model_dir, dtype="fp32", device="cpu")
    assert not marker.exists()
