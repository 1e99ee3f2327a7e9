"""The decode thread's choice of torch threads (hilt.generation.threads): the picker on fake times and loads, the reading of
/proc, and the decode thread's setting (tests/test_threads_cli.py runs the commands)."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hilt.device import cpu_threads
from hilt.generation.threads import (
    CHECK_EVERY,
    FIRST_CHECK,
    MAX_BACKOFF,
    DecodeThreads,
    OtherLoad,
    ThreadPicker,
    candidate_counts,
)

linux_proc = pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs Linux /proc")


# --- the picker, on fake times -------------------------------------------------------------------------------


class FakeMachine:
    """A clock that decoding steps advance, and what other processes use of the cores (None: unknown)."""

    def __init__(self, others: float | None = 0.0):
        self.now = 0.0
        self.others = others

    def clock(self) -> float:
        return self.now

    def load(self) -> float | None:
        return self.others


def decode(picker: ThreadPicker, machine: FakeMachine, step_ms: dict[int, float], seconds: float, rows=1):
    """Runs steps until ``seconds`` of fake time passed; returns the count each step ran on and its length."""
    ran = []
    end = machine.now + seconds
    while machine.now < end:
        count = picker.next_step(rows)
        took = step_ms[count] / 1000
        machine.now += took
        picker.step_took(took)
        ran.append((count, took))
    return ran


def picker_on(machine: FakeMachine, max_threads: int = 2, n_cpus: int = 2) -> ThreadPicker:
    return ThreadPicker(max_threads, n_cpus=n_cpus, other_load=machine.load, clock=machine.clock)


def test_candidate_counts_are_powers_of_two_and_the_maximum():
    assert candidate_counts(1) == [1]
    assert candidate_counts(2) == [1, 2]
    assert candidate_counts(6) == [1, 2, 4, 6]
    assert candidate_counts(16) == [1, 2, 4, 8, 16]


def test_on_free_cores_a_faster_second_thread_is_taken_within_the_first_tenth_of_a_second_and_kept():
    machine = FakeMachine(others=0.1)
    picker = picker_on(machine)
    ran = decode(picker, machine, {1: 10.0, 2: 6.0}, seconds=10)
    assert picker.current == 2
    first_pick = picker.picks[0]
    assert first_pick[1] == 2 and first_pick[0] < FIRST_CHECK + 0.1  # the trial: three steps of each
    after = [c for c, _ in ran if c == 1]
    # the steps on one thread: the first 0.1 s (10), the first trial (3), later trials (3 each, ever rarer)
    assert len(after) < 40
    total = sum(t for _, t in ran)
    best = len(ran) * 0.006
    assert total / best < 1.05


def test_on_free_cores_a_slower_second_thread_is_tried_less_and_less_often():
    machine = FakeMachine(others=0.0)
    picker = picker_on(machine)
    ran = decode(picker, machine, {1: 6.0, 2: 10.0}, seconds=60)
    assert picker.current == 1 and not picker.picks
    on_two = [t for c, t in ran if c == 2]
    # trials at ~0.1, 1, 3, 7, 15, 31 s and then every 32 s: 3 steps each
    assert 3 * 5 <= len(on_two) <= 3 * 8
    assert sum(on_two) / sum(t for _, t in ran) < 0.01


def test_on_busy_cores_a_second_thread_is_never_tried():
    machine = FakeMachine(others=2.0)  # two busy-loop processes on the two cores
    picker = picker_on(machine)
    ran = decode(picker, machine, {1: 20.0, 2: 150.0}, seconds=30)
    assert {c for c, _ in ran} == {1}


def test_the_engine_starts_on_the_most_threads_the_room_allows():
    for others, expected in ((0.0, 2), (1.0, 1), (2.0, 1), (None, 1)):
        machine = FakeMachine(others=others)
        picker = picker_on(machine)
        picker.settle(sleep=lambda seconds, m=machine: setattr(m, "now", m.now + seconds))
        assert picker.current == expected, others


def test_a_prefill_takes_every_free_core_and_only_the_free_ones():
    """On free cores a step with a prefill runs on both threads even while decoding stays on the one a trial kept;
    on busy cores it stays on one, where two would collapse."""
    idle = FakeMachine(others=0.0)
    picker = picker_on(idle)
    decode(picker, idle, {1: 10.0, 2: 30.0}, seconds=5)  # a second thread decodes slower here: one is kept
    assert picker.current == 1 and picker.next_step(None) == 2 and picker.next_step(1) == 1
    busy = FakeMachine(others=2.0)
    picker = picker_on(busy)
    decode(picker, busy, {1: 20.0, 2: 150.0}, seconds=5)
    assert picker.next_step(None) == 1


def test_when_other_work_starts_the_second_thread_is_dropped_at_the_next_reading_without_a_trial():
    machine = FakeMachine(others=0.0)
    picker = picker_on(machine)
    decode(picker, machine, {1: 10.0, 2: 6.0}, seconds=5)
    assert picker.current == 2
    machine.others = 1.2  # one busy process: it and our two threads share two cores
    ran = decode(picker, machine, {1: 12.0, 2: 150.0}, seconds=30)
    slow = [t for c, t in ran if c == 2]
    assert sum(slow) <= CHECK_EVERY + 0.15  # until the next reading, at most
    assert picker.current == 1 and ran[-1][0] == 1
    machine.others = 0.0  # it ended: the room grew, so the second thread is tried again at once
    ran = decode(picker, machine, {1: 10.0, 2: 6.0}, seconds=2)
    assert picker.current == 2 and sum(t for c, t in ran if c == 1) < CHECK_EVERY + 0.1


def test_without_a_reading_of_the_room_a_collapsing_count_costs_one_step_per_trial():
    machine = FakeMachine(others=None)  # not Linux: only the timings guard
    picker = picker_on(machine)
    ran = decode(picker, machine, {1: 7.0, 2: 150.0}, seconds=120)
    assert picker.current == 1
    on_two = [t for c, t in ran if c == 2]
    assert all(t == 0.150 for t in on_two) and len(on_two) <= 9  # one step per trial, trials ever rarer
    assert sum(t for _, t in ran) / (0.007 * len(ran)) < 1.2


def test_steps_with_a_prefill_are_never_timed_and_rows_are_compared_like_with_like():
    machine = FakeMachine(others=0.0)
    picker = picker_on(machine)
    decode(picker, machine, {1: 10.0, 2: 6.0}, seconds=5, rows=None)
    assert picker.current == 1 and not picker.picks
    # two threads faster at every row count, but a step of 16 rows is slower than one of 1 row: if the trial
    # compared a 16-row step on two threads with a 1-row step on one it would keep one thread
    machine2 = FakeMachine(others=0.0)
    picker2 = picker_on(machine2)
    times = {(1, 1): 6.0, (2, 1): 4.0, (1, 16): 30.0, (2, 16): 20.0}
    rows = 1
    while machine2.now < 5:
        count = picker2.next_step(rows)
        took = times[(count, rows)] / 1000
        machine2.now += took
        picker2.step_took(took)
        rows = 17 - rows  # 1, 16, 1, 16, ...: each count's steps alternate between the two sizes
    assert picker2.current == 2


def test_after_an_idle_spell_the_room_is_read_afresh():
    machine = FakeMachine(others=0.0)
    picker = picker_on(machine)
    decode(picker, machine, {1: 10.0, 2: 6.0}, seconds=2)
    assert picker.current == 2
    picker.idle()
    machine.now += 600  # ten idle minutes; busy cores when work comes back
    machine.others = 1.8
    ran = decode(picker, machine, {1: 12.0, 2: 150.0}, seconds=3)
    assert picker.current == 1
    assert sum(t for c, t in ran if c == 2) <= FIRST_CHECK + 0.15


def test_backoff_never_passes_its_maximum():
    machine = FakeMachine(others=0.0)
    picker = picker_on(machine)
    decode(picker, machine, {1: 6.0, 2: 10.0}, seconds=400)
    assert picker._backoff == MAX_BACKOFF


# --- reading /proc -------------------------------------------------------------------------------------------


def write_proc(folder: Path, cpus: list[tuple[int, int]], own_ticks: int) -> None:
    """/proc/stat with (busy, idle) ticks per CPU, and /proc/self/stat with this process's busy ticks."""
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
    for i, (busy, idle) in enumerate(cpus):
        lines.append(f"cpu{i} {busy} 0 0 {idle} 0 0 0 0 0 0")
    (folder / "stat").write_text("\n".join(lines) + "\nintr 1 2 3\n")
    (folder / "self").mkdir(exist_ok=True)
    fields = ["S", "1", "1", "1", "0", "-1", "0", "0", "0", "0", "0", str(own_ticks - 3), "3", "0", "0"]
    (folder / "self" / "stat").write_text(f"123 (python (x) y) {' '.join(fields)}\n")


