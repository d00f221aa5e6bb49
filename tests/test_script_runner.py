"""The tests' way of starting several ranks (conftest.run_script(..., ranks=N)): each rank sees torchrun's variables
and one intra-op thread, their output comes back together, and one failing rank ends the group instead of leaving the
others waiting for it (a DeepSpeed test that fails would otherwise hang until its timeout)."""
from conftest import run_script

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


def test_ranks_get_torchrun_variables_and_a_failing_rank_ends_them_all(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    # If rank 0 were left sleeping, this would raise TimeoutExpired after 120 s.
    result = run_script(script, tmp_path / "started", ranks=2, check=False, timeout=120)
    assert result.returncode != 0
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank "))
    assert [line.split(",")[0] for line in lines] == ["rank 0 of 2", "rank 1 of 2"], result.stdout
    assert all(", 1 thread(s)" in line and "master 127.0.0.1:" in line for line in lines), lines
    assert "local 0" in lines[0] and "local 1" in lines[1]
