"""Fault injection: a tiny LoRA run (constant learning rate, no dropout) is killed with SIGKILL at many moments of its
last checkpoint save and of its final save, resumed each time with --resume_from_checkpoint=auto, and must end with the
weights of the uninterrupted run. The moments are the file-system operations that the save makes (Python's audit
events: each open for writing, mkdir, rename, remove): the process is killed just before the k-th of them, for k spread
over all of them, so every stage of the save is cut off somewhere - a checkpoint folder without its trainer state, one
without its marker, a half-swapped adapter, a rotation half done.

Starting a Python process with torch, transformers and DeepSpeed takes seconds, so this file is also its own driver:
run as a script it imports them once and forks one child per run (the driver itself computes nothing, so forking is
safe), and prints a JSON summary that the test reads. The two drivers (one per training script) start when the tests
are collected and run one after the other beside the rest of the suite; these tests, run last, read their summaries."""
import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from conftest import REPO_ROOT, TOKENIZERS, background_priority

# Audit events that change files; an "open" counts only when it writes.
WRITE_EVENTS = {"os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def file_changes(event, args, root):
    """The path an audit event writes under `root`, else None."""
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & WRITE_FLAGS)
        if not writes:
            return None
    elif event not in WRITE_EVENTS:
        return None
    else:
        path = args[0]
    if isinstance(path, int) or path is None:
        return None
    path = os.fsdecode(path)
    return path if path.startswith(root) else None


