"""Training keeps freed memory for the next step instead of faulting in fresh pages (hilt.memory)."""

import platform
import resource
import sys

import pytest
import torch

from hilt import memory
from hilt.memory import OPT_OUT, freed_memory_kept
from hilt.train import Trainer
from tests.test_train import train

glibc_only = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's"
)

PAGES = 64 * 2**20 // 4096  # a 64 MB tensor: above glibc's largest mmap threshold (32 MB)


def page_faults_of_fresh_64mb_tensors(times: int = 10) -> list[int]:
    """Page faults of this thread (others, a TensorBoard writer's say, do not count) while it fills a fresh 64 MB
    tensor, which is freed at once, ``times`` times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # every page touched by this thread
    faults = []
    try:
        for _ in range(times):
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            torch.ones(PAGES * 1024)  # fp32: 4 bytes each
            faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
    finally:
        torch.set_num_threads(threads)
    return faults


@glibc_only
def test_inside_the_block_freed_memory_is_reused_without_page_faults(monkeypatch):
    monkeypatch.delenv(OPT_OUT, raising=False)
    with freed_memory_kept() as applied:
        assert applied
        # the first few grow the heap (the freed blocks need a neighbour freed too before one fits again); from
        # then on, the same memory serves every request
        assert sum(page_faults_of_fresh_64mb_tensors()[-3:]) < PAGES // 10
    # afterwards the defaults are back: such a tensor is mapped afresh (and unmapped when freed) every time
    assert min(page_faults_of_fresh_64mb_tensors()[-3:]) > PAGES // 2


@glibc_only
def test_the_environment_variable_keeps_the_allocators_defaults(monkeypatch):
    monkeypatch.setenv(OPT_OUT, "1")
    with freed_memory_kept() as applied:
        assert not applied
        assert min(page_faults_of_fresh_64mb_tensors()[-3:]) > PAGES // 2


@glibc_only
def test_a_nested_block_leaves_the_setting_to_the_outer_one(monkeypatch):
    monkeypatch.delenv(OPT_OUT, raising=False)
    with freed_memory_kept():
        with freed_memory_kept() as inner:
            assert inner
        assert sum(page_faults_of_fresh_64mb_tensors()[-3:]) < PAGES // 10


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
