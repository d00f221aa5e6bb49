"""Run folders and checkpoints that a crash at any instant leaves loadable (the README's "What a crash leaves"):
checkpoint markers written last, finished outputs staged beside their place and swapped in with one rename, one
holder per run folder (an flock that the kernel drops when its holder dies), and the output folder's lifecycle."""
import atexit
import contextlib
import ctypes
import datetime
import errno
import fcntl
import json
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from utils.data_io import fsync_path, write_atomic
from utils.errors import UserError

COMPLETE_MARKER = "checkpoint_complete.json"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


class CheckpointError(UserError, FileNotFoundError):
    pass


class OutputDirError(UserError, FileExistsError):
    pass


class RunFolderInUse(UserError, BlockingIOError):
    pass


def fsync_tree(folder):
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def _exchange(first, second):
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM):  # kernel or file system without it
        return False
    raise OSError(error, os.strerror(error), str(first))


def replace_folder(new, final):
    """Put the folder `new` at `final`: one atomic exchange, else two renames (the old one at `<final>.old-<pid>`)."""
    new, final = Path(new), Path(final)
    if not final.exists():
        os.rename(new, final)
    elif _exchange(new, final):
        shutil.rmtree(new)  # now the old folder
    else:
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.rename(final, old)
        os.rename(new, final)
        shutil.rmtree(old)
    fsync_path(final.parent)


def remove_dead_staging(output_path):
    """Remove the staging folders of `output_path` whose writers died (their lock is free)."""
    escaped = re.sub(r"([*?\[])", r"[\1]", output_path.name)
    for lock_path in output_path.parent.glob(f".{escaped}.partial-*.lock"):
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its writer is alive
            staging = lock_path.with_name(lock_path.name[: -len(".lock")])
            shutil.rmtree(staging, ignore_errors=True)
            lock_path.unlink(missing_ok=True)
            print(f"removed {staging}: a staging folder left by an interrupted run")


@contextlib.contextmanager
def staged_folder(output_path, replace=False):
    """A locked hidden sibling of `output_path` to write into, swapped in when the block ends without error (over an
    existing one only if `replace`), else removed."""
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_staging(output_path)
    # The lock exists (and is held) before the folder, so no folder is ever without a lock that tells its state.
    handle, lock_path = tempfile.mkstemp(prefix=f".{output_path.name}.partial-", suffix=".lock", dir=output_path.parent)
    with os.fdopen(handle, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        staging = Path(lock_path[: -len(".lock")])
        staging.mkdir()
        try:
            yield staging
            umask = os.umask(0)  # mkstemp (and safetensors) create private files; a model folder gets the usual ones
            os.umask(umask)
            for path in (staging, *staging.rglob("*")):
                path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
            fsync_tree(staging)
            if output_path.exists() and not replace:
                raise FileExistsError(f"{output_path} appeared while writing; nothing was written there")
            replace_folder(staging, output_path)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            Path(lock_path).unlink(missing_ok=True)


def checkpoint_step(path):
    match = CHECKPOINT_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoints(output_dir):
    """The checkpoint-N folders of a run, oldest first."""
    found = Path(output_dir).iterdir() if Path(output_dir).is_dir() else ()
    return sorted((p for p in found if p.is_dir() and checkpoint_step(p) is not None), key=checkpoint_step)


def mark_complete(folder, record=None):
    """Flush the checkpoint `folder`, then write its marker: the step, each file's size and `record` (for a resume)."""
    folder = Path(folder)
    fsync_tree(folder)
    files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file() and p.name != COMPLETE_MARKER}
    marker = {"step": checkpoint_step(folder), "files": files, **(record or {})}
    write_atomic(folder / COMPLETE_MARKER, json.dumps(marker, indent=1))


def incomplete_reason(folder):
    """None for a complete checkpoint, else why it is not one."""
    folder = Path(folder)
    marker_path = folder / COMPLETE_MARKER
    if not marker_path.is_file():
        return f"no {COMPLETE_MARKER}: its save was cut off"
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
        files = marker["files"]
    except (ValueError, KeyError, TypeError):
        return f"{COMPLETE_MARKER} is unreadable"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, not the {size} it was saved with"
    return None


def checkpoint_record(folder):  # step, files and what the training script recorded
    return json.loads((Path(folder) / COMPLETE_MARKER).read_text(encoding="utf-8"))


