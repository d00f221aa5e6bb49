"""The run record in every checkpoint, and resuming against it (utils/run_record.py): each checkpoint-N holds the
run's train_args.json, listed in its completion marker; a resume takes the run's settings for what its command line
leaves out, and refuses another base model or a changed training option before the model loads, naming both values.
train_deepspeed.py and train_qlora.py: their resume tests (test_deepspeed.py, test_qlora.py)."""
import json
import shutil

import pytest

from conftest import run_script
from utils.run_dirs import COMPLETE_MARKER

# Each final train_args.json adds these to the record its checkpoints hold.
FINAL_ONLY = ("metrics", "wall_seconds")


@pytest.fixture(scope="module")
def finished_run(tiny_model_dirs, sixteen_examples, tmp_path_factory):
    """A LoRA run of 4 steps on the tiny ChatGLM2, checkpoints at steps 2 and 4, every step logged; and its
    arguments."""
    run_dir = tmp_path_factory.mktemp("resume-check") / "run"
    args = [f"--model_dir={tiny_model_dirs['chatglm2-6b']}", f"--train_file={sixteen_examples}", "--dev_file=none",
            "--max_steps=4", "--save_steps=2", "--save_total_limit=0", "--per_device_train_batch_size=8",
            "--lora_r=8", "--learning_rate=1e-3", "--logging_steps=1", "--report_to=none"]
    run_script("train_trainer.py", f"--output_dir={run_dir}", *args, timeout=300)
    return run_dir, args


def interrupted_copy(run_dir, tmp_path):
    """The run as if killed after checkpoint-2 was saved."""
    copy = tmp_path / "interrupted"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "checkpoint-4")
    shutil.rmtree(copy / "adapter_model")
    return copy


def read_json(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_every_checkpoint_holds_the_run_record_before_its_marker(finished_run):
    run_dir, _ = finished_run
    final = read_json(run_dir / "adapter_model" / "train_args.json")
    assert final["model_version"] == "chatglm2-6b" and final["config"]["lora"]["r"] == 8
    for step in (2, 4):
        checkpoint = run_dir / f"checkpoint-{step}"
        record = read_json(checkpoint / "train_args.json")
        assert record == {key: value for key, value in final.items() if key not in FINAL_ONLY}
        # Written before the marker, which lists it with its size.
        assert read_json(checkpoint / COMPLETE_MARKER)["files"]["train_args.json"] == (checkpoint / "train_args.json").stat().st_size


def resume_with(finished_run, tmp_path, option, value):
    """A copy of the finished run cut back to checkpoint-2, resumed with --option=value in place of the run's own:
    (the copy, the completed process)."""
    run_dir, args = finished_run
    interrupted = interrupted_copy(run_dir, tmp_path)
    changed = [arg for arg in args if not arg.startswith(f"--{option}=")] + [f"--{option}={value}"]
    result = run_script("train_trainer.py", f"--output_dir={interrupted}", "--resume_from_checkpoint=auto", *changed,
                        check=False, timeout=300)
    return interrupted, result


def test_a_resume_onto_another_base_is_refused_before_the_model_loads(finished_run, tiny_model_dirs, tmp_path):
    v2, v3 = tiny_model_dirs["chatglm2-6b"], tiny_model_dirs["chatglm3-6b"]
    interrupted, result = resume_with(finished_run, tmp_path, "model_dir", v3)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --model_dir: the run in {interrupted / 'checkpoint-2'} was trained on chatglm2-6b ({v2}), this resume "
        f"gives chatglm3-6b ({v3}); start a new run, or resume without --model_dir (it takes the run's value)")
    assert "trainable params" not in result.stdout  # refused before the model loaded
    assert not (interrupted / "checkpoint-4").exists() and not (interrupted / "adapter_model").exists()


