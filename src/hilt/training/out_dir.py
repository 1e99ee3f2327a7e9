"""One run per ``--out_dir``: what a fresh run may find there, and the lock a run holds on it for its whole life
(rank 0 under torchrun), so two runs never write one folder's checkpoints and metrics.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

import torch

from hilt.checkpoint.store import CHECKPOINT_NAMES
from hilt.errors import UserError
from hilt.training import distributed

try:
    import fcntl
except ImportError:  # Windows: no flock, so a second run on an --out_dir is not refused there
    fcntl = None


def check_out_dir(out_dir: Path, *, resuming: bool, overwrite: bool) -> None:
    """Fails before any work if checkpoints could not be written, or if a fresh run would replace old ones."""
    target = out_dir if out_dir.exists() else out_dir.parent
    if not target.is_dir():
        raise UserError(f"--out_dir {out_dir}: {target} is not an existing folder")
    if not os.access(target, os.W_OK | os.X_OK):
        raise UserError(f"--out_dir {out_dir}: {target} is not writable")
    existing = [n for n in CHECKPOINT_NAMES if (out_dir / n).exists()]
    if existing and not resuming and not overwrite:
        raise UserError(
            f"{out_dir} already holds {' and '.join(existing)}; continue with --resume {out_dir / existing[-1]}, "
            "start afresh there with --overwrite, or choose another --out_dir"
        )


# --- one run per --out_dir ----------------------------------------------------------------------------------

LOCK_NAME = ".hilt_train.lock"


@contextlib.contextmanager
def hold_out_dir(out_dir: Path, dist_info: distributed.DistInfo, say=print):
    """``out_dir_lock`` held by rank 0 for the whole run; under torchrun the other ranks learn whether it got it
    (an error there must not leave them waiting)."""
    verdict = [None]
    with contextlib.ExitStack() as stack:
        if dist_info.is_main:
            try:
                stack.enter_context(out_dir_lock(out_dir, say))
            except Exception as e:
                verdict = [str(e) if isinstance(e, UserError) else f"rank 0 could not lock {out_dir} ({e!r})"]
                if dist_info.enabled:
                    torch.distributed.broadcast_object_list(verdict, src=0)
                raise
        if dist_info.enabled:
            torch.distributed.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            raise UserError(verdict[0])
        yield


@contextlib.contextmanager
def out_dir_lock(out_dir: Path, say=print):
    """Holds ``out_dir`` (creating it) for one run: another ``hilt train`` there is refused, naming the PID that
    holds it, instead of interleaving its metrics and racing its checkpoints with this run's.

    An flock on ``out_dir/.hilt_train.lock``, which holds the owner's PID and host: the kernel drops the lock when
    its process dies, however it dies, so the file a killed run leaves behind is stale by construction and the
    next run takes it over. A folder this run created and left empty (a run refused before writing) is removed."""
    created = False
    with contextlib.suppress(FileExistsError):
        out_dir.mkdir()
        created = True
    try:
        fd = _lock(out_dir / LOCK_NAME, say)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise
    try:
        yield
    finally:
        if fd is not None:
            # unlinked while still locked: a run that opened the old file sees it gone and locks a new one
            with contextlib.suppress(OSError):
                (out_dir / LOCK_NAME).unlink()
            os.close(fd)
        if created:
            with contextlib.suppress(OSError):  # not empty: the run wrote something, which stays
                out_dir.rmdir()


def _lock(path: Path, say) -> int | None:
    """The descriptor holding the lock, or None where files cannot be locked (said once)."""
    if fcntl is None:
        say(f"note: cannot lock {path.parent} on this system; a second run there would not be refused")
        return None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            for _ in range(10):  # the holder writes its PID a moment after it takes the lock
                if holder != "unknown":
                    break
                time.sleep(0.1)
                holder = _lock_holder(fd)
            os.close(fd)
            raise UserError(
                f"--out_dir {path.parent} is in use by another hilt train ({holder}); wait for it to finish, "
                "or choose another --out_dir"
            ) from None
        except OSError as e:  # e.g. ENOLCK on some network filesystems
            os.close(fd)
            say(f"note: cannot lock {path.parent} ({e.strerror}); a second run there would not be refused")
            return None
        try:
            current = os.stat(path)
            mine = os.fstat(fd)
            if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed the file between our open and our lock: lock the new one
    previous = _lock_holder(fd)
    if previous != "unknown":
        say(f"note: taking over {path} from {previous}, which is no longer running")
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return fd


def _lock_holder(fd: int) -> str:
    """The holder a lock file names ("PID 123 on host h, since ..."; "unknown" when empty or unreadable)."""
    try:
        record = json.loads(os.pread(fd, 4096, 0))
        return f"PID {int(record['pid'])} on host {record['host']}, since {record['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"
