"""train_qlora.py on tiny models, on CPU: bitsandbytes NF4 (double quantization) base weights, LoRA on every linear
layer; it overfits 16 real MSRA examples, the adapter reloads onto the 4-bit base and decodes the trained answers,
and a resumed run ends where an uninterrupted one does."""
import json

import pytest
import torch
from peft import PeftModel

from conftest import REPO_ROOT, VERSIONS, train_then_resume
from test_training import final_train_loss, logged_losses, run_script
from utils.dataset import get_prompt_format, read_instruction_records
from utils.generation import generate_answers
from utils.model_utils import load_model_and_tokenizer

LORA = ["--lora_r=32", "--lora_alpha=64", "--lora_dropout=0.0"]


def train_args_json(tmp_path, **values):
    """The shipped chatGLM_6B_QLoRA.json with a test-sized schedule."""
    args = json.loads((REPO_ROOT / "chatGLM_6B_QLoRA.json").read_text())
    args.update(per_device_train_batch_size=16, gradient_accumulation_steps=1, learning_rate=1e-2, warmup_steps=0,
                logging_steps=5, report_to=[], max_grad_norm=1.0)
    args.update(values)
    path = tmp_path / "train_args.json"
    path.write_text(json.dumps(args))
    return path


@pytest.mark.parametrize("version", VERSIONS)
def test_train_qlora_overfits_and_the_adapter_reproduces_the_answers(version, trainable_models, sixteen_examples, tmp_path):
    from transformers import BitsAndBytesConfig

    run_dir = tmp_path / "run"
    args_json = train_args_json(tmp_path, max_steps=60, save_steps=60, eval_steps=60)
    result = run_script("train_qlora.py", f"--train_args_json={args_json}", f"--model_dir={trainable_models[version]}",
                        f"--train_file={sixteen_examples}", f"--dev_file={sixteen_examples}",
                        f"--output_dir={run_dir}", "--dtype=fp32", *LORA)
    assert "trainable params" in result.stdout
    losses = logged_losses(run_dir, 60)
    assert losses[60] < 0.5 * losses[1], losses
    adapter_dir = run_dir / "adapter_model"
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    base, tokenizer = load_model_and_tokenizer(trainable_models[version], dtype="fp32", device="cpu", quantization_config=quantization)
    assert sum(type(module).__name__ == "Linear4bit" for module in base.modules()) == 4 * base.config.num_layers
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    records = read_instruction_records(sixteen_examples)
    answers = generate_answers(model, tokenizer, get_prompt_format(tokenizer, version), records, max_new_tokens=48, batch_size=16)
    expected = [tokenizer.decode(tokenizer.encode(r["answer"], add_special_tokens=False)).strip() for r in records]
    assert answers == expected


@pytest.mark.parametrize("version", VERSIONS)
def test_kbit_preparation_keeps_unquantized_weights_in_the_compute_dtype(version, trainable_models):
    from transformers import BitsAndBytesConfig

    from utils.train_utils import add_lora, prepare_kbit_model

    dtype = torch.bfloat16
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=dtype)
    model, tokenizer = load_model_and_tokenizer(trainable_models[version], dtype=dtype, device="cpu", quantization_config=quantization)
    model = prepare_kbit_model(model, dtype)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.get_input_embeddings().weight.dtype == dtype and model.get_output_embeddings().weight.dtype == dtype
    unquantized = [p for p in model.parameters() if type(p).__name__ != "Params4bit"]
    assert unquantized and all(p.dtype == dtype for p in unquantized)  # norms and biases too: no fp32 copies
    blocks = model.transformer.layers if version == "chatglm-6b" else model.transformer.encoder.layers
    assert all(block.gradient_checkpointing for block in blocks)
    assert blocks[0]._gradient_checkpointing_func.keywords == {"use_reentrant": False}

    lora = add_lora(model, {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all"})
    adapters = {name: p for name, p in lora.named_parameters() if "lora_" in name}
    assert len(adapters) == 2 * 4 * model.config.num_layers
    assert {name for name, p in lora.named_parameters() if p.requires_grad} == set(adapters)
    assert all(p.dtype == torch.float32 for p in adapters.values())
    # A training step reaches every adapter through the checkpointed blocks (lora_B starts at zero, so lora_A's
    # gradient is zero on the first step; lora_B's is not).
    lora.train()
    batch = tokenizer(["你好", "ChatGLM-6B是清华大学开源的模型"], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    outputs = lora(**batch, labels=labels)
    assert outputs.logits is None and outputs.loss.dtype == torch.float32 and torch.isfinite(outputs.loss)
    outputs.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in adapters.values())
    assert all(p.grad.abs().sum() > 0 for name, p in adapters.items() if "lora_B" in name)


def test_train_qlora_resumed_run_ends_at_the_uninterrupted_loss(trainable_models, sixteen_examples, tmp_path):
    args_json = train_args_json(tmp_path, max_steps=20, save_steps=10, eval_strategy="no", per_device_train_batch_size=4,
                                learning_rate=3e-3)
    common = [f"--train_args_json={args_json}", f"--model_dir={trainable_models['chatglm2-6b']}",
              f"--train_file={sixteen_examples}", "--dev_file=none.txt", "--dtype=fp32", *LORA]
    full, interrupted, _ = train_then_resume(run_script, "train_qlora.py", tmp_path, common, 10, 20)
    uninterrupted, resumed = logged_losses(full, 20), logged_losses(interrupted, 20)
    assert resumed[20] == pytest.approx(uninterrupted[20], rel=0.01)
    assert resumed[15] == pytest.approx(uninterrupted[15], rel=0.01)
    assert final_train_loss(interrupted) == pytest.approx(final_train_loss(full), rel=1e-3)  # over all 20 steps


def test_train_qlora_rejects_unknown_training_arguments(trainable_models, sixteen_examples, tmp_path):
    args_json = train_args_json(tmp_path, max_steps=1, learning_rat=1e-3)
    result = run_script(
        "train_qlora.py", f"--train_args_json={args_json}", f"--model_dir={trainable_models['chatglm2-6b']}",
        f"--train_file={sixteen_examples}", f"--output_dir={tmp_path / 'run'}", timeout=300, check=False,
    )
    assert result.returncode != 0 and "learning_rat" in result.stderr and str(args_json) in result.stderr
