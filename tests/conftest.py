import fcntl
import gc
import json
import logging
import os
import random
import runpy
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import warnings
from importlib.metadata import version
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
TOKENIZERS = SHARED / "assets" / "tokenizers"
VERSIONS = ("chatglm-6b", "chatglm2-6b", "chatglm3-6b")

sys.path.insert(0, str(REPO_ROOT))
import numpy  # noqa: E402
import torch  # noqa: E402

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


# A rank that aborts (SIGABRT, SIGSEGV) prints every thread's Python stack: the failing test then shows where.
FATAL_SIGNAL_TRACEBACKS = {"PYTHONFAULTHANDLER": "1"}


class ScriptRunner:
    """`python script.py args` run in this process (runpy, as __main__): the heavy libraries are imported once, not
    ~9 s of two cores per script. What a run changes in the interpreter is put back afterwards, so that no result
    depends on the order of the tests: sys.argv/stdin/stdout/stderr, file descriptors 0-2, the environment, the
    working folder, sys.excepthook, logging levels and handlers, warnings filters, the RNG states, torch's thread
    count, a process group left open, accelerate's and transformers' DeepSpeed singletons, held run-folder locks.
    With ranks=N the script runs under torchrun, a real launcher, in N fresh processes."""

    def run(self, argv, env=None, timeout=900, input=None, ranks=None):
        """subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, input=input) for argv = [script, *args];
        with ranks=N, `torchrun --nproc_per_node N script args` (the ranks' output together, as torchrun shows it)."""
        argv = [str(arg) for arg in argv]
        if ranks:
            launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={free_port()}"]
            return subprocess.run([sys.executable, *launcher, *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                                  input=input, timeout=timeout, env={"OMP_NUM_THREADS": "1", **os.environ, **(env or {}),
                                                                     **FATAL_SIGNAL_TRACEBACKS})
        import_libraries()
        with tempfile.TemporaryDirectory() as tmp, RedirectedStreams(Path(tmp), input) as streams, InterpreterState():
            os.environ.update(env or {})
            if "OMP_NUM_THREADS" in (env or {}):  # torch read it at import: a run's own value is set here
                torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
            returncode = run_main(argv, timeout)
        return subprocess.CompletedProcess(argv, returncode, *streams.output)


PYTHON_WARNING_FILTERS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, ""),
                          ("ignore", PendingDeprecationWarning, ""), ("ignore", ImportWarning, ""),
                          ("ignore", ResourceWarning, "")]
SCRIPT_WARNING_FILTERS = []  # a script's filters: Python's own, then those its libraries add on import


def import_libraries():
    """What the scripts import, imported before the first run: the state saved around each run then holds what these
    imports set up once (utils/log_filters' filters, the libraries' loggers and handlers), and the warning filters a
    script sees are Python's own plus those the libraries add (pytest's own filters record warnings instead)."""
    if SCRIPT_WARNING_FILTERS:
        return
    with warnings.catch_warnings():
        warnings.resetwarnings()
        for action, category, module in reversed(PYTHON_WARNING_FILTERS):
            warnings.filterwarnings(action, category=category, module=module)
        import utils.log_filters  # noqa: F401, I001
        import peft  # noqa: F401
        from transformers import Trainer  # noqa: F401

        try:  # a GPU machine without DeepSpeed still runs the other scripts
            import deepspeed  # noqa: F401
        except ImportError:
            pass
        SCRIPT_WARNING_FILTERS.extend(warnings.filters)


def show_warning(message, category, filename, lineno, file=None, line=None):
    """As Python shows a warning: on sys.stderr (pytest's own hook records it instead)."""
    (file or sys.stderr).write(warnings.formatwarning(message, category, filename, lineno, line))


def run_main(argv, timeout):
    """Runs argv[0] as __main__ with sys.argv = argv; its exit status as the interpreter would give it."""
    def out_of_time(signum, frame):
        raise subprocess.TimeoutExpired(argv, timeout)

    timed = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    if timed:
        previous = signal.signal(signal.SIGALRM, out_of_time)
        signal.setitimer(signal.ITIMER_REAL, timeout)
    sys.argv = argv
    try:
        runpy.run_path(argv[0], run_name="__main__")
        return 0
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return 1
    except subprocess.TimeoutExpired:
        raise
    except BaseException:  # noqa: BLE001 - reported as a fresh interpreter would: through the script's hook
        sys.excepthook(*sys.exc_info())
        return 1
    finally:
        if timed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        sys.stdout.flush()
        sys.stderr.flush()


