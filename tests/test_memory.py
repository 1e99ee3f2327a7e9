"""Training keeps freed memory for the next step instead of faulting in fresh pages (hilt.memory)."""

import ctypes
import platform
import resource
import subprocess
import sys

import pytest
import torch

from hilt import memory
from hilt.generation.engine import Engine
from hilt.memory import OPT_OUT, freed_memory_kept
from hilt.model import HierarchicalTransformer
from hilt.training.run import Trainer
from tests.conftest import REPO, tiny_config
from tests.test_train import train

glibc_only = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's"
)

PAGES = 64 * 2**20 // 4096  # a 64 MB tensor: above glibc's largest mmap threshold (32 MB)


def page_faults_of_fresh_tensors(pages: int = PAGES, times: int = 10) -> list[int]:
    """Page faults of this thread (others, a TensorBoard writer's say, do not count) while it fills a fresh tensor
    of ``pages`` pages, which is freed at once, ``times`` times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # every page touched by this thread
    faults = []
    try:
        for _ in range(times):
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            torch.ones(pages * 1024)  # fp32: 4 bytes each
            faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
    finally:
        torch.set_num_threads(threads)
    return faults


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
        )
    ] + [("keepcost", ctypes.c_size_t)]


def pages_beyond_the_heaps_free_memory() -> int:
    """A size glibc cannot serve from the free memory its heap already holds (a 64 MB block an earlier block of
    freed_memory_kept left in the middle of the heap is reused, pages and all, under the defaults too), so under
    the defaults it must map it afresh."""
    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = _Mallinfo2
    return max(PAGES, libc.mallinfo2().fordblks // 4096 + PAGES)


@glibc_only
def test_inside_the_block_freed_memory_is_reused_without_page_faults(monkeypatch):
    monkeypatch.delenv(OPT_OUT, raising=False)
    with freed_memory_kept() as applied:
        assert applied
        # the first few grow the heap (the freed blocks need a neighbour freed too before one fits again); from
        # then on, the same memory serves every request
        assert sum(page_faults_of_fresh_tensors()[-3:]) < PAGES // 10
    # afterwards the defaults are back: a tensor the heap cannot hold is mapped afresh (and unmapped when freed)
    # every time
    pages = pages_beyond_the_heaps_free_memory()
    assert min(page_faults_of_fresh_tensors(pages)[-3:]) > pages // 2


@glibc_only
def test_the_environment_variable_keeps_the_allocators_defaults(monkeypatch):
    monkeypatch.setenv(OPT_OUT, "1")
    with freed_memory_kept() as applied:
        assert not applied
        pages = pages_beyond_the_heaps_free_memory()
        assert min(page_faults_of_fresh_tensors(pages)[-3:]) > pages // 2


@glibc_only
def test_a_nested_block_leaves_the_setting_to_the_outer_one(monkeypatch):
    monkeypatch.delenv(OPT_OUT, raising=False)
    with freed_memory_kept():
        with freed_memory_kept() as inner:
            assert inner
        assert sum(page_faults_of_fresh_tensors()[-3:]) < PAGES // 10


@glibc_only
def test_training_keeps_freed_memory_during_its_steps_and_not_during_evaluation(tmp_path, monkeypatch):
    monkeypatch.delenv(OPT_OUT, raising=False)
    depth_during = {"train_step": set(), "evaluate": set()}

    def spy_on(name):
        method = getattr(Trainer, name)

        def spy(self, *args, **kwargs):
            depth_during[name].add(memory._depth)
            return method(self, *args, **kwargs)

        monkeypatch.setattr(Trainer, name, spy)

    for name in depth_during:
        spy_on(name)
    assert train(tmp_path) == 0
    assert depth_during == {"train_step": {1}, "evaluate": {0}}


def test_on_exit_the_users_limits_come_back_else_those_glibc_would_have_reached(monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_max=7:glibc.malloc.check=0")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0x40000")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "not a number")  # glibc ignores it too
    calls = []
    libc = memory._glibc()
    monkeypatch.setattr(memory, "_glibc", lambda: _RecordingLibc(libc, calls))
    with memory.freed_memory_kept():
        pass
    assert calls[:2] == [(memory._M_MMAP_MAX, 0), (memory._M_TRIM_THRESHOLD, memory._NEVER_TRIM)]
    assert sorted(calls[2:]) == sorted(
        [(memory._M_MMAP_MAX, 7), (memory._M_TRIM_THRESHOLD, 0x40000), (memory._M_MMAP_THRESHOLD, 32 * 2**20)]
    )
    for name in ("GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(2**20))
    with memory.freed_memory_kept():
        pass
    assert sorted(calls[-3:]) == sorted(
        [
            (memory._M_MMAP_MAX, 65536),
            (memory._M_TRIM_THRESHOLD, 2 * 2**20),
            (memory._M_MMAP_THRESHOLD, 2**20),
        ]
    )


@glibc_only
def test_after_the_block_blocks_below_32_mb_are_reused_not_mapped_afresh_each_time(monkeypatch):
    # what decoding after training allocates at every step (a 16-row step's logits are 3.2 MB): had the block
    # put back glibc's start values, the self-adjustment it switched off would leave each such block mapped anew
    monkeypatch.delenv(OPT_OUT, raising=False)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    with freed_memory_kept():
        pass
    pages = 4 * 2**20 // 4096
    assert sum(page_faults_of_fresh_tensors(pages)[-3:]) < pages // 10


# a fresh process: how many pages a block faults in depends on how fragmented the heap already is, which in
# the test process is whatever the tests before this one left behind
_GROWING_BLOCKS = """
import resource, torch
from hilt.generation.engine import Engine
from hilt.model import HierarchicalTransformer
from tests.conftest import REPO, tiny_config
with Engine(HierarchicalTransformer(tiny_config()).eval(), max_slots=1):
    pass
