"""Packed instruction training (--packing=true): several samples per row, each attending only to itself.

On tiny v1/v2/v3 models and a tiny native Llama: a packed row gives every sample the logits, loss and gradients it
gets alone; changing one sample of a row changes nothing of another (and the same check on the row without its
segment ids does see the change, so it would catch a leak); train_trainer.py --packing=true trains."""
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import OVERFIT, VERSIONS, run_script
from test_training import logged_losses
from utils.dataset import InstructionDataset, PackedDataset, PaddingCollator, pack_examples, pack_lengths, packed_inputs_hook
from utils.model_loading import load_model_and_tokenizer
from utils.trainer import prefix_cache, prepare_packing, repeated_rows, shared_prefix_length

MODELS = (*VERSIONS, "llama")


@pytest.fixture(scope="module")
def setups(trainable_models, sixteen_examples):
    """version -> (fp32 model in eval mode, five encoded examples, pad id). The native Llama gets synthetic examples
    (a prompt without labels, then an answer) and the hook that train_trainer.py installs when it packs."""
    cache = {}

    def get(version):
        if version not in cache:
            if version == "llama":
                torch.manual_seed(0)
                config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3,
                                     attn_implementation="sdpa")
                model = LlamaForCausalLM(config).eval()
                model.register_forward_pre_hook(packed_inputs_hook, with_kwargs=True)
                generator = torch.Generator().manual_seed(0)
                examples = []
                for prompt_len, answer_len in ((9, 4), (5, 7), (12, 3), (6, 6), (8, 2)):
                    ids = torch.randint(3, 300, (prompt_len + answer_len,), generator=generator).tolist()
                    examples.append({"input_ids": ids, "labels": [-100] * prompt_len + ids[prompt_len:]})
                cache[version] = model, examples, 0
            else:
                model, tokenizer = load_model_and_tokenizer(trainable_models[version], dtype="fp32", device="cpu")
                data = InstructionDataset(sixteen_examples, tokenizer, version, max_source_length=64, max_target_length=32)
                cache[version] = model.eval(), data.examples[:5], tokenizer.pad_token_id
        return cache[version]

    return get


def forward(model, batch, **kwargs):
    return model(**batch, **kwargs)


def sample_loss(logits, labels):
    """Summed cross-entropy of one sample: position i predicts labels[i + 1]."""
    return F.cross_entropy(logits[:-1].float(), torch.tensor(labels[1:]), ignore_index=-100, reduction="sum")


def packed_batch(examples, pad_id):
    """Two rows: examples 0-2 packed in one, 3-4 in the other (padded to the first)."""
    return PaddingCollator(pad_id)([pack_examples(examples[:3]), pack_examples(examples[3:])])


def segments_of(examples):
    """(row, start, example) of each example in packed_batch's layout."""
    places, starts = [], {0: 0, 1: 0}
    for index, example in enumerate(examples):
        row = 0 if index < 3 else 1
        places.append((row, starts[row], example))
        starts[row] += len(example["input_ids"])
    return places