@pytest.mark.parametrize("option, recorded, given", [
    ("lora_r", "8", "16"),  # another shape: today "size mismatch" deep inside the optimizer's state
    ("method", "lora", "ptuning"),
    ("learning_rate", "0.001", "0.01"),  # the checkpoint's schedule would keep the old rate
    ("max_steps", "4", "10"),  # the schedule would end at step 4: the extra steps at learning rate 0
])
def test_a_resume_with_a_changed_training_option_is_refused_naming_both_values(finished_run, tmp_path, option, recorded, given):
    interrupted, result = resume_with(finished_run, tmp_path, option, given)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --{option}: the run in {interrupted / 'checkpoint-2'} was trained with {recorded}, this resume gives "
        f"{given}; start a new run, or resume without --{option} (it takes the run's value)")
    assert "trainable params" not in result.stdout


def test_a_resume_takes_the_run_settings_says_where_it_resumed_and_applies_new_log_frequencies(finished_run, tmp_path):
    """Resumed with only --logging_steps=2: the model, data, LoRA shape and schedule come from the run's record, the
    run ends as the uninterrupted one (same final record but for the session options), and it logs every 2 steps."""
    run_dir, _ = finished_run
    interrupted = interrupted_copy(run_dir, tmp_path)
    result = run_script("train_trainer.py", f"--output_dir={interrupted}", "--resume_from_checkpoint=auto",
                        "--logging_steps=2", timeout=300)
    assert f"resumed from {interrupted / 'checkpoint-2'} (step 2 of 4)" in result.stdout
    taken = next(line for line in result.stdout.splitlines() if line.startswith("resume: the run's settings from"))
    assert "--lora_r=8" in taken and "--max_steps=4" in taken and "--logging_steps" not in taken
    resumed, full = (read_json(folder / "adapter_model" / "train_args.json") for folder in (interrupted, run_dir))
    session = {"output_dir", "resume_from_checkpoint", "logging_steps"}
    assert {k: v for k, v in resumed["config"].items() if k not in session} == {k: v for k, v in full["config"].items() if k not in session}
    assert resumed["config"]["logging_steps"] == 2  # what was used is recorded
    assert resumed["metrics"]["train_loss"] == pytest.approx(full["metrics"]["train_loss"], rel=1e-4)
    log = read_json(interrupted / "checkpoint-4" / "trainer_state.json")["log_history"]
    assert [entry["step"] for entry in log if "loss" in entry] == [1, 2, 4]  # steps 1 and 2 by the first session


def test_a_checkpoint_without_a_record_is_resumed_with_a_note_and_a_changed_prefix_shape_is_one_line(tiny_model_dirs, sixteen_examples,
                                                                                                   tmp_path):
    """A checkpoint written before checkpoints held the run record: resumed unchecked (said so); a P-tuning prefix of
    another length in it is one line naming both shapes, not a RuntimeError of the copy."""
    run_dir = tmp_path / "run"
    args = [f"--model_dir={tiny_model_dirs['chatglm2-6b']}", f"--train_file={sixteen_examples}", "--dev_file=none",
            "--max_steps=2", "--save_steps=2", "--per_device_train_batch_size=8", "--report_to=none", "--method=ptuning",
            f"--output_dir={run_dir}"]
    run_script("train_trainer.py", *args, "--pre_seq_len=4", timeout=300)
    checkpoint = run_dir / "checkpoint-2"
    (checkpoint / "train_args.json").unlink(missing_ok=True)
    marker = read_json(checkpoint / COMPLETE_MARKER)
    marker["files"].pop("train_args.json", None)
    (checkpoint / COMPLETE_MARKER).write_text(json.dumps(marker))
    shutil.rmtree(run_dir / "prefix_model")
    result = run_script("train_trainer.py", *args, "--pre_seq_len=8", "--resume_from_checkpoint=auto", check=False, timeout=300)
    assert f"resume: {checkpoint} holds no train_args.json (a checkpoint of an older version)" in result.stdout
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --resume_from_checkpoint: {checkpoint} holds transformer.prefix_encoder.embedding.weight of shape [4, 128], "
        "this run trains it as [8, 128]; resume with the settings it was made with")