def run_child(script, argv, output_root, arm_on=None, kill_at=None):
    """Run `script` with `argv` in a forked child; returns (exit status, the file changes it made after the folder
    `arm_on` was created, or None when `kill_at` killed it before the kill_at-th of those)."""
    events_path = Path(output_root) / f".events-{os.getpid()}-{kill_at}.json"
    pid = os.fork()
    if pid == 0:
        changes, armed = [], [arm_on is None]

        def audit(event, args):
            path = file_changes(event, args, str(output_root))
            if path is None or path == str(events_path):
                return
            if not armed[0]:
                armed[0] = event == "os.mkdir" and Path(path).name == arm_on
                if not armed[0]:
                    return
            changes.append(f"{event} {os.path.relpath(path, output_root)}")
            if kill_at is not None and len(changes) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        code = 0
        try:
            sys.argv = [script, *argv]
            sys.addaudithook(audit)
            import runpy

            runpy.run_path(str(REPO_ROOT / script), run_name="__main__")
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) or exit_.code is None else 1
            if code and not isinstance(exit_.code, int):
                print(exit_.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - reported through the exit status
            import traceback

            traceback.print_exc()
            code = 1
        events_path.write_text(json.dumps(changes))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    changes = json.loads(events_path.read_text()) if events_path.exists() else None
    events_path.unlink(missing_ok=True)
    return status, changes


def adapter_weights(run_dir):
    from safetensors.numpy import load_file  # numpy: the driver runs no torch op before it forks again

    return load_file(str(Path(run_dir) / "adapter_model" / "adapter_model.safetensors"))


def choose_moments(changes, count):
    """`count` of the moments 1..len(changes): the first and the last, every rename and removal (the steps that make a
    checkpoint complete, swap an adapter in, rotate old checkpoints out), then evenly spread ones."""
    if len(changes) <= count:
        return list(range(1, len(changes) + 1))
    chosen = {1, len(changes)} | {i for i, change in enumerate(changes, start=1) if change.startswith(("os.rename", "shutil.rmtree"))}
    spread = [round(1 + i * (len(changes) - 1) / (count - 1)) for i in range(count)]
    for moment in sorted(spread, key=lambda m: min(abs(m - c) for c in chosen), reverse=True):
        if len(chosen) >= count:
            break
        chosen.add(moment)
    return sorted(chosen)[:count] if len(chosen) > count else sorted(chosen)


def drive(script, common, output_root, last_checkpoint, max_moments):
    """The uninterrupted run, then for each chosen moment a killed run and its resumption."""
    output_root = Path(output_root)
    output_root.mkdir(parents=True, exist_ok=True)
    reference_dir = output_root / "uninterrupted"
    status, changes = run_child(script, [*common, f"--output_dir={reference_dir}"], output_root, arm_on=f"checkpoint-{last_checkpoint}")
    assert status == 0 and changes, f"the uninterrupted run failed ({status})"
    reference = adapter_weights(reference_dir)
    moments = choose_moments(changes, max_moments)
    results = []
    for moment in moments:
        run_dir = output_root / f"killed-{moment}"
        status, _ = run_child(script, [*common, f"--output_dir={run_dir}"], output_root, arm_on=f"checkpoint-{last_checkpoint}", kill_at=moment)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        left = sorted(p.name for p in run_dir.iterdir())
        status, _ = run_child(script, [*common, f"--output_dir={run_dir}", "--resume_from_checkpoint=auto"], output_root)
        resumed = adapter_weights(run_dir) if status == 0 else None
        difference = max(float(abs(resumed[k] - reference[k]).max()) for k in reference) if resumed else None
        partials = sorted(p.name for p in run_dir.rglob("*partial*"))
        results.append({"moment": moment, "killed_before": changes[moment - 1], "killed": killed, "left": left,
                        "resume_status": status, "max_difference": difference, "staging_left": partials})
    return {"events": changes, "results": results}


def common_args(model_dir, train_file):
    return [f"--model_dir={model_dir}", f"--train_file={train_file}", "--dev_file=none", "--max_steps=6", "--save_steps=3",
            "--save_total_limit=1", "--per_device_train_batch_size=4", "--learning_rate=1e-2", "--warmup_steps=0",
            "--lora_dropout=0.0", "--logging_steps=2"]


def make_setup(root):
    """The tiny model and the 16 training lines the runs use, under `root`."""
    from tools.tiny_models import make_tiny_model

    model_dir = make_tiny_model("chatglm2-6b", root / "model", TOKENIZERS / "chatglm2-6b", seed=0, initializer_range=0.3)
    lines = (REPO_ROOT.parent / "shared" / "data" / "msra" / "instruct_data" / "dev.txt").read_text(encoding="utf-8").splitlines()[:16]
    train_file = root / "train.txt"
    train_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return model_dir, train_file


SCRIPTS = {"train_trainer.py": ["--lr_scheduler_type=constant", "--report_to=none"], "train_deepspeed.py": []}
RUNS = {}


def start_background_runs():
    """Both drivers, one after the other, in a thread of this process: each is one single-threaded process busy for
    tens of seconds, so they run beside the tests collected before this file's (conftest.pytest_collection_finish
    starts them; the test waits for its script's)."""
    if RUNS:
        return RUNS
    root = Path(tempfile.mkdtemp(prefix="crash-resume-"))
    RUNS.update({script: {"done": threading.Event(), "result": None} for script in SCRIPTS})
    # The environment as it is now, before any test runs: an in-process run of train_deepspeed.py sets RANK and
    # MASTER_PORT for its own process group while it runs, and a driver that copied them would rendezvous on that port.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

    def run_all():
        # The tiny model is made in a process of its own: the drivers must run no torch operation before they fork.
        setup = subprocess.run([sys.executable, __file__, "setup", str(root)], cwd=REPO_ROOT, capture_output=True, text=True,
                               env=env, preexec_fn=background_priority)
        for script in SCRIPTS:
            if setup.returncode:
                RUNS[script]["result"], _ = setup, RUNS[script]["done"].set()
                continue
            try:
                RUNS[script]["result"] = subprocess.run(
                    [sys.executable, __file__, script, str(root), str(root / script), "6", "10"], cwd=REPO_ROOT,
                    capture_output=True, text=True, timeout=1500, env=env, preexec_fn=background_priority)
            except Exception as error:  # noqa: BLE001 - the test reports it
                RUNS[script]["result"] = error
            finally:
                RUNS[script]["done"].set()

    threading.Thread(target=run_all, daemon=True).start()
    atexit.register(shutil.rmtree, root, True)
    return RUNS


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_a_run_killed_at_any_moment_of_its_save_resumes_to_the_uninterrupted_weights(script):
    run = start_background_runs()[script]
    assert run["done"].wait(timeout=1800), f"{script}: the crash driver did not finish"
    result = run["result"]
    assert isinstance(result, subprocess.CompletedProcess), result
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    print(json.dumps(summary["results"], indent=1))  # shown with -s: where each run was killed and what it left
    results = summary["results"]
    assert len(results) == 10, summary["events"]
    assert all(r["killed"] for r in results), results
    # The moments cover the checkpoint save, the final adapter swap and the rotation.
    killed_before = " ".join(r["killed_before"] for r in results)
    assert "checkpoint_complete.json" in killed_before and "adapter_model" in killed_before, killed_before
    failed = [r for r in results if r["resume_status"] != 0 or r["max_difference"] is None or r["max_difference"] > 1e-6 or r["staging_left"]]
    assert not failed, failed
    print(f"{script}: largest difference to the uninterrupted weights over {len(results)} kills: "
          f"{max(r['max_difference'] for r in results):.3g}")


if __name__ == "__main__":  # the driver: script, setup folder, output root, last checkpoint step, moments
    sys.path.insert(0, str(REPO_ROOT))
    os.chdir(REPO_ROOT)
    script, setup_root = sys.argv[1], Path(sys.argv[2])
    if script == "setup":
        make_setup(setup_root)
        sys.exit(0)
    # Imported once here, shared by every forked child.
    import matplotlib.pyplot  # noqa: F401 - the loss plot
    import utils.model_loading
    import utils.trainer

    utils.model_loading.remote_module("chatglm2-6b", "modeling_chatglm")

    model_dir, train_file = (setup_root / "model", setup_root / "train.txt")
    common = common_args(model_dir, train_file) + SCRIPTS[script]
    if script == "train_deepspeed.py":
        import deepspeed  # noqa: F401

        # deepspeed.json names no scheduler: a constant rate, as the Trainer's "constant".
        ds = json.loads((REPO_ROOT / "deepspeed.json").read_text())
        ds["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-2, "warmup_max_lr": 1e-2, "warmup_num_steps": 1,
                                                          "warmup_type": "linear"}}
        (setup_root / "deepspeed_constant.json").write_text(json.dumps(ds))
        common.append(f"--deepspeed={setup_root / 'deepspeed_constant.json'}")
    summary = drive(script, common, sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    print(json.dumps(summary))