@pytest.mark.parametrize("version", MODELS)
def test_packed_rows_give_each_sample_its_own_logits_and_loss(setups, version):
    model, examples, pad_id = setups(version)
    batch = packed_batch(examples, pad_id)
    assert batch["attention_mask"].max() == 3 and batch["attention_mask"][1, -1] == 0  # segment ids, then padding
    with torch.no_grad():
        packed_logits = forward(model, {k: v for k, v in batch.items() if k != "labels"}).logits
        for row, start, example in segments_of(examples):
            alone = forward(model, {"input_ids": torch.tensor([example["input_ids"]])}).logits[0]
            inside = packed_logits[row, start:start + len(example["input_ids"])]
            torch.testing.assert_close(inside, alone, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(sample_loss(inside, example["labels"]), sample_loss(alone, example["labels"]),
                                       atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("version", MODELS)
def test_packed_batch_gives_the_gradients_of_the_unpacked_batch(setups, version):
    """The same five samples, packed in two rows or padded in five, under the training scripts' normalisation (the
    summed token losses divided by num_items_in_batch, the step's target tokens): the same loss and gradients."""
    model, examples, pad_id = setups(version)
    unpacked = PaddingCollator(pad_id)(examples)
    packed = packed_batch(examples, pad_id)
    targets = int(unpacked["labels"][:, 1:].ne(-100).sum())
    assert int(packed["labels"][:, 1:].ne(-100).sum()) == targets  # packing neither adds nor drops a target
    results = []
    for batch in (unpacked, packed):
        model.zero_grad()
        loss = forward(model, batch, num_items_in_batch=torch.tensor(targets)).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 5
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-5, rtol=1e-4, msg=name)
    model.zero_grad()


@pytest.mark.parametrize("version", VERSIONS)
def test_positions_restart_per_sample(setups, version):
    """Each sample of a packed row gets the positions it has alone (ChatGLM-6B: its 2-D positions, built from its
    own [gMASK] and <sop>). Rotary embeddings are relative: with a block-diagonal mask a sample's positions shifted by
    a constant would change its logits by little more than rounding, so this is checked here directly."""
    model, examples, pad_id = setups(version)
    batch = packed_batch(examples, pad_id)
    packed = model.get_position_ids(batch["input_ids"], batch["attention_mask"])
    for row, start, example in segments_of(examples):
        ids = torch.tensor([example["input_ids"]])
        alone = model.get_position_ids(ids, torch.ones_like(ids))[0]
        assert packed[row, ..., start:start + ids.shape[1]].tolist() == alone.tolist()
    # A 0/1 mask (right padding) keeps the positions of before.
    ones = batch["attention_mask"].ne(0).long()
    if version != "chatglm-6b":
        assert model.get_position_ids(batch["input_ids"], ones).tolist() == (ones.cumsum(-1) - 1).clamp(min=0).tolist()


def changed_first_sample(batch, examples):
    """The packed batch with the prompt tokens of sample 0 (row 0) replaced by others (specials kept: [gMASK] and
    <sop> stay where ChatGLM-6B looks for them)."""
    changed = {k: v.clone() for k, v in batch.items()}
    first = examples[0]
    prompt = [i for i, label in enumerate(first["labels"]) if label == -100][1:-3]  # inner prompt tokens
    ids = changed["input_ids"][0]
    ids[prompt] = ids[prompt].flip(0)
    ids[prompt[0]] = examples[1]["input_ids"][1]
    return changed


@pytest.mark.parametrize("version", MODELS)
def test_no_attention_crosses_a_sample_boundary(setups, version):
    model, examples, pad_id = setups(version)
    batch = {k: v for k, v in packed_batch(examples, pad_id).items() if k != "labels"}
    changed = changed_first_sample(batch, examples)
    length = len(examples[0]["input_ids"])
    with torch.no_grad():
        before, after = forward(model, batch).logits, forward(model, changed).logits
        # Sanity: the change does reach sample 0 itself.
        assert (before[0, :length] - after[0, :length]).abs().max() > 1e-3
        # Samples 1 and 2 of the row see nothing of it.
        torch.testing.assert_close(after[0, length:], before[0, length:], atol=1e-6, rtol=0)
        # The same rows with a plain 0/1 mask (one sequence per row): the change leaks into the next samples, so the
        # assertion above would catch a mask that lets attention cross the boundary.
        flat, flat_changed = ({**b, "attention_mask": b["attention_mask"].ne(0).long()} for b in (batch, changed))
        leak = (forward(model, flat).logits[0, length:] - forward(model, flat_changed).logits[0, length:]).abs().max()
        assert leak > 1e-3


def test_pack_lengths_and_pack_examples():
    lengths = [5, 9, 3, 12, 7, 1, 4, 20]
    rows = pack_lengths(lengths, budget=12, seed=1)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))  # every example exactly once
    assert all(sum(lengths[i] for i in row) <= 12 for row in rows if len(row) > 1)
    assert [7] in rows  # longer than the budget: a row of its own
    assert len(rows) == 5  # first-fit decreasing: 20 | 12 | 9+3 | 7+5 | 4+1 (sum 61 over 5 rows)
    assert pack_lengths(lengths, 12, seed=1) == rows and pack_lengths(lengths, 12, seed=2) != rows
    row = pack_examples([{"input_ids": [1, 2, 3], "labels": [5, -100, 3]}, {"input_ids": [4, 5], "labels": [4, 5]}])
    # Each sample's first token is never a target: it would be predicted from the previous sample's last token.
    assert row == {"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, 3, -100, 5], "attention_mask": [1, 1, 1, 2, 2]}


def test_packed_dataset_stats(setups, sixteen_examples):
    _, examples, _ = setups("chatglm2-6b")

    class Data:
        pass

    data = Data()
    data.examples, data.stats = examples, {"samples": len(examples)}
    packed = PackedDataset(data, pack_tokens=2 * max(len(e["input_ids"]) for e in examples), seed=0)
    assert len(packed) < len(examples) and packed.stats["packed_rows"] == len(packed)
    assert sorted(sum((row for row in packed.rows), [])) == list(range(len(examples)))
    assert f"{len(examples)} samples in {len(packed)} rows" in packed.describe()


def test_samples_longer_than_pack_tokens_get_a_whole_row_each_and_the_fill_ratio_stays_honest(setups):
    _, examples, _ = setups("chatglm2-6b")

    class Data:
        pass

    data = Data()
    data.examples, data.stats = examples, {"samples": len(examples)}
    lengths = sorted(len(e["input_ids"]) for e in examples)
    budget = lengths[len(lengths) // 2]  # half of the samples are longer than a row
    packed = PackedDataset(data, pack_tokens=budget, seed=0)
    longer = [i for i, e in enumerate(examples) if len(e["input_ids"]) > budget]
    assert longer and packed.stats["longer_than_pack_tokens"] == len(longer)
    for i in longer:  # alone in its row, and whole: nothing of it is cut
        (row,) = [r for r, indices in enumerate(packed.rows) if i in indices]
        assert packed.rows[row] == [i] and packed[row]["input_ids"] == examples[i]["input_ids"]
    assert 0 < packed.stats["fill_ratio"] <= 1
    # A budget below every sample: one whole sample a row, every row full (not a fill ratio of several hundred %).
    below_all = PackedDataset(data, pack_tokens=lengths[0] // 4, seed=0)
    assert len(below_all) == len(examples) and below_all.stats["fill_ratio"] == 1.0
    assert packed.describe().endswith(f"; {len(longer)} samples are longer than --pack_tokens={budget} (the longest "
                                      f"{lengths[-1]} tokens): each has a row of its own, whole, so a row can be that long")


def test_train_trainer_trains_packed(trainable_models, sixteen_examples, tmp_path):
    run_dir = tmp_path / "run"
    args = [a for a in OVERFIT if not a.startswith("--per_device_train_batch_size")]
    result = run_script("train_trainer.py", f"--model_dir={trainable_models['chatglm2-6b']}", f"--train_file={sixteen_examples}",
                        "--dev_file=none", f"--output_dir={run_dir}", "--max_steps=30", "--save_steps=30",
                        "--packing=true", "--pack_tokens=256", "--per_device_train_batch_size=4", *args)
    assert "packing: 16 samples in " in result.stdout, result.stdout[-2000:]
    train_args = json.loads((run_dir / "adapter_model" / "train_args.json").read_text())
    stats = train_args["data"]["train"]
    assert 1 < stats["packed_rows"] < 16 and 0 < stats["fill_ratio"] <= 1
    metrics = train_args["metrics"]  # the first step's seconds (its one-time costs) within the run's
    assert 0 < metrics["first_step_seconds"] < metrics["train_runtime"], metrics
    state = json.loads((run_dir / "checkpoint-30" / "trainer_state.json").read_text())
    losses = {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}
    assert losses[30] < 0.5 * losses[1], losses


def test_train_deepspeed_trains_packed_chatglm_6b(trainable_models, sixteen_examples, tmp_path):
    """train_deepspeed.py (one plain process) packs too; here ChatGLM-6B, with its 2-D positions and prefix-LM mask."""
    run_dir = tmp_path / "run"
    args = [a for a in OVERFIT if not a.startswith(("--per_device_train_batch_size", "--report_to"))]
    result = run_script("train_deepspeed.py", f"--model_dir={trainable_models['chatglm-6b']}", f"--train_file={sixteen_examples}",
                        "--dev_file=none", f"--output_dir={run_dir}", "--max_steps=20", "--save_steps=20",
                        "--packing=true", "--pack_tokens=256", "--per_device_train_batch_size=4", *args)
    assert "packing: 16 samples in " in result.stdout, result.stdout[-2000:]
    losses = logged_losses(run_dir, 20)
    assert losses[20] < 0.2 * losses[1], losses
    train_args = json.loads((run_dir / "adapter_model" / "train_args.json").read_text())
    # 20 steps of 4 rows: every row once per epoch when 4 rows hold the 16 samples; tokens, not segment ids, counted.
    data = train_args["data"]["train"]
    if data["packed_rows"] == 4:
        assert train_args["metrics"]["num_input_tokens_seen"] == 20 * data["tokens"]


def test_models_that_cannot_pack_train_grouped_by_length(setups):
    """A model outside transformers' own code (e.g. other remote code) might attend across samples: no packing, length
    grouping instead, and the log says so. A native transformers model packs, through the position-ids hook."""

    class RemoteCodeModel(torch.nn.Module):
        model_version = None

    logged = []
    data = object()
    assert prepare_packing(RemoteCodeModel(), data, True, 64, 0, logged.append) == (data, True)
    assert "grouped by length" in logged[0]
    assert prepare_packing(RemoteCodeModel(), data, False, 64, 0, logged.append) == (data, False) and len(logged) == 1
    _, examples, _ = setups("chatglm2-6b")

    class Data:
        stats = {"samples": len(examples)}

    Data.examples = examples
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2))
    packed, grouped = prepare_packing(llama, Data(), True, 256, 0, logged.append)
    assert isinstance(packed, PackedDataset) and not grouped and logged[-1].startswith("packing: 5 samples in ")
    assert llama._forward_pre_hooks  # segment ids -> restarting position_ids


def test_packed_segments_cut_at_every_segment_and_row_start():
    """The variable-length attention's cuts: where the segment id changes and where a row begins (row 1 starts with
    the id that row 0 ends with: still a new segment), padding runs as segments of their own."""
    from utils.model_loading import remote_module

    modeling = remote_module("chatglm2-6b", "modeling_chatglm")
    segments = torch.tensor([[1, 1, 1, 2, 2, 3, 0, 0], [3, 3, 3, 3, 4, 4, 4, 4]])
    packed = modeling.PackedSegments(segments)
    assert packed.cu_seqlens.tolist() == [0, 3, 5, 6, 8, 12, 16] and packed.cu_seqlens.dtype == torch.int32
    assert packed.max_len == 4
    assert not modeling.PackedSegments.applies(segments, 8, 0, 0, torch.zeros(1), 0.0)  # CPU: the dense mask


def reference_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, window_size, enable_gqa=False):
    """What flash attention's variable-length kernel computes, segment by segment (window (-1, 0): causal, a query run
    aligned to the end of its keys)."""
    assert window_size == (-1, 0)
    q_bounds, k_bounds = cu_q.tolist(), cu_k.tolist()
    assert max(b - a for a, b in zip(q_bounds, q_bounds[1:])) == max_q
    assert max(b - a for a, b in zip(k_bounds, k_bounds[1:])) == max_k
    out = torch.empty_like(q)
    for (start, end), (k_start, k_end) in zip(zip(q_bounds, q_bounds[1:]), zip(k_bounds, k_bounds[1:])):
        allowed = torch.ones(end - start, k_end - k_start, dtype=torch.bool).tril(k_end - k_start - (end - start))
        out[start:end] = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1), k[k_start:k_end].transpose(0, 1), v[k_start:k_end].transpose(0, 1),
            attn_mask=allowed, enable_gqa=True).transpose(0, 1)
    return out


