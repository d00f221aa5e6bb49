"""Run folders and checkpoints that a crash at any instant (kill -9, power loss) leaves loadable.

- A checkpoint-N/ folder counts only once its marker file, `checkpoint_complete.json`, exists. The marker is written
  last, after every file of the checkpoint is on disk (fsync), and records each file's size; `auto` resumes from the
  newest complete checkpoint and says which newer ones it skipped and why. Old checkpoints are rotated out only after
  the new one is complete.
- Finished outputs (the adapter, a model folder) are written into a staging folder beside their place and swapped in
  with one rename, so the old one stays until the new one is whole. A staging folder holds an flock on its `.lock` file
  while it is written; one whose lock nobody holds was left by a dead process, and the next writer removes it.
- Overwriting a run (--overwrite_output_dir) moves the old run to `<output_dir>.previous/` only once the new run's
  config, model and data have loaded, and deletes it once the new run has written its final output.
- A run folder is held by one process at a time: an flock on `.<name>.run.lock` beside it (beside, not inside, so that
  moving the old run to `.previous/` never moves the lock away from the path it guards). The kernel drops the lock
  when its holder dies, kill -9 included; the file records who holds it, for the message a second writer gets.
"""
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


# ------------------------------------------------------------------------------------------------ durable writes

def fsync_tree(folder):
    """Every file and folder under `folder`, and `folder` itself, flushed to disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


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
    """Put the folder `new` at `final`, replacing what is there, so that at every instant `final` is either the old
    folder or the new one (one atomic exchange where the system has it; else two renames, with the old folder kept
    under `<final>.old-<pid>` in between)."""
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


# ------------------------------------------------------------------------------------------------ staging folders

def remove_dead_staging(output_path):
    """Remove the staging folders of `output_path` left by processes that died while writing them (their lock is
    free); returns the removed paths. Staging folders of live writers are left alone."""
    output_path = Path(output_path)
    removed = []
    for lock_path in output_path.parent.glob(f".{glob_escape(output_path.name)}.partial-*.lock"):
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its writer is alive
            staging = lock_path.with_name(lock_path.name[: -len(".lock")])
            shutil.rmtree(staging, ignore_errors=True)
            lock_path.unlink(missing_ok=True)
            removed.append(staging)
    for staging in removed:
        print(f"removed {staging}: a staging folder left by an interrupted run")
    return removed


def glob_escape(name):
    return re.sub(r"([*?\[])", r"[\1]", name)


class StagingFolder:
    """A new hidden folder beside `output_path` to write into, locked by this process while it exists."""

    def __init__(self, output_path):
        output_path = Path(output_path)
        output_path.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_staging(output_path)
        # The lock exists (and is held) before the folder, so no folder is ever without a lock that tells its state.
        handle, lock_path = tempfile.mkstemp(prefix=f".{output_path.name}.partial-", suffix=".lock", dir=output_path.parent)
        self.lock = os.fdopen(handle, "w")
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        self.lock_path = Path(lock_path)
        self.path = self.lock_path.with_name(self.lock_path.name[: -len(".lock")])
        self.path.mkdir()

    def release(self, remove):
        if remove:
            shutil.rmtree(self.path, ignore_errors=True)
        self.lock_path.unlink(missing_ok=True)
        self.lock.close()


@contextlib.contextmanager
def staged_folder(output_path, replace=False):
    """Yields a new hidden sibling folder of `output_path` to write into; when the block ends without error it is
    flushed to disk and swapped in at `output_path`, otherwise removed. An existing `output_path` is an error, unless
    `replace` (then it is replaced only by the complete new folder). A staging folder left by a killed process is
    removed by the next one."""
    output_path = Path(output_path)
    staging = StagingFolder(output_path)
    try:
        yield staging.path
        # mkstemp (and safetensors) create private files; a model folder gets the usual permissions
        umask = current_umask()
        for path in (staging.path, *staging.path.rglob("*")):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        fsync_tree(staging.path)
        if output_path.exists() and not replace:
            raise FileExistsError(f"{output_path} appeared while writing; nothing was written there")
        replace_folder(staging.path, output_path)
    except BaseException:
        staging.release(remove=True)
        raise
    staging.release(remove=False)


# ------------------------------------------------------------------------------------------------ checkpoints

def checkpoint_step(path):
    match = CHECKPOINT_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoints(output_dir):
    """The checkpoint-N folders of a run, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def mark_complete(folder, record=None):
    """Flush every file of the checkpoint `folder` to disk, then write its marker: the step, each file's size and
    `record` (what else a resumed run needs, e.g. the loss summed over all steps so far)."""
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


def checkpoint_record(folder):
    """The marker of a complete checkpoint (step, files and what the training script recorded)."""
    return json.loads((Path(folder) / COMPLETE_MARKER).read_text(encoding="utf-8"))


