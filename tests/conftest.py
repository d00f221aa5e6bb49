import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from importlib.metadata import version
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
TOKENIZERS = SHARED / "assets" / "tokenizers"
VERSIONS = ("chatglm-6b", "chatglm2-6b", "chatglm3-6b")

sys.path.insert(0, str(REPO_ROOT))
from utils.distributed import free_port  # noqa: E402

# DeepSpeed JIT-builds C++ ops (its CPU shm comm op, CPU Adam) into TORCH_EXTENSIONS_DIR and guards each build with a
# bare `lock` file. A process killed inside that guard leaves the file behind, and every later DeepSpeed process then
# waits on it forever (one CI run timed out that way). The tests therefore build into a folder of their own, kept
# between runs (the builds take about a minute), and a test session that holds that folder's flock - the kernel drops
# it when its holder dies, so holding it means no other test session is running - removes `lock` files left there.
EXTENSIONS_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chatglm-lora-tests" / "torch_extensions"


def pytest_configure(config):
    EXTENSIONS_DIR.mkdir(parents=True, exist_ok=True)
    session_lock = open(EXTENSIONS_DIR / ".test-session", "w")  # noqa: SIM115 (held open for the whole session)
    try:
        fcntl.flock(session_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # another test session is running and may be building: leave its locks alone
        session_lock.close()
    else:
        for stale in EXTENSIONS_DIR.glob("*/*/lock"):
            stale.unlink()
        config._extensions_session_lock = session_lock  # held (open) until this process ends
    # One subfolder per Python and torch build, as torch's own default folder does.
    build = f"py{sys.version_info.major}{sys.version_info.minor}_torch{version('torch')}"
    os.environ["TORCH_EXTENSIONS_DIR"] = str(EXTENSIONS_DIR / build)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """One tiny random model folder per version, in the official layout with our .py files copied in."""
    from tools.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {version: make_tiny_model(version, root / version, TOKENIZERS / version, seed=0) for version in VERSIONS}


@pytest.fixture(scope="session")
def sixteen_examples(tmp_path_factory):
    """16 short records of the MSRA instruction file in ../shared (real sentences and entities): the 8 shortest
    with one entity, the 4 shortest with several and the 4 shortest with none (the shortest 16 are all 没有)."""
    lines = sorted((SHARED / "data" / "msra" / "instruct_data" / "dev.txt").read_text(encoding="utf-8").splitlines(), key=len)
    entity_count = {line: 0 if json.loads(line)["answer"] == "没有" else len(json.loads(line)["answer"].split("\n")) for line in lines}
    chosen = ([line for line in lines if entity_count[line] == 1][:8] + [line for line in lines if entity_count[line] > 1][:4]
              + [line for line in lines if entity_count[line] == 0][:4])
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text("\n".join(chosen) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def trainable_models(tmp_path_factory):
    """Tiny models whose random output layer can express confident predictions: with the default 0.02 init, a
    64-wide final RMSNorm times a frozen random output layer caps every logit near 1, so nothing can be learned."""
    from tools.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("trainable")
    return {v: make_tiny_model(v, root / v, TOKENIZERS / v, seed=0, initializer_range=0.3) for v in VERSIONS}


# LoRA on every linear layer with a high learning rate: enough for a 2-layer random model to memorise 16 answers.
OVERFIT = ["--lora_r=32", "--lora_alpha=64", "--lora_dropout=0.0", "--lora_target_modules=all", "--learning_rate=1e-2",
           "--warmup_steps=0", "--per_device_train_batch_size=16", "--logging_steps=5", "--report_to=none"]


def forking_is_safe():
    """On a CUDA machine the children of the fork server failed ("Cannot re-initialize CUDA in forked subprocess": an
    import had initialised CUDA in the server), so scripts run in fresh interpreters there (CHATGLM_TESTS_NO_FORK=1 forces
    it elsewhere)."""
    if os.environ.get("CHATGLM_TESTS_NO_FORK") == "1":
        return False
    import torch

    return not torch.cuda.is_available()


class ScriptRunner:
    """`python script.py args` in a child forked from tests/script_runner.py, which has imported the heavy libraries
    once (each fresh interpreter spends ~9 s of 2 cores importing torch, transformers, peft and DeepSpeed)."""

    def __init__(self):
        self.server = None
        self.lock = threading.Lock()

    def run(self, argv, env=None, timeout=900, input=None, ranks=None):
        """subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, input=input) for argv = [script, *args];
        with ranks=N, `torchrun --nproc_per_node N script args` (the ranks' output together, as torchrun shows it)."""
        if not forking_is_safe():
            launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={free_port()}"] if ranks else []
            return subprocess.run([sys.executable, *launcher, *map(str, argv)], cwd=REPO_ROOT, capture_output=True, text=True,
                                  input=input, timeout=timeout, env={**os.environ, **(env or {})})
        with self.lock, tempfile.TemporaryDirectory() as tmp:
            self.start()
            out, err, stdin = Path(tmp) / "stdout", Path(tmp) / "stderr", Path(tmp) / "stdin"
            if input is not None:
                stdin.write_text(input, encoding="utf-8")
            request = {"argv": [str(a) for a in argv], "cwd": str(REPO_ROOT), "stdout": str(out), "stderr": str(err),
                       "env": {**os.environ, **(env or {})}, "stdin": str(stdin) if input is not None else None,
                       "ranks": ranks, "master_port": free_port() if ranks else None}
            self.server.stdin.write(json.dumps(request) + "\n")
            self.server.stdin.flush()
            pids = json.loads(self.server.stdout.readline())["pids"]
            timed_out = threading.Event()

            def kill():
                timed_out.set()
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)

            timer = threading.Timer(timeout, kill)
            timer.start()
            try:
                returncode = json.loads(self.server.stdout.readline())["returncode"]
            finally:
                timer.cancel()
            stdout, stderr = (path.read_text(encoding="utf-8", errors="replace") for path in (out, err))
            if timed_out.is_set():
                raise subprocess.TimeoutExpired(argv, timeout, stdout, stderr)
            return subprocess.CompletedProcess(argv, returncode, stdout, stderr)

    def start(self):
        """Start the server (its imports take ~9 s) unless it is running."""
        if self.server is None or self.server.poll() is not None:
            self.server = subprocess.Popen([sys.executable, str(Path(__file__).with_name("script_runner.py"))], cwd=REPO_ROOT,
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def close(self):
        if self.server is not None and self.server.poll() is None:
            self.server.stdin.close()
            self.server.wait(timeout=60)


SCRIPTS = ScriptRunner()


def pytest_unconfigure(config):
    SCRIPTS.close()


def run_script(script, *args, timeout=900, check=True, env=None, ranks=None):
    result = SCRIPTS.run([script, *args], env=env, timeout=timeout, ranks=ranks)
    if check:
        assert result.returncode == 0, f"{script} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def train_then_resume(run, script, tmp_path, common, interrupted_after, last_step):
    """The resume-equivalence recipe of every training script: train `script` (run(script, *args)) without
    interruption into tmp_path/full; copy that as a run interrupted after checkpoint-`interrupted_after` (checkpoint-
    `last_step` and the run's output, adapter, prefix or model folder, removed) and resume it with
    --resume_from_checkpoint=auto. Returns (full, resumed run folder, the resuming run's CompletedProcess)."""
    full, interrupted = tmp_path / "full", tmp_path / "interrupted"
    run(script, f"--output_dir={full}", *common)
    shutil.copytree(full, interrupted)
    shutil.rmtree(interrupted / f"checkpoint-{last_step}")
    outputs = [interrupted / name for name in ("adapter_model", "prefix_model", "model") if (interrupted / name).is_dir()]
    assert len(outputs) == 1, outputs  # what the run wrote at its end
    shutil.rmtree(outputs[0])
    assert (interrupted / f"checkpoint-{interrupted_after}").is_dir()
    result = run(script, f"--output_dir={interrupted}", "--resume_from_checkpoint=auto", *common)
    return full, interrupted, result


@pytest.fixture(scope="session")
def trained_adapter(trainable_models, sixteen_examples, tmp_path_factory):
    """train_trainer.py run folder (with adapter_model/) of a version, trained once per session on the 16 examples."""
    runs = {}

    def train(version):
        if version not in runs:
            run_dir = tmp_path_factory.mktemp(f"trainer-{version}") / "run"
            run_script("train_trainer.py", f"--model_dir={trainable_models[version]}", f"--train_file={sixteen_examples}",
                       f"--dev_file={sixteen_examples}", f"--output_dir={run_dir}", "--max_steps=60", "--save_steps=60",
                       "--eval_steps=60", *OVERFIT)
            runs[version] = run_dir
        return runs[version]

    return train


def pytest_collection_modifyitems(session, config, items):
    """The tests of modules with background runs (start_background_runs, below) go last, so that their runs overlap
    the rest of the suite instead of being waited for."""
    items.sort(key=lambda item: hasattr(getattr(item, "module", None), "start_background_runs"))


def pytest_collection_finish(session):
    """Start the collected test modules' background runs (tests/test_kernels.py's Triton-interpreter processes,
    tests/test_crash_resume.py's drivers: each keeps one core busy for tens of seconds), so that they run beside the
    other tests. The script runner starts too where a collected test runs scripts: its imports overlap the first tests."""
    def runs_scripts(item):
        module = getattr(item, "module", None)
        return hasattr(module, "run_script") or hasattr(module, "SCRIPTS") or "trained_adapter" in getattr(item, "fixturenames", ())

    if any(runs_scripts(item) for item in session.items) and forking_is_safe():
        SCRIPTS.start()
    for module in {item.module for item in session.items if getattr(item, "module", None) is not None}:
        if hasattr(module, "start_background_runs"):
            module.start_background_runs()
