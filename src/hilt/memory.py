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

# mallopt parameters (malloc.h, mallopt(3))
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_DEFAULT_MMAP_MAX = 65536
# the ceiling of glibc's self-adjusting mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX), which it also
# raises the trim threshold to twice of
_MMAP_THRESHOLD_CEILING = 32 * 2**20
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int
# where a process can have set them before us: glibc's tunables, and its older environment variables
_TUNABLES = {
    _M_TRIM_THRESHOLD: "glibc.malloc.trim_threshold",
    _M_MMAP_THRESHOLD: "glibc.malloc.mmap_threshold",
    _M_MMAP_MAX: "glibc.malloc.mmap_max",
}
_ENVIRONMENT = {
    _M_TRIM_THRESHOLD: "MALLOC_TRIM_THRESHOLD_",
    _M_MMAP_THRESHOLD: "MALLOC_MMAP_THRESHOLD_",
    _M_MMAP_MAX: "MALLOC_MMAP_MAX_",
}

OPT_OUT = "HILT_RETURN_FREED_MEMORY"  # set to 1 to keep glibc's defaults


def _glibc() -> ctypes.CDLL | None:
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or os.environ.get(OPT_OUT) == "1":
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _set_at_start() -> dict[int, int]:
    """The mallopt values set for this process before it started: GLIBC_TUNABLES, then the older MALLOC_*_
    variables, where glibc itself reads them at start-up. Malformed values are left out, as glibc ignores them."""
    tunables = dict(
        item.split("=", 1) for item in os.environ.get("GLIBC_TUNABLES", "").split(":") if "=" in item
    )
    values = {}
    for param in _TUNABLES:
        text = tunables.get(_TUNABLES[param], os.environ.get(_ENVIRONMENT[param]))
        with contextlib.suppress(TypeError, ValueError):
            values[param] = int(text, 0)
    return values


def values_after() -> dict[int, int]:
    """The limits set when the outermost block ends: those the user set (``_set_at_start``), else the state that
    glibc's own adjustment reaches in a process that frees large blocks, as every torch process does: blocks up to
    32 MB served from the heap, its top returned to the OS past 64 MB free.

    Not glibc's start values (128 KB for both): any mallopt call ends that adjustment for good, so those would
    stay fixed, every block over 128 KB would be mapped and zeroed afresh at each use, and a 16-row decoding step
    after training took 71.5 ms instead of 25.6 (16,000 page faults a step instead of none)."""
    user = _set_at_start()
    mmap_threshold = user.get(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_CEILING)
    return {
        _M_MMAP_THRESHOLD: mmap_threshold,
        _M_TRIM_THRESHOLD: user.get(_M_TRIM_THRESHOLD, 2 * mmap_threshold),
        _M_MMAP_MAX: user.get(_M_MMAP_MAX, _DEFAULT_MMAP_MAX),
    }


_depth = 0  # nested blocks: only the outermost one sets and restores


def large_blocks_from_the_heap() -> bool:
    """From now on serve blocks up to 32 MB from the heap: ``values_after``'s limits, where glibc's own adjustment
    would end once the process had freed a 32 MB block (glibc only; the user's settings and an open
    ``freed_memory_kept`` block are left alone). Returns whether the limits were set.

    Why decoding needs it: glibc maps a block afresh when it is larger than the largest mapped block freed so far,
    and a decoding step's temporaries grow by one position per step, so each is a little larger than the last one
    freed. Every one of them was mapped, page-faulted and zeroed anew: in a 16-row step of the default model each
    fp32 copy of a layer's cached keys took 1.3-1.8 ms instead of 0.2-0.3 ms (4.3 MB, one thread), and 16
    concurrent requests ran ~1.10x faster with it; on a later, faster CPU it changed nothing end to end."""
    libc = _glibc()
    if libc is None or _depth:
        return False
    _apply_values_after(libc)
    return True


def _apply_values_after(libc: ctypes.CDLL) -> None:
    for param, value in values_after().items():
        libc.mallopt(param, value)


@contextlib.contextmanager
def freed_memory_kept() -> Iterator[bool]:
    """Within the block, freed memory stays in the process for the next allocation (glibc only; elsewhere, or with
    HILT_RETURN_FREED_MEMORY=1, nothing changes). Yields whether the setting is in effect. Afterwards the free
    memory is returned to the OS at once and the limits are ``values_after``'s: the user's, or those glibc's
    self-adjustment would have reached (which the block's mallopt calls switched off for good)."""
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
            _apply_values_after(libc)
            libc.malloc_trim(0)