def latest_complete_checkpoint(output_dir):
    """(newest complete checkpoint or None, [(newer incomplete checkpoint, reason), ...])."""
    skipped = []
    for folder in reversed(checkpoints(output_dir)):
        reason = incomplete_reason(folder)
        if reason is None:
            return folder, skipped
        skipped.append((folder, reason))
    return None, skipped


def find_resume_checkpoint(output_dir, resume_from_checkpoint):
    """The checkpoint to resume from: None for a fresh run, the newest complete checkpoint-N for "auto", or the given
    path (which must be complete). Prints the incomplete checkpoints that "auto" passed over."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint in ("auto", "true", "latest"):
        found, skipped = latest_complete_checkpoint(output_dir)
        for folder, reason in skipped:
            print(f"resume: skipping {folder} ({reason})")
        if found is None:
            detail = f"; incomplete: {', '.join(f'{f.name} ({r})' for f, r in skipped)}" if skipped else ""
            raise CheckpointError(f"--resume_from_checkpoint=auto: no complete checkpoint-N folder in {output_dir}{detail}. "
                                  "Start again with --overwrite_output_dir=true.")
        return found
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise CheckpointError(f"--resume_from_checkpoint={resume_from_checkpoint}: no such folder")
    reason = incomplete_reason(path)
    if reason:
        raise CheckpointError(f"--resume_from_checkpoint={resume_from_checkpoint}: not a complete checkpoint ({reason}); "
                              "--resume_from_checkpoint=auto takes the newest complete one")
    return path


def rotate_checkpoints(output_dir, keep):
    """Keep the `keep` newest complete checkpoints (all if keep <= 0); remove older ones and every incomplete one
    (called right after the newest was marked complete, so an incomplete one is a leftover of a crash)."""
    complete = []
    for folder in checkpoints(output_dir):
        if incomplete_reason(folder) is None:
            complete.append(folder)
        else:
            shutil.rmtree(folder)
    for folder in complete[: -keep] if keep > 0 else []:
        shutil.rmtree(folder)


# ------------------------------------------------------------------------------------------------ the run folder

_held_run_locks = {}  # lock path -> the open file whose flock this process holds


def run_lock_path(folder):
    """The lock file of a run folder: a hidden sibling, found from the folder's real path (a symlinked path to the
    same folder finds the same lock)."""
    folder = Path(folder).resolve()
    return folder.with_name(f".{folder.name}.run.lock")


def _describe_holder(text):
    try:
        holder = json.loads(text)
        return (f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
                f" ({holder['command']})")
    except (ValueError, KeyError, TypeError):
        return "a process that is just starting"


def hold_run_folder(folder, option="--output_dir"):
    """Hold the run folder `folder` for this process until it exits (kill -9 included: the kernel drops the flock), or
    stop with RunFolderInUse naming the holder (pid, host, start time, command). Also finds at once a folder that
    cannot be written (its parent is created, the lock file written beside it, a probe file written into it if it
    exists). Taking it again in the same process does nothing. Under several ranks, rank 0 holds it."""
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
            probe, probe_path = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
            os.close(probe)
            os.unlink(probe_path)
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


def previous_run_dir(output_dir):
    output_dir = Path(output_dir)
    return output_dir.with_name(output_dir.name + ".previous")


def holds_run(output_dir):
    output_dir = Path(output_dir)
    return output_dir.is_dir() and any(output_dir.iterdir())


def check_output_dir(output_dir, resume, overwrite):
    """Before anything is loaded: a folder that already holds a run is used only to resume it or to overwrite it."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputDirError(f"--output_dir={output_dir} is a file, not a folder")
    if not resume and not overwrite and holds_run(output_dir):
        raise OutputDirError(
            f"{output_dir} already holds a run. Resume it with --resume_from_checkpoint=auto, replace it with "
            "--overwrite_output_dir=true, or choose another --output_dir.")


def prepare_output_dir(output_dir, resume, overwrite):
    """Create output_dir for a run whose config, model and data have loaded. Overwriting moves the old run to
    <output_dir>.previous/ (finish_output_dir deletes it once this run has written its final output). A
    .previous/ that is already there holds the last finished run, and output_dir an unfinished overwrite of it:
    the unfinished one is replaced. Nothing is moved or removed unless this process holds the folder's lock."""
    hold_run_folder(output_dir)
    check_output_dir(output_dir, resume, overwrite)
    output_dir = Path(output_dir)
    if not resume and overwrite and holds_run(output_dir):
        previous = previous_run_dir(output_dir)
        if previous.exists():
            shutil.rmtree(output_dir)
            print(f"overwrite: removed the unfinished run in {output_dir}; the last finished run stays in {previous} "
                  "until this one has written its final output")
        else:
            os.rename(output_dir, previous)
            print(f"overwrite: the old run is kept in {previous} until this one has written its final output")
    output_dir.mkdir(parents=True, exist_ok=True)


def finish_output_dir(output_dir):
    """After the run's final output is written: the run it overwrote is no longer needed."""
    previous = previous_run_dir(output_dir)
    if previous.exists():
        shutil.rmtree(previous)
        print(f"overwrite: removed the old run {previous}")
