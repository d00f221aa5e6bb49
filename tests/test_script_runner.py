"""The tests' way of running a script (conftest.run_script): in this process as `python script.py args` would run it,
its output captured (C-level writes to fds 1 and 2 included, warnings as Python shows them), stdin from `input`, its
exit status as the interpreter gives it, and the interpreter put back afterwards; with ranks=N under torchrun, where one failing rank ends them all."""
import logging
import os
import re
import sys

from conftest import run_script

SCRIPT = """import logging, os, sys
from utils.config_utils import parse_config
from utils.errors import UserError

config = parse_config({"mode": "ok", "value": 0})
print("stdout:", sys.stdin.read().strip(), os.environ.get("RUNNER_TEST_VALUE"))
os.write(2, b"written to fd 2\\n")
os.environ["RUNNER_TEST_LEFT"] = "by the script"
logging.getLogger("transformers").setLevel(logging.DEBUG)
if config["mode"] == "user_error":
    raise UserError("--value: bad")
if config["mode"] == "exception":
    raise RuntimeError("a bug")
if config["mode"] == "exit":
    sys.exit(config["value"])
if config["mode"] == "exit_message":
    sys.exit("error: stopped")
if config["mode"] == "warn":
    import warnings
    warnings.warn("shown as Python shows it")
"""


def test_a_run_in_process_captures_output_and_gives_the_exit_status(tmp_path):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    user_error = run_script(script, "--mode=user_error", check=False)
    assert (user_error.returncode, user_error.stderr) == (1, "written to fd 2\nerror: --value: bad\n")
    level, hook = logging.getLogger("transformers").level, sys.excepthook  # the libraries are imported by now
    result = run_script(script, input="from stdin\n", env={"RUNNER_TEST_VALUE": "from env"})
    assert result.stdout == "stdout: from stdin from env\n" and result.stderr == "written to fd 2\n"
    # The environment, logging levels and the exception hook are as before the run.
    assert "RUNNER_TEST_VALUE" not in os.environ and "RUNNER_TEST_LEFT" not in os.environ
    assert logging.getLogger("transformers").level == level and sys.excepthook is hook

    bug = run_script(script, "--mode=exception", check=False)
    assert bug.returncode == 1 and "Traceback" in bug.stderr and bug.stderr.endswith("RuntimeError: a bug\n")
    assert run_script(script, "--mode=exit", "--value=3", check=False).returncode == 3
    assert run_script(script, "--mode=exit", check=False).returncode == 0
    stopped = run_script(script, "--mode=exit_message", check=False)
    assert (stopped.returncode, stopped.stderr.splitlines()[-1]) == (1, "error: stopped")
    assert run_script(script, "--mode=nonsense", "--unknown=1", check=False).returncode == 1
    # A warning goes to stderr as in a fresh interpreter (not to pytest's record), in every run.
    for _ in range(2):
        assert "UserWarning: shown as Python shows it" in run_script(script, "--mode=warn").stderr
    assert sys.excepthook is hook


RANK_SCRIPT = """import os, sys, time
from pathlib import Path
import torch
rank, started = int(os.environ["RANK"]), Path(sys.argv[1])
print(f"rank {rank} of {os.environ['WORLD_SIZE']}, local {os.environ['LOCAL_RANK']}, master "
      f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}, {torch.get_num_threads()} thread(s)", flush=True)
if rank == 0:
    started.touch()
    time.sleep(600)  # as a rank waiting in a collective for one that has died
for _ in range(600):  # rank 1 fails once rank 0 is surely running
    if started.exists():
        sys.exit(3)
    time.sleep(0.1)
"""


def test_ranks_run_under_torchrun_and_a_failing_rank_ends_them_all(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    # If rank 0 were left sleeping, this would raise TimeoutExpired after 120 s.
    result = run_script(script, tmp_path / "started", ranks=2, check=False, timeout=120)
    assert result.returncode != 0
    # The ranks share torchrun's stdout: one rank's line may land in the middle of the other's.
    lines = sorted(re.findall(r"rank \d of \d, local \d, master [^,]+, \d+ thread\(s\)", result.stdout))
    assert [line.split(",")[0] for line in lines] == ["rank 0 of 2", "rank 1 of 2"], result.stdout
    assert all(", 1 thread(s)" in line and "master 127.0.0.1:" in line for line in lines), lines
    assert "local 0" in lines[0] and "local 1" in lines[1]
