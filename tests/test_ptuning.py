"""P-tuning v2 (--method=ptuning): only the prefix encoder trains; the run writes the prefix as the official ptuning
scripts do (the encoder's weights under transformer.prefix_encoder.*, config.json with pre_seq_len), in safetensors;
every inference script takes it by --lora_path; an official checkpoint (pytorch_model.bin) loads the same way."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import VERSIONS, run_script
from test_training import logged_losses
from utils.dataset import InstructionDataset, PaddingCollator
from utils.adapters import adapter_disabled, load_model_with_adapter
from utils.model_loading import ModelFolderError, load_model_and_tokenizer

PRE_SEQ_LEN = 16
STEPS = 24


@pytest.fixture(scope="module")
def ptuning_runs(trainable_models, sixteen_examples, tmp_path_factory):
    """version -> run folder of train_trainer.py --method=ptuning on the 16 examples (evaluated on them at the end)."""
    runs = {}

    def get(version):
        if version not in runs:
            run_dir = tmp_path_factory.mktemp(f"ptuning-{version}") / "run"
            run_script("train_trainer.py", f"--model_dir={trainable_models[version]}", f"--train_file={sixteen_examples}",
                       f"--dev_file={sixteen_examples}", f"--output_dir={run_dir}", "--method=ptuning",
                       f"--pre_seq_len={PRE_SEQ_LEN}", "--learning_rate=0.3", "--warmup_steps=0", f"--max_steps={STEPS}",
                       f"--save_steps={STEPS}", "--eval_steps=1000", "--per_device_train_batch_size=16", "--logging_steps=4",
                       "--report_to=none")
            runs[version] = run_dir
        return runs[version]

    return get


def mean_loss(model, tokenizer, version, data_file):
    """What the run's final evaluation computed: the mean of the losses of batches of 4 (per_device_eval_batch_size)
    in the file's order."""
    examples = InstructionDataset(data_file, tokenizer, version, max_source_length=256, max_target_length=128).examples
    collate = PaddingCollator(tokenizer.pad_token_id)
    with torch.no_grad():
        batches = [{k: v.to(model.device) for k, v in collate(examples[i:i + 4]).items()} for i in range(0, len(examples), 4)]
        losses = [model(**batch).loss.item() for batch in batches]
    return sum(losses) / len(losses)


@pytest.mark.parametrize("version", VERSIONS)
def test_ptuning_trains_the_prefix_only_and_the_checkpoint_reloads_the_trained_model(version, ptuning_runs, trainable_models,
                                                                                     sixteen_examples):
    run_dir = ptuning_runs(version)
    prefix_dir = run_dir / "prefix_model"
    assert {"config.json", "model.safetensors", "train_args.json"} == {p.name for p in prefix_dir.iterdir()}
    config = json.loads((prefix_dir / "config.json").read_text())
    assert config["pre_seq_len"] == PRE_SEQ_LEN and config["prefix_projection"] is False
    weights = load_file(str(prefix_dir / "model.safetensors"))
    assert list(weights) == ["transformer.prefix_encoder.embedding.weight"]
    assert weights["transformer.prefix_encoder.embedding.weight"].dtype == torch.float32  # trained in fp32
    # A checkpoint of the run holds the prefix too, not the frozen weights.
    assert set(load_file(str(run_dir / f"checkpoint-{STEPS}" / "model.safetensors"))) == set(weights)
    train_args = json.loads((prefix_dir / "train_args.json").read_text())
    assert train_args["config"]["method"] == "ptuning" and train_args["model_version"] == version
    losses = logged_losses(run_dir, STEPS)
    assert losses[STEPS] < 0.95 * losses[1], losses  # falling (ChatGLM-6B, the slowest here: 13.8 -> 12.9)

    # Reloaded (the base built with the prefix, then the trained encoder): the run's final evaluation loss again,
    # and a different one with the prefix switched off.
    model, tokenizer = load_model_with_adapter(trainable_models[version], prefix_dir, dtype="fp32", device="cpu")
    assert model.transformer.pre_seq_len == PRE_SEQ_LEN
    reloaded = mean_loss(model, tokenizer, version, sixteen_examples)
    assert reloaded == pytest.approx(train_args["metrics"]["eval_loss"], rel=1e-4)
    with adapter_disabled(model):
        without = mean_loss(model, tokenizer, version, sixteen_examples)
    base, _ = load_model_and_tokenizer(trainable_models[version], dtype="fp32", device="cpu")
    assert without == pytest.approx(mean_loss(base, tokenizer, version, sixteen_examples), rel=1e-5)
    assert reloaded < without


