"""Claiming a run directory: one run at a time, never someone else's files.

``claim(run_dir, resume)`` runs before any model is loaded and before anything is
written, and

* refuses an output path that is a file, or a non-empty directory that is not a run
  directory (a run directory holds the ``.grpo-run`` marker, or checkpoints written by
  an earlier version), so a user's own ``config.yaml`` / ``summary.json`` is never
  overwritten;
* with ``--resume``, refuses a directory without checkpoints (nothing is created);
  without it, refuses one that holds checkpoints;
* takes an exclusive ``flock`` on the marker: a second run in the same directory is a
  one-line error naming the holder's pid. The kernel drops the lock when the holder
  exits however it exits (kill -9 included), so a stale lock cannot block a restart;
* removes ``checkpoints/.tmp-*`` left by a run killed mid-checkpoint.

Under ``torchrun`` only rank 0 (``RANK`` unset or 0) locks and tidies; the other ranks
run the read-only checks.

File-system failures (read-only, full disk, a path through a file) are one-line
errors naming the path and the system's reason (``OSError`` -> ``UserError``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import sys
from pathlib import Path

from grpo import checkpoint
from grpo.errors import UserError

MARKER = ".grpo-run"


class RunDirLock:
    """An exclusive lock on a run directory, held until ``release()`` or process exit."""

    def __init__(self, run_dir: Path, fd: int | None, created: Path | None = None):
        self.run_dir, self._fd = run_dir, fd
        self.created = created  # the topmost directory this run made: a run that fails to start removes it

    def remove_created(self) -> None:
        """Remove the run directory and the parents this run created, each only while empty
        (another run may have started beside it meanwhile)."""
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.created is None or self.created == self.run_dir:
            return
        for parent in self.run_dir.parents:
            try:
                os.rmdir(parent)
            except OSError:
                return
            if parent == self.created:
                return

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def is_run_dir(path: Path) -> bool:
    """True for a directory written by grpo (marker), or by an earlier version (checkpoints)."""
    return (path / MARKER).is_file() or bool(checkpoint.list_checkpoints(path))


def claim(run_dir: Path, resume: bool) -> RunDirLock:
    """Check, lock and tidy ``run_dir`` for a run (see the module docstring)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output_dir {run_dir} exists and is not a directory; choose another output_dir / name")
    if resume and not checkpoint.list_checkpoints(run_dir):
        raise checkpoint.CheckpointError(f"--resume: no checkpoint in {run_dir / 'checkpoints'}; "
                                         "start without --resume")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not is_run_dir(run_dir):
        raise UserError(f"output_dir {run_dir} is not empty and is not a grpo run directory (no {MARKER}); "
                        "refusing to write into it: choose an empty or new output_dir / name")
    if int(os.environ.get("RANK", "0") or 0) > 0:  # torchrun: rank 0 locks and tidies, the others only check
        return RunDirLock(run_dir, None)
    created = None  # the topmost directory this run creates (removed again if it fails to start)
    for parent in [run_dir, *run_dir.parents]:
        if parent.exists():
            break
        created = parent
    with os_errors(f"cannot create the run directory {run_dir}"):
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / MARKER, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise UserError(f"run directory {run_dir} is in use by another run (pid {holder}); wait for it to "
                            "finish or choose another output_dir / name") from exc
        raise
    lock = RunDirLock(run_dir, fd, created)
    try:
        with os_errors(f"cannot write the run directory {run_dir}"):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            if not resume and checkpoint.latest(run_dir) is not None:
                raise UserError(f"run directory {run_dir} already holds checkpoints: add --resume to continue it, "
                                "or choose another output_dir / name")
            if not resume and ((run_dir / "adapter").is_dir() or (run_dir / "summary.json").is_file()):
                raise UserError(f"run directory {run_dir} holds a finished run (adapter/, summary.json); a new run "
                                "would overwrite it: choose another output_dir / name")
            for partial in checkpoint.remove_partial(run_dir):
                print(f"removed {partial}, a checkpoint left half-written by an interrupted run", file=sys.stderr)
    except BaseException:
        lock.release()
        raise
    return lock


class os_errors:
    """``with os_errors("cannot write X"):`` turns a file-system OSError into a one-line UserError.

    Full disks say so (ENOSPC), as do read-only file systems, missing permissions and
    paths through a file."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, tp, exc, tb) -> bool:
        if exc is not None and isinstance(exc, OSError) and not isinstance(exc, UserError):
            raise UserError(describe_os_error(exc, self.what)) from exc
        return False


_HINTS = {errno.ENOSPC: "the disk is full: free space or choose another output_dir",
          errno.EDQUOT: "the disk quota is exceeded: free space or choose another output_dir",
          errno.EROFS: "the file system is read-only: choose a writable output_dir",
          errno.EACCES: "permission denied: choose a directory you can write",
          errno.EPERM: "operation not permitted: choose a directory you can write",
          errno.ENOTDIR: "a part of the path is a file, not a directory"}


def describe_os_error(exc: OSError, what: str) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    hint = _HINTS.get(exc.errno or -1)
    reason = exc.strerror or str(exc)
    return f"{what}{where}: {reason}" + (f"; {hint}" if hint else "")


WRITE_ERRNOS = frozenset(_HINTS)
