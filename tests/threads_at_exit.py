"""python tests/threads_at_exit.py [launcher's --local_rank=N] SCRIPT ARGS...: runs SCRIPT as `python SCRIPT ARGS` would
(a launcher's --local_rank included), then prints the native threads this rank still has once the script's main has
returned, which is what the interpreter's shutdown then runs beside: "threads at exit (rank R): name, name, ...".
"""
import os
import runpy
import sys
from pathlib import Path


def main():
    arguments = sys.argv[1:]
    script = next(argument for argument in arguments if argument.endswith(".py"))
    arguments.remove(script)
    sys.argv = [script, *arguments]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")
    names = sorted(task.joinpath("comm").read_text().strip() for task in Path("/proc/self/task").iterdir())
    # One write for the whole line: the ranks share the launcher's pipe, and `python -u` (the deepspeed launcher's)
    # would write the text and its newline apart, letting another rank's line in between.
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), f"threads at exit (rank {os.environ.get('RANK')}): {', '.join(names)}\n".encode())


if __name__ == "__main__":
    main()
