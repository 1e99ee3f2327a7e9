"""Crash-safe file writes, shared by checkpoints and the token cache, and the one-line error for a write the
operating system refuses (a full disk above all)."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from hilt.errors import UserError

TMP_SUFFIX = ".tmp"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # the device, or the user's share of it, is full
DISK_FULL = (*NO_SPACE, errno.EFBIG)  # ... or the file system (or a ulimit) takes no file this large


def os_error_behind(error: BaseException) -> OSError | None:
    """The OSError that made a write fail: ``error`` itself, or the one torch.save hides behind its own
    RuntimeError ("unexpected pos ..."), which it raises with the failed ``write``'s OSError as the context."""
    seen = set()
    while isinstance(error, BaseException) and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        if not isinstance(error, RuntimeError):
            return None
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def write_error(error: BaseException, path: str | Path, *, disk_full_only: bool = False) -> UserError | None:
    """The UserError to raise when writing ``path`` failed with ``error`` in the operating system, or None when it
    is anything else (a bug keeps its traceback). ``disk_full_only`` for code that also reads: an OSError there
    may belong to a file it read, but a full disk belongs to the write."""
    cause = os_error_behind(error)
    if cause is None or cause.errno is None:  # no errno: raised by Python code, not refused by the system
        return None
    if disk_full_only and cause.errno not in DISK_FULL:
        return None
    hint = "; free some space there or write elsewhere" if cause.errno in NO_SPACE else ""
    return UserError(
        f"could not write {path}: {cause.strerror or cause}{hint} (a file already there is unchanged)"
    )


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Calls ``write(f)`` on a temporary file in the same folder (named ``.NAME.*.tmp``), fsyncs it, then renames
    it over ``path``: a crash at any moment leaves either the old complete file or the new complete file. A write
    the operating system refuses (a full disk, a read-only folder) raises one UserError naming ``path``, and the
    temporary file is gone."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    except OSError as e:  # e.g. a read-only or vanished folder
        raise write_error(e, path) or e from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if (error := write_error(e, path)) is not None:
            raise error from None
        raise
    # make the rename itself durable
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
