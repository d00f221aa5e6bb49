"""The run folder as the hand-off (utils/adapters.py): later scripts read a run's base and lengths from its
train_args.json, refuse an adapter on a base it was not trained on, and the training scripts share one option
vocabulary (old names still accepted, with a note)."""
import json
import os
import runpy
import shutil
from pathlib import Path

import pytest

from conftest import REPO_ROOT, SCRIPTS, run_script
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
    assert f"--model_dir={base}" in result.stdout and "--max_input_tokens=40" in result.stdout, result.stdout[-2000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["model_dir"] == base and metrics["max_source_length"] == 40
    # A flag still overrides what the run recorded.
    result = run_script("predict.py", f"--lora_path={short_run}", f"--dev_file={sixteen_examples}", "--num_samples=3",
                        "--max_new_tokens=4", f"--output_dir={tmp_path}", "--max_input_tokens=64")
    assert json.loads((tmp_path / "metrics.json").read_text())["max_source_length"] == 64


@pytest.mark.parametrize("script, extra", [
    ("predict.py", ["--num_samples=2", "--max_new_tokens=2"]),
    ("chat_ner.py", []),
    ("web_demo.py", []),
    ("api_server.py", []),
    ("inference_test.py", ["--max_new_tokens=2"]),
    ("merge_lora_and_quantize.py", ["--output_dir={tmp}/merged"]),
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
    """A script's DEFAULTS dict (importing a script runs nothing: its work is in main())."""
    return flatten(runpy.run_path(str(REPO_ROOT / script))["DEFAULTS"])


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


# ---- What was trained on what: a checkpoint-N, a run's model folder, a broken record, every kind of --lora_path ----

def one_error_line(result):
    """The stderr of a refused script: exactly one line, `error: ...`, and no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip() and "WARNING" not in line and "gemm_4bit" not in line]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    return lines[0]


def test_a_checkpoint_of_another_version_is_refused_naming_both(trained_adapter, trainable_models, sixteen_examples, tmp_path):
    """ChatGLM2-6B and ChatGLM3-6B have the same shapes: a checkpoint-N of a ChatGLM3 run is told apart by the base
    its adapter_config.json names (that folder's config.json, or where it is gone, its name) and by its run record."""
    run_dir = trained_adapter("chatglm3-6b")
    checkpoint = run_dir / "checkpoint-60"
    v2, v3 = trainable_models["chatglm2-6b"], trainable_models["chatglm3-6b"]
    predicted = run_script("predict.py", f"--model_dir={v2}", f"--lora_path={checkpoint}", f"--dev_file={sixteen_examples}",
                           "--num_samples=2", "--max_new_tokens=2", f"--output_dir={tmp_path / 'out'}", check=False)
    # Every checkpoint-N carries the run record, the first source of the model it was made for.
    expected = (f"error: the adapter {checkpoint} was trained on chatglm3-6b (read from {checkpoint / 'train_args.json'} "
                f"model_version) but the base {v2} is chatglm2-6b")
    assert one_error_line(predicted).startswith(expected) and not (tmp_path / "out").exists()
    merged = run_script("merge_lora_and_quantize.py", f"--model_dir={v2}", f"--lora_path={checkpoint}",
                        f"--output_dir={tmp_path / 'merged'}", check=False)
    assert one_error_line(merged).startswith(expected) and not (tmp_path / "merged").exists()

    from utils.adapters import check_lora_on_base, read_lora_path
    from utils.model_loading import ModelFolderError

    # Without a record (a checkpoint of an older version), the base its adapter_config.json names ...
    moved = tmp_path / "moved"
    shutil.copytree(checkpoint, moved)
    (moved / "train_args.json").unlink()
    with pytest.raises(ModelFolderError, match=rf"trained on chatglm3-6b \(read from .*moved/adapter_config.json "
                                               rf"base_model_name_or_path={v3}, that folder's config.json\) but the base .* is chatglm2-6b"):
        check_lora_on_base(read_lora_path(moved), v2)
    # ... with that base folder gone, the run record says it ...
    adapter_config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": str(tmp_path / "gone")}))
    shutil.copy(run_dir / "adapter_model" / "train_args.json", moved / "train_args.json")
    with pytest.raises(ModelFolderError, match=r"trained on chatglm3-6b \(read from .*moved/train_args.json model_version\) but the base .* is chatglm2-6b"):
        check_lora_on_base(read_lora_path(moved), v2)
    assert check_lora_on_base(read_lora_path(moved), v3) is None
    # ... and without a record, the base's name does.
    (moved / "train_args.json").unlink()
    (moved / "adapter_config.json").write_text(json.dumps({**adapter_config, "base_model_name_or_path": "/gone/chatglm3-6b"}))
    with pytest.raises(ModelFolderError, match=r"chatglm3-6b \(read from .*base_model_name_or_path=/gone/chatglm3-6b, the name"):
        check_lora_on_base(read_lora_path(moved), v2)
    assert check_lora_on_base(read_lora_path(moved), v3) is None


@pytest.fixture(scope="module")
def freeze_run(trainable_models, sixteen_examples, tmp_path_factory):
    """A two-step freeze run on the tiny ChatGLM2 with a checkpoint, recording max_source_length 40."""
    run_dir = tmp_path_factory.mktemp("freeze") / "run"
    run_script("train_trainer.py", f"--model_dir={trainable_models['chatglm2-6b']}", f"--train_file={sixteen_examples}",
               "--dev_file=none", f"--output_dir={run_dir}", "--method=freeze", "--freeze_trainable_layers=1",
               "--max_steps=2", "--save_steps=2", "--max_source_length=40", "--report_to=none")
    return run_dir


@pytest.fixture
def data_set_runs():
    """checkpoint/<a data set of this test>/ in the checkout (where predict.py and chat_ner.py look for the newest
    run), removed afterwards."""
    root = REPO_ROOT / "checkpoint"
    made_root = not root.exists()
    name = f"handoff_test_{os.getpid()}"
    yield name, root / name
    shutil.rmtree(root / name, ignore_errors=True)
    if made_root and not any(root.iterdir()):
        root.rmdir()


def test_a_run_model_folder_takes_no_other_runs_adapter_and_keeps_their_results(freeze_run, short_run, sixteen_examples,
                                                                                 data_set_runs):
    data_name, runs = data_set_runs
    other = runs / "train_trainer"
    shutil.copytree(short_run, other / "adapter_model")
    (other / "metrics.json").write_text("the other run's results")
    model_folder = freeze_run / "model"
    common = [f"--data_name={data_name}", f"--dev_file={sixteen_examples}", "--num_samples=2", "--max_new_tokens=2"]

    # The freeze run's model folder is scored alone, with its run's max_source_length, into its own run folder.
    result = run_script("predict.py", f"--model_dir={model_folder}", *common)
    assert "[model]" in result.stdout and "[adapter]" not in result.stdout, result.stdout[-2000:]
    assert f"--lora_path=none: {model_folder} is the model folder of a run" in result.stdout
    assert (other / "metrics.json").read_text() == "the other run's results" and not (other / "predictions.jsonl").exists()
    metrics = json.loads((freeze_run / "metrics.json").read_text())
    assert metrics["lora_path"] is None and metrics["model_dir"] == str(model_folder) and metrics["max_source_length"] == 40
    assert len((freeze_run / "predictions.jsonl").read_text().splitlines()) == 2
    chat = SCRIPTS.run(["chat_ner.py", f"--model_dir={model_folder}", f"--data_name={data_name}"], input="", timeout=300)
    assert chat.returncode == 0 and f"{model_folder} alone" in chat.stdout and str(other) not in chat.stdout, chat.stdout[-2000:]

    # Without --model_dir the newest run of the data set is taken, and the choice is said.
    result = run_script("predict.py", *common)
    adapter = Path("checkpoint", data_name, "train_trainer", "adapter_model")
    assert f"--lora_path: the newest run of {data_name}: {adapter} (written " in result.stdout, result.stdout[-2000:]
    assert "--lora_path=none for the base alone" in result.stdout
    assert json.loads((other / "metrics.json").read_text())["lora_path"] == str(adapter)


@pytest.mark.parametrize("record, field", [
    ([], "expected a JSON object (the record of a training run), got []"),
    (None, "expected a JSON object (the record of a training run), got null"),
    ({"config": {"model_dir": 5}}, "field 'config.model_dir': expected a string or null, got 5"),
    ({"config": {"max_source_length": "abc"}}, "field 'config.max_source_length': expected an integer or null, got \"abc\""),
])
def test_a_broken_run_record_is_one_line_naming_the_file_and_field(record, field, short_run, sixteen_examples, tmp_path):
    adapter = tmp_path / "adapter_model"
    shutil.copytree(short_run, adapter)
    (adapter / "train_args.json").write_text(json.dumps(record))
    result = run_script("predict.py", f"--lora_path={adapter}", f"--dev_file={sixteen_examples}", f"--output_dir={tmp_path}",
                        check=False)
    assert one_error_line(result) == f"error: {adapter / 'train_args.json'}: {field}"


def lora_path_kinds(tmp_path, trainable_models, freeze_run):
    """--lora_path values that are no adapter, and the start of what each is refused with."""
    (tmp_path / "file").write_text("not an adapter")
    (tmp_path / "empty").mkdir()
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    return {
        "missing": (tmp_path / "missing", "no such folder"),
        "file": (tmp_path / "file", "a file, not a folder"),
        "empty": (tmp_path / "empty", "an empty folder"),
        "loop": (tmp_path / "loop", "a symbolic link that loops"),
        "model folder": (trainable_models["chatglm2-6b"], "a model folder (config.json without pre_seq_len), not an adapter"),
        "freeze checkpoint": (freeze_run / "checkpoint-2", "a checkpoint of a freeze or full run"),
    }


@pytest.mark.parametrize("script, kind", [
    ("inference_test.py", "missing"), ("inference_test.py", "file"), ("inference_test.py", "model folder"),
    ("inference_test.py", "loop"), ("predict.py", "freeze checkpoint"), ("chat_ner.py", "empty"),
    ("merge_lora_and_quantize.py", "loop"), ("web_demo.py", "model folder"), ("api_server.py", "file"),
])
def test_what_is_no_adapter_is_refused_before_anything_loads(script, kind, trainable_models, freeze_run, sixteen_examples, tmp_path):
    lora_path, refusal = lora_path_kinds(tmp_path, trainable_models, freeze_run)[kind]
    args = [f"--model_dir={trainable_models['chatglm2-6b']}", f"--lora_path={lora_path}"]
    args += {"predict.py": [f"--dev_file={sixteen_examples}", f"--output_dir={tmp_path / 'out'}"], "inference_test.py": ["--max_new_tokens=2"],
             "merge_lora_and_quantize.py": [f"--output_dir={tmp_path / 'merged'}"]}.get(script, [])
    result = SCRIPTS.run([script, *args], input="", timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"--lora_path={lora_path}: {refusal}" in result.stderr, result.stderr[-3000:]
    assert "| model |" not in result.stdout and not (tmp_path / "out").exists() and not (tmp_path / "merged").exists()


def test_a_model_folder_that_does_not_exist_is_named_as_such(sixteen_examples, tmp_path):
    result = run_script("predict.py", f"--model_dir={tmp_path / 'nowhere'}", "--lora_path=none", f"--dev_file={sixteen_examples}",
                        check=False)
    assert one_error_line(result) == f"error: --model_dir={tmp_path / 'nowhere'}: no such folder"