def find_resume_checkpoint(output_dir, resume_from_checkpoint):
    """None for a fresh run, the newest complete checkpoint-N for "auto", or the given path, which must be complete."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint in ("auto", "true", "latest"):
        skipped = []
        for folder in reversed(checkpoints(output_dir)):
            if (reason := incomplete_reason(folder)) is None:
                return folder
            print(f"resume: skipping {folder} ({reason})")
            skipped.append(f"{folder.name} ({reason})")
        detail = f"; incomplete: {', '.join(skipped)}" if skipped else ""
        raise CheckpointError(f"--resume_from_checkpoint=auto: no complete checkpoint-N folder in {output_dir}{detail}. "
                              "Start again with --overwrite_output_dir=true.")
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise CheckpointError(f"--resume_from_checkpoint={resume_from_checkpoint}: no such folder")
    if reason := incomplete_reason(path):
        raise CheckpointError(f"--resume_from_checkpoint={resume_from_checkpoint}: not a complete checkpoint ({reason}); "
                              "--resume_from_checkpoint=auto takes the newest complete one")
    return path


def rotate_checkpoints(output_dir, keep):
    """Keep the `keep` newest complete checkpoints (all if keep <= 0); remove older and incomplete ones (leftovers)."""
    complete = []
    for folder in checkpoints(output_dir):
        if incomplete_reason(folder) is None:
            complete.append(folder)
        else:
            shutil.rmtree(folder)
    for folder in complete[: -keep] if keep > 0 else []:
        shutil.rmtree(folder)


_held_run_locks = {}  # lock path -> the open file whose flock this process holds


def run_lock_path(folder):
    """The lock file of a run folder: a hidden sibling of its real path (a symlink to it finds the same lock)."""
    folder = Path(folder).resolve()
    return folder.with_name(f".{folder.name}.run.lock")


def _describe_holder(text):
    try:
        holder = json.loads(text)
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']} ({holder['command']})"
    except (ValueError, KeyError, TypeError):
        return "a process that is just starting"


def hold_run_folder(folder, option="--output_dir"):
    """Hold `folder` until this process exits, else RunFolderInUse naming the holder; an unwritable folder is found
    at once."""
    lock_path = run_lock_path(folder)
    if lock_path in _held_run_locks:
        return lock_path
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = os.fdopen(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644), "r+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe_holder(handle.read())
                handle.close()
                raise RunFolderInUse(
                    f"{option}={folder} is in use by another run: {holder}. Wait for it to end or stop it, or choose "
                    f"another {option}; the lock is {lock_path}, released when its holder exits") from None
            try:  # the last holder may have removed the file between our open and our flock: lock the one at the path
                if os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            handle.close()
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                  "command": shlex.join([os.path.basename(sys.executable), *sys.argv])}
        handle.truncate(0)
        handle.write(json.dumps(holder))
        handle.flush()
        _held_run_locks[lock_path] = handle
        if Path(folder).is_dir():
            tempfile.TemporaryFile(dir=folder).close()  # a folder this user cannot write is found now
    except OSError as err:
        if isinstance(err, RunFolderInUse):
            raise
        release_run_folder(folder)
        in_the_way = next((p for p in Path(folder).absolute().parents if p.exists() and not p.is_dir()), None)
        reason = f"{in_the_way} is a file, not a folder" if in_the_way else f"{err.strerror or err}: {err.filename or folder}"
        raise OutputDirError(f"{option}={folder}: cannot write there ({reason}); choose a folder this user can write") from err
    atexit.register(release_run_folder, folder)
    return lock_path


def release_run_folder(folder):
    """Let go of a run folder this process holds: the lock file goes, then the lock."""
    lock_path = run_lock_path(folder)
    handle = _held_run_locks.pop(lock_path, None)
    if handle is not None:
        lock_path.unlink(missing_ok=True)
        handle.close()


class RunFolder:
    """A training run's output folder through its life. check(), before anything slow: rank 0 holds it for all ranks; a
    folder holding a run is used only to resume or overwrite it. prepare(), on one process once the config, model and
    data have loaded: an overwritten run moves to .previous/ (one there already is the last finished run: the unfinished
    overwrite of it goes). finish(), after the final output: the overwritten run goes. Only the holder moves anything."""

    def __init__(self, path, resume=None, overwrite=False):
        self.path, self.resume, self.overwrite = Path(path), resume, overwrite
        self.previous = self.path.with_name(self.path.name + ".previous")

    def holds_run(self):
        return self.path.is_dir() and any(self.path.iterdir())

    def check(self):
        if int(os.environ.get("RANK", "0")) == 0:
            hold_run_folder(self.path)
        if self.path.exists() and not self.path.is_dir():
            raise OutputDirError(f"--output_dir={self.path} is a file, not a folder")
        if not self.resume and not self.overwrite and self.holds_run():
            raise OutputDirError(f"{self.path} already holds a run. Resume it with --resume_from_checkpoint=auto, replace "
                                 "it with --overwrite_output_dir=true, or choose another --output_dir.")
        return self

    def prepare(self):
        self.check()
        if not self.resume and self.overwrite and self.holds_run():
            if self.previous.exists():
                shutil.rmtree(self.path)
                print(f"overwrite: removed the unfinished run in {self.path}; the last finished run stays in "
                      f"{self.previous} until this one has written its final output")
            else:
                os.rename(self.path, self.previous)
                print(f"overwrite: the old run is kept in {self.previous} until this one has written its final output")
        self.path.mkdir(parents=True, exist_ok=True)

    def finish(self):
        if self.previous.exists():
            shutil.rmtree(self.previous)
            print(f"overwrite: removed the old run {self.previous}")