def test_an_official_ptuning_checkpoint_loads_with_the_same_logits(ptuning_runs, trainable_models, tmp_path):
    """THUDM's ptuning/ scripts save pytorch_model.bin (the prefix encoder under transformer.prefix_encoder.*) next to
    the model's config.json; that folder loads by --lora_path as our own does and gives the same logits."""
    ours = ptuning_runs("chatglm2-6b") / "prefix_model"
    official = tmp_path / "checkpoint-3000"
    official.mkdir()
    shutil.copy(ours / "config.json", official / "config.json")
    torch.save(load_file(str(ours / "model.safetensors")), official / "pytorch_model.bin")
    (official / "training_args.bin").write_bytes(b"not read")
    ids = torch.tensor([[64790, 64792, 30910, 54761, 31211, 39701, 30992]])
    logits = []
    for folder in (ours, official):
        model, _ = load_model_with_adapter(trainable_models["chatglm2-6b"], folder, dtype="fp32", device="cpu")
        with torch.no_grad():
            logits.append(model(input_ids=ids).logits)
    torch.testing.assert_close(logits[1], logits[0], atol=0, rtol=0)


def test_a_prefix_for_another_base_or_with_foreign_weights_is_refused(ptuning_runs, trainable_models, tmp_path):
    ours = ptuning_runs("chatglm2-6b") / "prefix_model"
    with pytest.raises(ModelFolderError, match=r"made for chatglm2-6b \(read from .*train_args.json model_version\) but the base .* is chatglm-6b"):
        load_model_with_adapter(trainable_models["chatglm-6b"], ours, device="cpu")
    mixed = tmp_path / "mixed"
    shutil.copytree(ours, mixed)
    (mixed / "model.safetensors").unlink()
    torch.save({**load_file(str(ours / "model.safetensors")), "transformer.encoder.final_layernorm.weight": torch.ones(64)},
               mixed / "pytorch_model.bin")
    with pytest.raises(ModelFolderError, match="expected only the prefix encoder's weights"):
        load_model_with_adapter(trainable_models["chatglm2-6b"], mixed, device="cpu")


def test_predict_takes_the_prefix_by_lora_path_and_scores_the_base_without_it(ptuning_runs, sixteen_examples):
    run_dir = ptuning_runs("chatglm3-6b")
    out = run_dir / "predict"
    run_script("predict.py", f"--lora_path={run_dir / 'prefix_model'}", f"--dev_file={sixteen_examples}", "--before_after",
               f"--output_dir={out}", "--max_new_tokens=16")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["lora_path"] == str(run_dir / "prefix_model") and {"base", "adapter"} <= set(metrics)
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(predictions) == 16


def test_train_deepspeed_trains_a_prefix_and_writes_it_in_the_official_layout(trainable_models, sixteen_examples, tmp_path):
    """train_deepspeed.py (one plain process, DeepSpeed on CPU): the same P-tuning checkpoint; DeepSpeed's state in
    checkpoint-N holds the trained prefix only (frozen weights excluded)."""
    run_dir = tmp_path / "run"
    run_script("train_deepspeed.py", f"--model_dir={trainable_models['chatglm2-6b']}", f"--train_file={sixteen_examples}",
               "--dev_file=none", f"--output_dir={run_dir}", "--method=ptuning", f"--pre_seq_len={PRE_SEQ_LEN}",
               "--learning_rate=0.3", "--warmup_steps=0", "--max_steps=12", "--save_steps=12",
               "--per_device_train_batch_size=16", "--logging_steps=4")
    losses = logged_losses(run_dir, 12)
    assert losses[12] < losses[1] - 0.2, losses  # the same full batch each step: without training it stays put
    for folder in (run_dir / "prefix_model", run_dir / "checkpoint-12"):
        assert list(load_file(str(folder / "model.safetensors"))) == ["transformer.prefix_encoder.embedding.weight"], folder
        assert json.loads((folder / "config.json").read_text())["pre_seq_len"] == PRE_SEQ_LEN
    model, _ = load_model_with_adapter(trainable_models["chatglm2-6b"], run_dir / "prefix_model", dtype="fp32", device="cpu")
    assert model.transformer.pre_seq_len == PRE_SEQ_LEN


