"""Run folders that survive crashes (utils/run_dirs.py): which checkpoints count as complete, rotation, overwriting a
run only once the new one has loaded its data, staging folders of dead writers cleaned up, folders swapped whole; and
the scripts' one-line errors."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO_ROOT, run_script
from utils import run_dirs
from utils.run_dirs import staged_folder


def fake_checkpoint(run_dir, step, complete=True):
    folder = run_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "optimizer.pt").write_bytes(b"x" * 1000)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if complete:
        run_dirs.mark_complete(folder, {"train_loss_sum": float(step)})
    return folder


def test_auto_resumes_from_the_newest_complete_checkpoint_and_says_what_it_skipped(tmp_path, capsys):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4)
    fake_checkpoint(tmp_path, 6, complete=False)  # killed before its marker
    cut = fake_checkpoint(tmp_path, 8)
    (cut / "optimizer.pt").write_bytes(b"x" * 10)  # marked, then cut short (a disk that lost the end of a file)
    fake_checkpoint(tmp_path, 10)
    (tmp_path / "checkpoint-10" / "trainer_state.json").unlink()
    assert run_dirs.find_resume_checkpoint(tmp_path, "auto") == tmp_path / "checkpoint-4"
    out = capsys.readouterr().out
    assert "checkpoint-10 (trainer_state.json is missing)" in out
    assert "checkpoint-8 (optimizer.pt has 10 bytes, not the 1000 it was saved with)" in out
    assert "checkpoint-6 (no checkpoint_complete.json: its save was cut off)" in out
    assert run_dirs.checkpoint_record(tmp_path / "checkpoint-4")["train_loss_sum"] == 4.0
    # A path given by hand must be complete too.
    with pytest.raises(run_dirs.CheckpointError, match="checkpoint-6: not a complete checkpoint .no checkpoint_complete.json"):
        run_dirs.find_resume_checkpoint(tmp_path, str(tmp_path / "checkpoint-6"))
    # Rotation keeps the newest complete ones and removes every incomplete one.
    fake_checkpoint(tmp_path, 12)
    run_dirs.rotate_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-12", "checkpoint-4"]
    # No complete checkpoint at all: a clear error naming the incomplete ones.
    empty = tmp_path / "other"
    fake_checkpoint(empty, 3, complete=False)
    with pytest.raises(run_dirs.CheckpointError, match=r"no complete checkpoint-N folder in .*other; incomplete: checkpoint-3"):
        run_dirs.find_resume_checkpoint(empty, "auto")


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_replace_folder_swaps_a_whole_folder_in(exchange, tmp_path, monkeypatch):
    if not exchange:
        monkeypatch.setattr(run_dirs, "_exchange", lambda first, second: False)
    final, new = tmp_path / "adapter_model", tmp_path / "new"
    final.mkdir()
    (final / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    run_dirs.replace_folder(new, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_model"]
    assert [p.name for p in final.iterdir()] == ["new.txt"]


def test_a_staging_folder_of_a_killed_writer_is_removed_by_the_next_one_and_a_live_ones_is_kept(tmp_path):
    output = tmp_path / "merged"
    # One writer is killed (SIGKILL) inside its staging folder; another is alive and holds its lock.
    writer = textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from utils.run_dirs import staged_folder
        with staged_folder({str(output)!r}) as staging:
            (staging / "model.safetensors").write_bytes(b"x" * 100)
            print(staging.name, flush=True)
            if sys.argv[1] == "die":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)
    """)
    dead = subprocess.run([sys.executable, "-c", writer, "die"], capture_output=True, text=True, timeout=60)
    assert dead.returncode == -signal.SIGKILL
    dead_staging = tmp_path / dead.stdout.strip()
    assert dead_staging.is_dir()
    alive = subprocess.Popen([sys.executable, "-c", writer, "live"], stdout=subprocess.PIPE, text=True)
    try:
        # The next writer removes the dead one's folder and its lock, and says so.
        assert alive.stdout.readline().strip() == f"removed {dead_staging}: a staging folder left by an interrupted run"
        live_staging = tmp_path / alive.stdout.readline().strip()
        assert not dead_staging.exists() and not dead_staging.with_name(dead_staging.name + ".lock").exists()
        with staged_folder(output) as staging:
            (staging / "config.json").write_text("{}")
        assert live_staging.is_dir()
        assert [p.name for p in output.iterdir()] == ["config.json"]
    finally:
        alive.kill()
        alive.wait()
    # Once its writer is gone, the next writer removes that one too.
    with staged_folder(output, replace=True):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_run_folder_prepare_keeps_the_last_finished_run_until_the_new_one_finishes(tmp_path):
    run_dir, previous = tmp_path / "run", tmp_path / "run.previous"
    (run_dir / "adapter_model").mkdir(parents=True)
    (run_dir / "adapter_model" / "old").write_text("old adapter")
    with pytest.raises(run_dirs.OutputDirError, match="already holds a run"):
        run_dirs.RunFolder(run_dir, resume=None, overwrite=False).prepare()
    run_dirs.RunFolder(run_dir, resume=None, overwrite=True).prepare()
    assert (previous / "adapter_model" / "old").read_text() == "old adapter" and list(run_dir.iterdir()) == []
    # The new run is killed before it finishes, and overwritten again: its leftovers go, the finished run stays.
    (run_dir / "checkpoint-3").mkdir()
    run_dirs.RunFolder(run_dir, resume=None, overwrite=True).prepare()
    assert list(run_dir.iterdir()) == [] and (previous / "adapter_model" / "old").is_file()
    run_dirs.RunFolder(run_dir).finish()
    assert not previous.exists()


