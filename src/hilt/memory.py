"""Host memory during CPU training: freed memory stays in the process for the next step.

glibc's malloc maps large blocks afresh with mmap (from 128 KB, a threshold that rises with use to at most 32 MB; the
vocabulary-sized logits chunk and the embedding's gradient, 51 MB each at the defaults, always qualify), unmaps them
when they are freed, and returns the top of its heap to the OS once enough of it is free. Each such page then costs
a page fault and the kernel's zeroing when it is used again: 74,000-78,000 faults per default HILT step at batch
16 x 128 (about 300 MB). Inside ``freed_memory_kept`` nothing is mapped or returned: after the first few steps the
heap holds what a step needs and every step reuses it (0-1,200 faults per step): a HILT step at batch 16 x 128
took 6-16% less time, a 25-step default train.py run (batch 32) 5% less wall time. Evaluation and checkpoints run
outside it (inside, evaluation's other shapes grew the heap by 0.2-0.3 GB), so the peak RSS of a default train.py
run stays where it was (1.74-1.80 GB against 1.71-1.77).

The setting is process-wide: every thread's allocations follow it while the block is open, and the block itself
is not thread-safe (open it from one thread, the one that owns the training loop).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
from collections.abc import Iterator

# mallopt parameters and their glibc defaults (malloc.h, mallopt(3))
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int
# where a process can have set them before us: glibc's tunables, and its older environment variables
_TUNABLES = {_M_TRIM_THRESHOLD: "glibc.malloc.trim_threshold", _M_MMAP_MAX: "glibc.malloc.mmap_max"}
_ENVIRONMENT = {_M_TRIM_THRESHOLD: "MALLOC_TRIM_THRESHOLD_", _M_MMAP_MAX: "MALLOC_MMAP_MAX_"}
_DEFAULTS = {_M_TRIM_THRESHOLD: _DEFAULT_TRIM_THRESHOLD, _M_MMAP_MAX: _DEFAULT_MMAP_MAX}

OPT_OUT = "HILT_RETURN_FREED_MEMORY"  # set to 1 to keep glibc's defaults


def _glibc() -> ctypes.CDLL | None:
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or os.environ.get(OPT_OUT) == "1":
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def values_at_start() -> dict[int, int]:
    """The mallopt values this process started with. glibc has no call that reads them back, so they are taken
    from where glibc itself read them at start-up (GLIBC_TUNABLES, then the MALLOC_*_ variables), else its
    documented defaults. Code that calls mallopt itself (nothing in HILT outside this module) is not seen."""
    tunables = dict(
        item.split("=", 1) for item in os.environ.get("GLIBC_TUNABLES", "").split(":") if "=" in item
    )
    values = {}
    for param, default in _DEFAULTS.items():
        text = tunables.get(_TUNABLES[param], os.environ.get(_ENVIRONMENT[param]))
        try:
            values[param] = int(text, 0) if text else default
        except ValueError:  # glibc ignores a malformed value too
            values[param] = default
    return values


_depth = 0  # nested blocks: only the outermost one sets and restores


@contextlib.contextmanager
def freed_memory_kept() -> Iterator[bool]:
    """Within the block, freed memory stays in the process for the next allocation (glibc only; elsewhere, or with
    HILT_RETURN_FREED_MEMORY=1, nothing changes). Yields whether the setting is in effect. Afterwards the limits
    the process started with are back (``values_at_start``) and the free memory is returned to the OS at once.
    One thing cannot be restored: any mallopt call freezes glibc's self-adjusting mmap threshold at the value it
    had reached (128 KB to 32 MB)."""
    global _depth
    libc = _glibc()
    if libc is None:
        yield False
        return
    _depth += 1
    try:
        if _depth == 1:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
        yield True
    finally:
        _depth -= 1
        if _depth == 0:
            for param, value in values_at_start().items():
                libc.mallopt(param, value)
            libc.malloc_trim(0)
