"""The run folder as the hand-off (utils/adapters.py): later scripts read a run's base and lengths from its
train_args.json, refuse an adapter on a base it was not trained on, and the training scripts share one option
vocabulary (old names still accepted, with a note)."""
import ast
import json

import pytest

from conftest import REPO_ROOT, run_script
from utils.config_utils import flatten

V2_BASE_ERROR = "trained on chatglm2-6b"


@pytest.fixture(scope="module")
def short_run(trainable_models, sixteen_examples, tmp_path_factory):
    """A two-step train_trainer.py run on the tiny ChatGLM2 model with a non-default max_source_length."""
    run_dir = tmp_path_factory.mktemp("handoff") / "run"
    run_script("train_trainer.py", f"--model_dir={trainable_models['chatglm2-6b']}", f"--train_file={sixteen_examples}",
               "--dev_file=none", f"--output_dir={run_dir}", "--max_steps=2", "--save_steps=0", "--max_source_length=40",
               "--lora_r=4", "--report_to=none")
    return run_dir / "adapter_model"


def test_predict_takes_the_base_and_lengths_of_the_run(short_run, trainable_models, sixteen_examples, tmp_path):
    result = run_script("predict.py", f"--lora_path={short_run}", f"--dev_file={sixteen_examples}", "--num_samples=3",
                        "--max_new_tokens=4", f"--output_dir={tmp_path}")
    base = str(trainable_models["chatglm2-6b"])
    assert f"--model_dir={base}" in result.stdout and "--max_source_length=40" in result.stdout, result.stdout[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["model_dir"] == base and metrics["max_source_length"] == 40
    # A flag still overrides what the run recorded.
    result = run_script("predict.py", f"--lora_path={short_run}", f"--dev_file={sixteen_examples}", "--num_samples=3",
                        "--max_new_tokens=4", f"--output_dir={tmp_path}", "--max_source_length=64")
    assert json.loads((tmp_path / "metrics.json").read_text())["max_source_length"] == 64


@pytest.mark.parametrize("script, extra", [
    ("predict.py", ["--num_samples=2", "--max_new_tokens=2"]),
    ("chat_ner.py", []),
    ("web_demo.py", []),
    ("api_server.py", []),
    ("inference_test.py", ["--max_new_tokens=2"]),
    ("merge_lora_and_quantize.py", ["--output_path={tmp}/merged"]),
])
def test_every_script_refuses_an_adapter_on_another_base(script, extra, short_run, trainable_models, sixteen_examples, tmp_path):
    other = trainable_models["chatglm-6b"]
    args = [f"--lora_path={short_run}", f"--model_dir={other}", *(a.format(tmp=tmp_path) for a in extra)]
    if script == "predict.py":
        args += [f"--dev_file={sixteen_examples}", f"--output_dir={tmp_path}"]
    result = run_script(script, *args, check=False, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-2000:]
    assert V2_BASE_ERROR in output and str(other) in output and str(short_run) in output, output[-2000:]
    assert not (tmp_path / "merged").exists()


def read_defaults(script):
    """A script's DEFAULTS dict, read from its source (train_deepspeed.py trains when imported)."""
    tree = ast.parse((REPO_ROOT / script).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "DEFAULTS" for t in node.targets):
            return flatten(ast.literal_eval(node.value))
    raise AssertionError(f"{script} has no DEFAULTS")


# Keys whose defaults differ on purpose: QLoRA's smaller LoRA and its gradient checkpointing (4-bit on small GPUs),
# where each script finds its DeepSpeed config, and the QLoRA TrainingArguments file.
INTENDED = {("train_qlora.py", "lora_r"), ("train_qlora.py", "lora_alpha"), ("train_qlora.py", "gradient_checkpointing"),
            ("train_deepspeed.py", "deepspeed"), ("train_qlora.py", "train_args_json")}


def test_training_scripts_share_one_vocabulary_and_its_defaults():
    defaults = {script: read_defaults(script) for script in ("train_trainer.py", "train_deepspeed.py", "train_qlora.py")}
    trainer = defaults["train_trainer.py"]
    # The two full-featured scripts take the same options; QLoRA's are a subset of them (its TrainingArguments come
    # from --train_args_json) plus that file and the bit width of its bitsandbytes base.
    assert set(defaults["train_deepspeed.py"]) == set(trainer)
    assert set(defaults["train_qlora.py"]) - {"train_args_json", "quant_bits"} <= set(trainer)
    for script, flat in defaults.items():
        for key, value in flat.items():
            if (script, key) not in INTENDED and key in trainer:
                assert value == trainer[key], f"{script}: --{key} defaults to {value!r}, train_trainer.py to {trainer[key]!r}"


def test_old_option_names_still_work_with_a_note(trainable_models, tmp_path):
    result = run_script("inference_test.py", f"--model_path={trainable_models['chatglm2-6b']}", "--max_new_tokens=2",
                        "--prompt_len=16", f"--json={tmp_path / 'rows.json'}")
    assert "--model_path is now --model_dir" in result.stderr
    assert json.loads((tmp_path / "rows.json").read_text())[0]["new_tokens"] == 2