def test_other_load_is_the_busy_time_of_our_cpus_minus_our_own(tmp_path):
    write_proc(tmp_path, [(100, 900), (200, 800), (0, 1000)], own_ticks=50)
    load = OtherLoad(tmp_path, cpus={0, 1})  # cpu2 is not ours: it never counts
    # 100 ticks a CPU later: cpu0 fully busy, cpu1 half, and 60 of those 150 busy ticks were ours
    write_proc(tmp_path, [(200, 900), (250, 850), (100, 1000)], own_ticks=110)
    assert load() == pytest.approx(0.9)
    write_proc(tmp_path, [(201, 900), (250, 850), (100, 1000)], own_ticks=110)
    assert load() is None  # one tick: too short a window to count
    assert OtherLoad(tmp_path / "missing", cpus={0})() is None


@linux_proc
def test_other_load_sees_a_busy_loop_in_another_process():
    load = OtherLoad()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.1)
        load()  # the window starts with the loop running
        time.sleep(0.5)
        others = load()
    finally:
        spinner.kill()
        spinner.wait()
    assert others is not None and others >= 0.7  # a whole core when it has one; more if other work runs too


def test_decode_threads_fixed_or_inherited_never_changes_and_close_restores_the_process_setting():
    with cpu_threads(2):
        fixed = DecodeThreads(1, torch.device("cpu"))
        assert torch.get_num_threads() == 1 and fixed.picker is None and fixed.count == 1
        fixed.step(lambda: None, rows=1)
        fixed.close()
        assert torch.get_num_threads() == 2
        inherited = DecodeThreads(None, torch.device("cpu"))
        assert inherited.count == 2 and inherited.picker is None
        auto = DecodeThreads("auto", torch.device("cpu"))
        # it starts on the most threads the room it read at start allows: 2 on free cores, 1 on busy ones
        assert auto.picker is not None and auto.count == auto.picker.allowed[-1] == torch.get_num_threads()
        auto.close()
        assert torch.get_num_threads() == 2
        assert DecodeThreads("auto", torch.device("cuda")).picker is None  # a GPU decodes: nothing to pick
    assert torch.get_num_threads() == 1  # the tests' own setting (conftest), back