def test_merge_writes_a_folder_whose_config_carries_the_prefix_and_inference_test_takes_it(ptuning_runs, trainable_models, tmp_path):
    run_dir = ptuning_runs("chatglm2-6b")
    merged = tmp_path / "merged"
    run_script("merge_lora_and_quantize.py", f"--lora_path={run_dir / 'prefix_model'}", f"--output_dir={merged}", "--dtype=fp32")
    assert json.loads((merged / "config.json").read_text())["pre_seq_len"] == PRE_SEQ_LEN  # the base from train_args.json
    ids = torch.tensor([[64790, 64792, 30910, 54761, 31211, 39701, 30992]])
    folder_model, _ = load_model_and_tokenizer(merged, dtype="fp32", device="cpu")
    prefixed, _ = load_model_with_adapter(trainable_models["chatglm2-6b"], run_dir / "prefix_model", dtype="fp32", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(folder_model(input_ids=ids).logits, prefixed(input_ids=ids).logits, atol=0, rtol=0)
    result = run_script("inference_test.py", f"--lora_path={run_dir / 'prefix_model'}", "--max_new_tokens=4", "--prompt_len=16")
    assert "+ P-tuning prefix" in result.stdout, result.stdout[-2000:]


@pytest.mark.parametrize("bits", [8, 4])
def test_ptuning_on_a_quantized_base_gets_the_gradients_and_keeps_no_dequantized_weights(trainable_models, bits, monkeypatch):
    """The official P-tuning also trains on an int4 base. Our int8/int4 layers pass the gradient to their inputs with
    the weight dequantized again in the backward pass (DequantizingLinear): the prefix gets the gradient of the plain
    dequantize-then-matmul path, and what autograd keeps for the backward pass is smaller by the float weights."""
    model, tokenizer = load_model_and_tokenizer(trainable_models["chatglm2-6b"], dtype="fp32", device="cpu",
                                                pre_seq_len=PRE_SEQ_LEN)
    model.quantize(bits)
    quantization = __import__(type(model).__module__.rsplit(".", 1)[0] + ".quantization", fromlist=["DequantizingLinear"])
    batch = {"input_ids": torch.tensor([[64790, 64792, 30910, 54761, 31211, 39701, 30992, 2]] * 2)}
    batch["labels"] = batch["input_ids"].clone()
    model.train()

    def gradient_and_saved_bytes():
        model.zero_grad()
        torch.manual_seed(0)  # the prefix dropout draws the same mask in both passes
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t):
            loss = model(**batch).loss
        loss.backward()
        return model.transformer.prefix_encoder.embedding.weight.grad.clone(), sum(saved)

    grad, saved = gradient_and_saved_bytes()
    assert grad.abs().sum() > 0
    plain = quantization.QuantizedLinear.forward

    def dequantize_then_matmul(self, x):
        return torch.nn.functional.linear(x, self.dequantized_weight(x.dtype), self.bias)

    monkeypatch.setattr(quantization.QuantizedLinear, "forward", dequantize_then_matmul)
    reference, reference_saved = gradient_and_saved_bytes()
    monkeypatch.setattr(quantization.QuantizedLinear, "forward", plain)
    torch.testing.assert_close(grad, reference, atol=1e-6, rtol=1e-5)
    blocks = set(quantization.block_linear_names(model))
    float_weights = sum(layer.dequantized_weight().numel() * 4 for name, layer in quantization.quantized_layers(model)
                        if name in blocks)
    # The plain path keeps a float copy of each block weight whose input needs a gradient (all but the first block's
    # query_key_value); ours keeps the stored int8 / int4 weights (counted here, though they are the parameters). The
    # int8 output layer runs in the loss's checkpointed chunks, where neither path keeps its weight.
    assert reference_saved - saved >= 0.5 * float_weights, (reference_saved, saved, float_weights)