class RedirectedStreams:
    """File descriptors 0, 1 and 2 (so that C code and child processes are captured too) and sys.stdin/stdout/
    stderr on temporary files for one run; logging handlers that wrote to the old sys.stdout/stderr write to the new
    ones meanwhile. `output` is (stdout, stderr) once the block has ended."""

    def __init__(self, folder, input):
        self.paths = folder / "stdin", folder / "stdout", folder / "stderr"
        self.paths[0].write_text(input or "", encoding="utf-8")
        self.output = None

    def __enter__(self):
        sys.stdout.flush()
        sys.stderr.flush()
        self.saved_fds = [os.dup(fd) for fd in (0, 1, 2)]
        self.saved_streams = sys.stdin, sys.stdout, sys.stderr
        for fd, path in enumerate(self.paths):
            target = os.open(path, os.O_RDONLY if fd == 0 else os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(target, fd)
            os.close(target)
        sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stdout, sys.stderr = (open(fd, "w", encoding="utf-8", errors="backslashreplace", closefd=False, buffering=1)  # noqa: SIM115
                                  for fd in (1, 2))
        self.moved = self.move_handlers(dict(zip(self.saved_streams[1:], (sys.stdout, sys.stderr))))
        return self

    def __exit__(self, *exc):
        for handler, stream in self.moved:
            handler.setStream(stream)
        sys.stdin.close()
        sys.stdout.flush()
        sys.stderr.flush()  # left open: a handler made during the run writes through them to whatever fd 1 and 2 are
        sys.stdin, sys.stdout, sys.stderr = self.saved_streams
        for fd, saved in enumerate(self.saved_fds):
            os.dup2(saved, fd)
            os.close(saved)
        self.output = [path.read_text(encoding="utf-8", errors="replace") for path in self.paths[1:]]

    @staticmethod
    def move_handlers(new_stream_of):
        """Points the stream handlers on the given streams to their replacements; returns (handler, old stream)."""
        loggers = [logging.getLogger(), *(logger for logger in logging.Logger.manager.loggerDict.values()
                                          if isinstance(logger, logging.Logger))]
        moved = []
        for handler in {handler for logger in loggers for handler in logger.handlers}:
            stream = getattr(handler, "stream", None)
            if isinstance(handler, logging.StreamHandler) and stream in new_stream_of:
                moved.append((handler, handler.setStream(new_stream_of[stream])))
        return moved


class InterpreterState:
    """What a script run may change in this interpreter, saved before it and put back after it."""

    def __enter__(self):
        self.argv, self.cwd, self.environ, self.excepthook = list(sys.argv), os.getcwd(), dict(os.environ), sys.excepthook
        self.warnings = warnings.catch_warnings()  # puts filters and showwarning back, afresh ("once" included)
        self.warnings.__enter__()
        warnings.resetwarnings()
        warnings.filters[:] = SCRIPT_WARNING_FILTERS
        warnings.showwarning = show_warning
        self.loggers = {name: (logger.level, list(logger.handlers), list(logger.filters), logger.propagate, logger.disabled)
                        for name, logger in self.all_loggers().items()}
        self.logging_disabled = logging.root.manager.disable
        self.rng = (random.getstate(), numpy.random.get_state(), torch.get_rng_state(),
                    torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        self.threads, self.num_threads, self.default_dtype = set(threading.enumerate()), torch.get_num_threads(), torch.get_default_dtype()
        os.chdir(REPO_ROOT)
        return self

    def __exit__(self, *exc):
        for thread in set(threading.enumerate()) - self.threads:  # as interpreter shutdown would: wait for them
            if not thread.daemon:
                thread.join(timeout=60)
        self.close_process_group()
        release_run_folders()
        sys.argv, sys.excepthook = self.argv, self.excepthook
        os.chdir(self.cwd)
        os.environ.clear()
        os.environ.update(self.environ)
        self.warnings.__exit__(None, None, None)
        for name, logger in self.all_loggers().items():
            if name not in self.loggers:  # made during the run: kept as made
                continue
            level, handlers, filters, propagate, disabled = self.loggers[name]
            logger.setLevel(level)
            logger.handlers[:], logger.filters[:], logger.propagate, logger.disabled = handlers, filters, propagate, disabled
        logging.disable(self.logging_disabled)
        random.setstate(self.rng[0])
        numpy.random.set_state(self.rng[1])
        torch.set_rng_state(self.rng[2])
        if self.rng[3] is not None:
            torch.cuda.set_rng_state_all(self.rng[3])
        torch.set_num_threads(self.num_threads)
        torch.set_default_dtype(self.default_dtype)
        gc.collect()

    @staticmethod
    def all_loggers():
        return {"": logging.getLogger(), **{name: logger for name, logger in logging.Logger.manager.loggerDict.items()
                                            if isinstance(logger, logging.Logger)}}

    @staticmethod
    def close_process_group():
        """train_deepspeed.py's one-process group (left open by a run that failed), and the singletons that the
        Trainer's accelerate and DeepSpeed integration keep for the next run in this process."""
        import torch.distributed as dist
        from accelerate.state import AcceleratorState, GradientState
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        if "deepspeed" in sys.modules:  # its cached groups of the destroyed process group
            from deepspeed.utils import groups

            for name, value in vars(groups).items():
                if name.startswith("_") and name.endswith(("_GROUP", "_GROUP_RANKS")):
                    setattr(groups, name, {} if isinstance(value, dict) else None)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        unset_hf_deepspeed_config()


def release_run_folders():
    """The run-folder locks a run took: a process ending would drop them."""
    from utils import run_dirs

    for lock_path in list(run_dirs._held_run_locks):
        run_dirs.release_run_folder(lock_path.with_name(lock_path.name[1:-len(".run.lock")]))


SCRIPTS = ScriptRunner()


def run_script(script, *args, timeout=900, check=True, env=None, ranks=None, input=None):
    result = SCRIPTS.run([script, *args], env=env, timeout=timeout, ranks=ranks, input=input)
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


def background_priority():
    """preexec_fn of the background runs' processes (the long ones also get OMP_NUM_THREADS=1): the lowest CPU priority,
    inherited by their children, so that they take the cores the tests leave idle (a process starting, a test
    waiting) instead of slowing the tests down (two processes' OpenMP threads sharing two cores wait on each other)."""
    os.nice(19)


def pytest_collection_finish(session):
    """Start the collected test modules' background runs (tests/test_kernels.py's Triton-interpreter processes,
    tests/test_crash_resume.py's drivers: each keeps one core busy for tens of seconds), so that they run beside the
    other tests."""
    for module in {item.module for item in session.items if getattr(item, "module", None) is not None}:
        if hasattr(module, "start_background_runs"):
            module.start_background_runs()
