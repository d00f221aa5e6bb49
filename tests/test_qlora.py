"""train_qlora.py on tiny models, on CPU: bitsandbytes NF4 (double quantization) base weights, LoRA on every linear
layer; it overfits 16 real MSRA examples, the adapter reloads onto the 4-bit base and decodes the trained answers,
and a resumed run ends where an uninterrupted one does."""
import json
import shutil
import subprocess
import sys

import pytest
from peft import PeftModel

from conftest import REPO_ROOT, VERSIONS
from test_training import logged_losses, run_script
from utils.dataset import get_prompt_format, read_instruction_records
from utils.generation import generate_answers
from utils.model_utils import load_model_and_tokenizer

LORA = ["--lora_rank=32", "--lora_alpha=64", "--lora_dropout=0.0"]


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
                        f"--train_data_path={sixteen_examples}", f"--eval_data_path={sixteen_examples}",
                        f"--output_dir={run_dir}", "--compute_dtype=fp32", *LORA)
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


def test_train_qlora_resumed_run_ends_at_the_uninterrupted_loss(trainable_models, sixteen_examples, tmp_path):
    args_json = train_args_json(tmp_path, max_steps=20, save_steps=10, eval_strategy="no", per_device_train_batch_size=4,
                                learning_rate=3e-3)
    common = [f"--train_args_json={args_json}", f"--model_dir={trainable_models['chatglm2-6b']}",
              f"--train_data_path={sixteen_examples}", "--eval_data_path=none.txt", "--compute_dtype=fp32", *LORA]
    full = tmp_path / "full"
    run_script("train_qlora.py", f"--output_dir={full}", *common)
    interrupted = tmp_path / "interrupted"
    shutil.copytree(full, interrupted)
    shutil.rmtree(interrupted / "checkpoint-20")
    shutil.rmtree(interrupted / "adapter_model")
    run_script("train_qlora.py", f"--output_dir={interrupted}", "--resume_from_checkpoint=auto", *common)
    uninterrupted, resumed = logged_losses(full, 20), logged_losses(interrupted, 20)
    assert resumed[20] == pytest.approx(uninterrupted[20], rel=0.01)
    assert resumed[15] == pytest.approx(uninterrupted[15], rel=0.01)


def test_train_qlora_rejects_unknown_training_arguments(trainable_models, sixteen_examples, tmp_path):
    args_json = train_args_json(tmp_path, max_steps=1, learning_rat=1e-3)
    result = subprocess.run(
        [sys.executable, "train_qlora.py", f"--train_args_json={args_json}", f"--model_dir={trainable_models['chatglm2-6b']}",
         f"--train_data_path={sixteen_examples}", f"--output_dir={tmp_path / 'run'}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0 and "learning_rat" in result.stderr and str(args_json) in result.stderr