def test_overwrite_checks_the_data_first_and_errors_are_one_line(trainable_models, sixteen_examples, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "adapter_model").mkdir(parents=True)
    (run_dir / "adapter_model" / "adapter_model.safetensors").write_bytes(b"the old adapter")
    (run_dir / "notes.txt").write_text("mine")
    bad = tmp_path / "train.txt"
    bad.write_text(sixteen_examples.read_text(encoding="utf-8") + '{"instruct": 1}\n', encoding="utf-8")
    args = ["train_trainer.py", f"--model_dir={trainable_models['chatglm2-6b']}", f"--train_file={bad}",
            "--dev_file=none", f"--output_dir={run_dir}", "--overwrite_output_dir=true", "--max_steps=2", "--save_steps=0",
            "--report_to=none"]
    result = run_script(*args, timeout=300, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {bad}:17: field 'instruct': expected a string, got int (--skip_bad_lines skips such lines and counts them)")
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in run_dir.iterdir()) == ["adapter_model", "notes.txt"] and not (tmp_path / "run.previous").exists()
    assert (run_dir / "adapter_model" / "adapter_model.safetensors").read_bytes() == b"the old adapter"
    # --debug shows the traceback as well.
    result = run_script(*args, "--debug", timeout=300, check=False)
    assert result.returncode == 1 and "Traceback" in result.stderr and "DataError" in result.stderr
    # With good data the new run replaces the old one, and the old one is gone once the new adapter is written.
    args[2] = f"--train_file={sixteen_examples}"
    result = run_script(*args, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the old run is kept in" in result.stdout and "removed the old run" in result.stdout
    assert sorted(p.name for p in run_dir.iterdir()) == ["adapter_model", "loss.png"]
    assert (run_dir / "adapter_model" / "adapter_config.json").is_file() and not (tmp_path / "run.previous").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "train.txt"]