torch.set_num_threads(1)
faults = []
for step in range(40):
    size = 4 * 2**20 + step * 16 * 2**10  # bytes: a 16-row step's fp32 keys, one position more each step
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    keys, values = torch.ones(size // 4), torch.ones(size // 4)
    del keys, values
    faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
print(sum(faults[-10:]))
"""


@glibc_only
def test_once_an_engine_starts_blocks_that_grow_each_step_reuse_the_heap(monkeypatch):
    # a decoding step's temporaries grow by a position per step: under glibc's self-adjustment each would be a
    # little larger than the largest freed mapping, so mapped and faulted afresh every step
    for name in (OPT_OUT, "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    calls = []
    libc = memory._glibc()
    monkeypatch.setattr(memory, "_glibc", lambda: _RecordingLibc(libc, calls))
    with Engine(HierarchicalTransformer(tiny_config()).eval(), max_slots=1):
        pass
    assert (memory._M_MMAP_THRESHOLD, 32 * 2**20) in calls
    run = subprocess.run(
        [sys.executable, "-c", _GROWING_BLOCKS], cwd=REPO, capture_output=True, text=True, check=True
    )
    # mapped afresh, each step would fault in both blocks: ~2,200 pages
    assert int(run.stdout) < 4 * 2**20 // 4096


@glibc_only
def test_engines_leave_the_users_settings_and_an_open_block_alone(monkeypatch):
    monkeypatch.setenv(OPT_OUT, "1")
    assert not memory.large_blocks_from_the_heap()
    monkeypatch.delenv(OPT_OUT)
    calls = []
    libc = memory._glibc()
    monkeypatch.setattr(memory, "_glibc", lambda: _RecordingLibc(libc, calls))
    with freed_memory_kept():
        opened = len(calls)
        assert not memory.large_blocks_from_the_heap()
        assert len(calls) == opened  # the block's settings stand until it ends


class _RecordingLibc:
    """glibc itself, with its mallopt calls recorded (the real calls still happen, so the process ends as it was)."""

    def __init__(self, libc, calls):
        self.libc, self.calls = libc, calls

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.libc.mallopt(param, value)

    def malloc_trim(self, pad):
        return self.libc.malloc_trim(pad)