def test_attends_in_runs_takes_packed_rows_and_rows_padded_on_either_side_only():
    """The rows the variable-length path may take (each run of equal mask values attends to itself alone): packed
    segment ids, and padded rows with a single run of tokens; not a row with two runs of tokens (the dense mask lets
    the second see the first), not an unpadded batch (no mask at all), not a decode step. After a cache: one run of
    new tokens per row (padded or not; the cached part as it is), 0/1 masks only."""
    from utils.model_loading import remote_module

    runs = remote_module("chatglm2-6b", "modeling_chatglm").attends_in_runs
    mask = torch.tensor
    assert runs(mask([[1, 1, 2, 2, 0], [3, 3, 3, 0, 0]]), 5, 0)
    assert runs(mask([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]), 5, 0)  # left padding
    assert runs(mask([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]), 5, 0)  # right padding
    assert runs(mask([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]]), 5, 0)
    assert not runs(mask([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]]), 5, 0)
    assert not runs(mask([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]), 5, 0)
    assert not runs(mask([[0, 0, 1, 1, 1]]), 1, 4) and not runs(None, 5, 0)
    assert runs(mask([[0, 0, 1, 1, 1]]), 2, 3) and runs(mask([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]]), 3, 2)
    assert not runs(mask([[1, 1, 1, 0, 1]]), 3, 2) and not runs(mask([[1, 1, 2, 2, 2]]), 3, 2)