def wait_for(predicate, process, timeout=180):
    """Poll until predicate() holds; fails if `process` ended first or time runs out."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, f"the holder ended early:\n{process.stderr.read()[-3000:] if process.stderr else ''}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_a_run_folder_is_held_by_one_process_until_it_dies(trainable_models, sixteen_examples, tmp_path):
    run_dir = tmp_path / "run"
    inputs = [f"--model_dir={trainable_models['chatglm2-6b']}", f"--train_file={sixteen_examples}", "--dev_file=none",
              f"--output_dir={run_dir}", "--overwrite_output_dir=true"]
    common = [*inputs, "--save_steps=0", "--report_to=none", "--per_device_train_batch_size=4"]
    # The first run trains (for as long as it is left alone) in a process of its own.
    first = subprocess.Popen([sys.executable, "train_trainer.py", *common, "--max_steps=100000", "--logging_steps=100000"],
                             cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for(run_dir.is_dir, first)  # its config, model and data have loaded
        started = sorted(p.name for p in run_dir.iterdir())
        # A second run into the same folder stops at once, naming the holder; overwriting does not move its folder.
        for script in ("train_trainer.py", "train_deepspeed.py", "train_qlora.py"):
            second = run_script(script, *(inputs if script == "train_qlora.py" else [*common, "--max_steps=2"]), timeout=300, check=False)
            assert second.returncode == 1, (script, second.stdout[-2000:], second.stderr[-2000:])
            line = second.stderr.strip().splitlines()[-1]
            assert line.startswith(f"error: --output_dir={run_dir} is in use by another run: pid {first.pid} on "
                                   f"{socket.gethostname()}, started 20"), line
            assert "train_trainer.py" in line and "Wait for it to end or stop it" in line and "Traceback" not in second.stderr
            assert sorted(p.name for p in run_dir.iterdir()) == started and not (tmp_path / "run.previous").exists()
        with pytest.raises(run_dirs.RunFolderInUse, match=f"pid {first.pid}"):
            run_dirs.RunFolder(run_dir, resume=None, overwrite=True).prepare()
        assert first.poll() is None and sorted(p.name for p in run_dir.iterdir()) == started
    finally:
        first.kill()  # SIGKILL: no clean-up of its own
        first.wait()
    # Its lock died with it: a new run overwrites the folder and, once finished, leaves no lock file behind.
    assert (tmp_path / ".run.run.lock").is_file()
    result = run_script("train_trainer.py", *common, "--max_steps=2", timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--dev_file=none: training without evaluation" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert (run_dir / "adapter_model" / "adapter_config.json").is_file()

    # merge_lora_and_quantize.py: a second writer of the same output folder stops before loading anything.
    merged = tmp_path / "merged"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from utils.run_dirs import hold_run_folder
        hold_run_folder({str(merged)!r}, "--output_path")
        print("held", flush=True)
        time.sleep(120)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = run_script("merge_lora_and_quantize.py", f"--lora_path={run_dir / 'adapter_model'}", f"--output_dir={merged}",
                             "--dtype=fp32", timeout=300, check=False)
        assert refused.returncode == 1
        assert refused.stderr.strip().splitlines()[-1].startswith(
            f"error: --output_dir={merged} is in use by another run: pid {holder.pid} on {socket.gethostname()}")
        assert not merged.exists()
    finally:
        holder.kill()
        holder.wait()


def test_an_output_folder_that_cannot_be_written_is_found_before_the_model_loads(trainable_models, sixteen_examples, tmp_path):
    (tmp_path / "a_file").write_text("in the way")
    for output_dir in (tmp_path / "a_file" / "run", "/proc/chatglm-no-run-here"):
        result = run_script("train_trainer.py", f"--model_dir={trainable_models['chatglm2-6b']}", f"--train_file={sixteen_examples}",
                            "--dev_file=none", f"--output_dir={output_dir}", "--save_steps=0", "--max_steps=2", "--report_to=none",
                            timeout=300, check=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith(f"error: --output_dir={output_dir}: cannot write there (")
        assert "trainable params" not in result.stdout  # stopped before the model loaded
        if "a_file" in str(output_dir):
            assert f"({tmp_path / 'a_file'} is a file, not a folder)" in result.stderr
