"""The training scripts on tiny models (CPU): they overfit 16 real MSRA examples, the adapter reloads with PEFT
and decodes the trained answers, and a resumed run ends where an uninterrupted one does."""
import json

import pytest
import torch
from peft import PeftModel

from conftest import OVERFIT, VERSIONS, run_script, train_then_resume  # noqa: F401  (OVERFIT: used by other test files)
from utils.generation import generate_answers
from utils.model_loading import load_model_and_tokenizer
from utils.prompts import get_prompt_format
from utils.records import read_instruction_records

def logged_losses(run_dir, checkpoint_step):
    state = json.loads((run_dir / f"checkpoint-{checkpoint_step}" / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


def final_train_loss(run_dir):
    return json.loads((run_dir / "adapter_model" / "train_args.json").read_text())["metrics"]["train_loss"]


def saved_model_eval_loss(model_dir, data_file, batch_size=4):
    """Eval loss of a saved model folder on data_file as the training scripts compute it (transformers' Trainer's
    figure): each batch's mean over its target tokens, averaged over the examples; batches of batch_size consecutive
    examples (per process, times the processes)."""
    from utils.dataset import InstructionDataset, PaddingCollator

    model, tokenizer = load_model_and_tokenizer(model_dir, dtype="fp32", device="cpu")
    data = InstructionDataset(data_file, tokenizer, model.model_version, 256, 128, False)
    collate = PaddingCollator(tokenizer.pad_token_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = [data[i] for i in range(start, min(start + batch_size, len(data)))]
            total += model(**collate(batch)).loss.item() * len(batch)
            count += len(batch)
    return total / count


def assert_full_model_folder(run_dir, base_dir, data_file, script):
    """--method=full wrote run_dir/model/, a model folder that loads like the base, with every weight trained, whose
    eval loss on data_file is the one the run logged last; and no adapter."""
    from safetensors.torch import load_file

    model_dir = run_dir / "model"
    assert not (run_dir / "adapter_model").exists()
    train_args = json.loads((model_dir / "train_args.json").read_text())
    assert train_args["script"] == script and train_args["config"]["method"] == "full"
    trained, base = load_file(str(model_dir / "model.safetensors")), load_file(str(base_dir / "model.safetensors"))
    assert trained.keys() == base.keys()
    changed = [name for name in base if not torch.equal(trained[name], base[name])]
    unchanged = sorted(set(base) - set(changed) - {name for name in base if name.endswith("inv_freq")})
    assert not unchanged, unchanged
    # Both scripts give the Trainer's figure: consecutive batches of 4 x world_size (normalised over the target tokens
    # of all processes' batches).
    world_size = train_args["world_size"]
    assert saved_model_eval_loss(model_dir, data_file, 4 * world_size) == pytest.approx(train_args["metrics"]["eval_loss"],
                                                                                        rel=1e-4)
    return train_args


def assert_adapter_reproduces_answers(model_dir, adapter_dir, data_file):
    base, tokenizer = load_model_and_tokenizer(model_dir, dtype="fp32", device="cpu")
    version = base.model_version
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    records = read_instruction_records(data_file)
    answers = generate_answers(model, tokenizer, get_prompt_format(tokenizer, version), records, max_new_tokens=48, batch_size=16)
    # The reference as the tokenizer can write it (ChatGLM-6B folds full-width punctuation, NFKC).
    expected = [tokenizer.decode(tokenizer.encode(r["answer"], add_special_tokens=False)).strip() for r in records]
    matches = sum(a == e for a, e in zip(answers, expected))
    assert matches == len(records), list(zip(answers, expected))


@pytest.mark.parametrize("version", VERSIONS)
def test_train_trainer_overfits_and_the_adapter_reproduces_the_answers(version, trainable_models, trained_adapter, sixteen_examples):
    run_dir = trained_adapter(version)
    adapter_dir = run_dir / "adapter_model"
    assert {"adapter_config.json", "adapter_model.safetensors", "train_args.json"} <= {p.name for p in adapter_dir.iterdir()}
    assert (run_dir / "loss.png").stat().st_size > 1000
    losses = logged_losses(run_dir, 60)
    assert losses[60] < 0.5 * losses[1], losses
    train_args = json.loads((adapter_dir / "train_args.json").read_text())
    assert train_args["model_version"] == version and train_args["data"]["train"]["samples"] == 16
    assert_adapter_reproduces_answers(trainable_models[version], adapter_dir, sixteen_examples)


def test_train_trainer_resumed_run_ends_at_the_uninterrupted_loss(trainable_models, sixteen_examples, tmp_path):
    common = [f"--model_dir={trainable_models['chatglm2-6b']}", f"--train_file={sixteen_examples}", "--dev_file=none",
              "--max_steps=30", "--save_steps=15", *OVERFIT, "--per_device_train_batch_size=4", "--learning_rate=3e-3",
              "--lora_dropout=0.1"]
    # An interruption after step 15: only checkpoint-15 survives.
    full, interrupted, _ = train_then_resume(run_script, "train_trainer.py", tmp_path, common, 15, 30)
    uninterrupted, resumed = logged_losses(full, 30), logged_losses(interrupted, 30)
    assert resumed[30] == pytest.approx(uninterrupted[30], rel=0.01)
    assert resumed[20] == pytest.approx(uninterrupted[20], rel=0.01)
    # train_loss covers all 30 steps, not only the 15 of the resumed part.
    assert final_train_loss(interrupted) == pytest.approx(final_train_loss(full), rel=1e-3)


def test_train_trainer_never_overwrites_a_finished_run(trainable_models, sixteen_examples, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "adapter_model").mkdir()
    result = run_script("train_trainer.py", f"--model_dir={trainable_models['chatglm2-6b']}", f"--train_file={sixteen_examples}",
                        f"--output_dir={run_dir}", "--max_steps=1", check=False, timeout=300)
    assert result.returncode != 0 and "already holds a run" in result.stderr
    assert (run_dir / "adapter_model").is_dir()


def test_train_trainer_full_fine_tuning_writes_a_model_folder(trainable_models, sixteen_examples, tmp_path):
    # ChatGLM-6B: its output layer is tied to the word embeddings, which the folder must store apart and load back.
    run_dir, model_dir = tmp_path / "run", trainable_models["chatglm-6b"]
    run_script("train_trainer.py", f"--model_dir={model_dir}", f"--train_file={sixteen_examples}", f"--dev_file={sixteen_examples}",
               f"--output_dir={run_dir}", "--method=full", "--max_steps=6", "--save_steps=6", "--eval_steps=6",
               "--learning_rate=1e-3", "--warmup_steps=0", "--per_device_train_batch_size=8", "--logging_steps=1", "--report_to=none")
    train_args = assert_full_model_folder(run_dir, model_dir, sixteen_examples, "train_trainer.py")
    losses = logged_losses(run_dir, 6)
    assert losses[6] < 0.85 * losses[1], losses
    # Without DeepSpeed the trained weights are the fp32 master copy (on CPU the compute is fp32 as well).
    assert train_args["deepspeed_config"] is None and json.loads((run_dir / "model" / "config.json").read_text())["torch_dtype"] == "float32"



def test_a_diverging_run_stops_with_a_clear_error_and_writes_no_adapter(trainable_models, sixteen_examples, tmp_path):
    # An absurd learning rate drives the LoRA weights to inf and then NaN within a few steps.
    run_dir = tmp_path / "run"
    result = run_script("train_trainer.py", f"--model_dir={trainable_models['chatglm2-6b']}", f"--train_file={sixteen_examples}",
                        f"--output_dir={run_dir}", "--max_steps=20", "--logging_steps=1", "--save_steps=0",
                        "--learning_rate=1e30", "--warmup_steps=0", check=False, timeout=300)
    assert result.returncode != 0
    assert "error: training diverged at step" in result.stderr and "lower --learning_rate" in result.stderr
    assert not (run_dir / "adapter_model").exists()