@pytest.mark.parametrize("layout", ["packed", "right-padded", "left-padded", "after-a-shared-prefix"])
@pytest.mark.parametrize("version", ["chatglm2-6b", "chatglm3-6b"])
def test_the_variable_length_attention_path_gives_the_masked_logits(setups, version, layout, monkeypatch):
    """The variable-length path of ChatGLM2/3 on CUDA (flash attention over segments, no dense mask), with the kernel
    replaced by a per-segment reference: q, k, v reach it flattened and cut where they should, and the result is put
    back in place, so the logits equal the dense mask's: the block-diagonal one of packed rows, and the padding mask of
    an evaluation batch (padded on the right) or of a batch of prompts (padded on the left). A prompt's prefill fills
    the cache as the dense path does: the next token's logits after it are equal too. After a shared prefix (as
    evaluation runs it, utils/trainer.py): rows padded on the right continue one cache row repeated, each segment's
    keys the cached tokens and then its own."""
    model, examples, pad_id = setups(version)
    modeling = __import__(type(model).__module__, fromlist=["PackedSegments"])
    prefix = 0
    if layout == "packed":
        batch = packed_batch(examples, pad_id)
    elif layout == "after-a-shared-prefix":
        prefix = shared_prefix_length(examples)
        assert prefix > 10
        batch = PaddingCollator(pad_id)([{"input_ids": e["input_ids"][prefix:]} for e in examples])
        batch["attention_mask"] = F.pad(batch["attention_mask"], (prefix, 0), value=1)
    else:
        batch = PaddingCollator(pad_id, layout.split("-")[0])(examples)
    batch = {k: v for k, v in batch.items() if k != "labels"}
    next_batch = {"input_ids": torch.arange(len(batch["input_ids"]))[:, None] + 7,
                  "attention_mask": F.pad(batch["attention_mask"], (0, 1), value=1)}

    def prefill_and_next():
        past = {}
        if prefix:
            past["past_key_values"] = repeated_rows(prefix_cache(model, examples[0]["input_ids"][:prefix], "cpu"),
                                                    len(examples))
        output = forward(model, batch, use_cache=True, **past)
        return output.logits, forward(model, next_batch, past_key_values=output.past_key_values).logits

    with torch.no_grad():
        masked, masked_next = prefill_and_next()
        calls = []
        monkeypatch.setattr(modeling, "varlen_attn", lambda *a, **kw: calls.append(1) or reference_varlen_attn(*a, **kw))
        monkeypatch.setattr(modeling.PackedSegments, "applies",
                            staticmethod(lambda mask, q, past, *rest: modeling.attends_in_runs(mask, q, past)))
        varlen, varlen_next = prefill_and_next()
    assert len(calls) == model.config.num_layers
    if layout == "left-padded":
        torch.testing.assert_close(varlen_next, masked_next, atol=2e-5, rtol=1e-4)
    real = batch["attention_mask"][:, prefix:] != 0  # padding's outputs are never used (the dense mask lets it see all)
    assert (~real).any()
    torch.testing.assert_close(varlen[real], masked[real], atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention's variable-length kernel needs CUDA")
@pytest.mark.parametrize("version", ["chatglm2-6b", "chatglm3-6b"])
def test_rows_after_a_shared_prefix_on_cuda_take_flash_segments_and_give_the_whole_samples_logits(trainable_models,
                                                                                                 sixteen_examples,
                                                                                                 version):
    """Evaluation's batches after the shared prompt prefix, on flash attention itself: its causal alignment of a
    query run to the end of its keys (the cached tokens, then its own) gives each token what the whole sample gives."""
    model, tokenizer = load_model_and_tokenizer(trainable_models[version], dtype="bf16", device="cuda")
    model.eval()
    modeling = __import__(type(model).__module__, fromlist=["PackedSegments"])
    examples = InstructionDataset(sixteen_examples, tokenizer, version, max_source_length=64, max_target_length=32).examples[:6]
    prefix = shared_prefix_length(examples)
    whole = {k: v.cuda() for k, v in PaddingCollator(tokenizer.pad_token_id)(examples).items() if k != "labels"}
    rest = PaddingCollator(tokenizer.pad_token_id)([{"input_ids": e["input_ids"][prefix:]} for e in examples])
    rest = {"input_ids": rest["input_ids"].cuda(), "attention_mask": F.pad(rest["attention_mask"], (prefix, 0), value=1).cuda()}
    calls = []
    original = modeling.varlen_attn
    modeling.varlen_attn = lambda q, k, v, cu_q, cu_k, *args, **kwargs: calls.append(torch.equal(cu_q, cu_k)) or original(
        q, k, v, cu_q, cu_k, *args, **kwargs)
    try:
        with torch.no_grad():
            expected = forward(model, whole).logits[:, prefix:].float()
            past = repeated_rows(prefix_cache(model, examples[0]["input_ids"][:prefix], "cuda"), len(examples))
            logits = forward(model, rest, past_key_values=past, use_cache=True).logits.float()
    finally:
        modeling.varlen_attn = original
    layers = model.config.num_layers
    assert calls == [True] * layers + [False] * layers  # whole samples (segments), then the rows after the prefix
    real = rest["attention_mask"][:, prefix:] != 0
    torch.testing.assert_close(logits[real], expected[real], atol=3e-2, rtol=3e-2)
    assert (logits[real].argmax(-1) == expected[real].argmax(-1)).float().mean() > 0.95


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention's variable-length kernel needs CUDA")
@pytest.mark.parametrize("layout", ["packed", "right-padded"])
@pytest.mark.parametrize("version", ["chatglm2-6b", "chatglm3-6b"])
def test_packed_training_on_cuda_uses_flash_segments_and_gives_the_masked_loss_and_gradients(trainable_models,
                                                                                             sixteen_examples, version,
                                                                                             layout):
    """Packed rows, and unpacked rows padded on the right (training without packing, evaluation batches)."""
    model, tokenizer = load_model_and_tokenizer(trainable_models[version], dtype="bf16", device="cuda")
    modeling = __import__(type(model).__module__, fromlist=["PackedSegments"])
    examples = InstructionDataset(sixteen_examples, tokenizer, version, max_source_length=64, max_target_length=32).examples
    batch = packed_batch(examples, tokenizer.pad_token_id) if layout == "packed" else PaddingCollator(tokenizer.pad_token_id)(examples[:6])
    batch = {k: v.cuda() for k, v in batch.items()}
    model.train()
    results = []
    for use_varlen in (True, False):
        model.zero_grad()
        original = modeling.PackedSegments.applies
        if not use_varlen:
            modeling.PackedSegments.applies = staticmethod(lambda *args: False)
        try:
            loss = forward(model, batch).loss
            loss.backward()
        finally:
            modeling.PackedSegments.applies = original
        results.append((loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}))
    assert modeling.PackedSegments.applies(batch["attention_mask"], batch["input_ids"].shape[1], 0, 0,
                                           torch.zeros(1, device="cuda", dtype=torch.bfloat16), 0.0)
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=2e-2, rtol=2e-2)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=5e-2, rtol=5e-2, msg=name)
