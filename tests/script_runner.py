"""Runs the project's scripts for the tests as `python script.py args` would, in a process forked from this one, which
has imported torch, transformers, peft and DeepSpeed once: a script run then skips their ~9 s of imports.

The tests start it once (conftest.ScriptRunner) and write one JSON request per line to its stdin:
{"argv": [script, *args], "cwd", "stdout", "stderr", "env", "stdin" (a file, or none), "ranks" (optional)}. It forks a
child for each, answers {"pids"} at once and {"returncode"} when the child has ended. The child runs the script as
__main__ with its stdout and stderr (file descriptors 1 and 2) sent to the named files, and ends as the interpreter
would: SystemExit gives the exit status, an uncaught exception goes to sys.excepthook (the scripts install their own)
and exits 1, then non-daemon threads are joined and atexit functions run. This process runs no torch operation
itself, so no thread pool is copied into a child half-started.

With "ranks": N it forks N children as torchrun starts its processes (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT from the request's "master_port"), their output appended to the same two files. As a
launcher does, the first rank to fail has the others killed; the returncode is that rank's (0 when all succeed)."""
import json
import os
import signal
import sys

# The answers go to the real stdout; everything else this process prints (libraries do, on import) to /dev/null.
ANSWERS = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(os.open(os.devnull, os.O_WRONLY), 1)

try:  # imported to be inherited by the children; a GPU machine without DeepSpeed still runs the other scripts
    import deepspeed  # noqa: E402, F401
except ImportError:
    pass
import peft  # noqa: E402, F401
import torch  # noqa: E402, F401
import transformers  # noqa: E402, F401
from transformers import Trainer  # noqa: E402, F401


def run_child(request):
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    if "OMP_NUM_THREADS" in os.environ:  # torch read it when this server started: a child's own value is set here
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # the ranks of one request share it
        os.dup2(target, fd)
        os.close(target)
    stdin = os.open(request.get("stdin") or os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    os.close(stdin)
    sys.stdin = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", encoding="utf-8", errors="backslashreplace", closefd=False, buffering=1)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False, buffering=1)  # noqa: SIM115
    script = os.path.abspath(request["argv"][0])
    sys.argv = [request["argv"][0], *request["argv"][1:]]
    sys.path[0] = os.path.dirname(script)
    code = 0
    try:
        import runpy

        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            code = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr)
            code = 1
    except BaseException:  # noqa: BLE001 - reported as a fresh interpreter would
        sys.excepthook(*sys.exc_info())
        code = 1
    try:
        import atexit
        import threading

        threading._shutdown()
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def rank_env(env, rank, ranks, master_port):
    # torchrun gives each of several ranks one intra-op thread unless told otherwise.
    return {"OMP_NUM_THREADS": "1", **env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(ranks),
            "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(master_port)}


def main():
    for line in sys.stdin:
        request = json.loads(line)
        for path in (request["stdout"], request["stderr"]):
            open(path, "w").close()
        ranks = request.get("ranks")
        pids = []
        for rank in range(ranks or 1):
            pid = os.fork()
            if pid == 0:
                ANSWERS.close()
                if ranks:
                    request["env"] = rank_env(request["env"], rank, ranks, request["master_port"])
                run_child(request)
            pids.append(pid)
        ANSWERS.write(json.dumps({"pids": pids}) + "\n")
        returncode, running = 0, set(pids)
        while running:
            pid, status = os.waitpid(-1, 0)
            running.discard(pid)
            code = os.waitstatus_to_exitcode(status)
            if code and not returncode:  # the first failure: the other ranks would wait for it forever
                returncode = code
                for other in running:
                    os.kill(other, signal.SIGKILL)
        ANSWERS.write(json.dumps({"returncode": returncode}) + "\n")


if __name__ == "__main__":
    main()
