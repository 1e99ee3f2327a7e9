"""How many CPU threads the engine's decode thread runs torch with when `--threads` is not given.

torch's default, one thread per core, is fast only while the cores are free. When other work holds them, every
parallel operator waits at its barrier for a worker that the kernel has not scheduled yet: on a 2-core VM with
other work running, one 100-token request took 10.6-18.1 s on two threads and 1.3-2.3 s on one. And even on an
idle machine one thread has been the faster choice for small decoding steps on some CPUs. So the decode thread
picks its own count, and picks again as the load changes (``ThreadPicker``):

1. Room. At the start and every half second it reads how much CPU time other processes used on the cores this process may run on
   (``OtherLoad``: Linux /proc/stat minus this process's own time) and allows only the counts that fit in the
   cores they left free, one at the least. A count above that is dropped at once, without trying it: that is
   where the collapse happens.
2. Speed. Among the counts allowed, a trial runs a few decoding steps on each in turn and keeps the fastest (the
   current count unless another one's median step is 5% faster). A count whose step takes over twice the current
   count's is dropped from the trial after that one step. Trials come back after 1 s, then 2, 4, ... up to 32 s
   while the choice holds, and at once when more counts become allowed.

3. Size. A step with a prefill runs many tokens through large products, which every free core speeds up: it takes
   the largest count allowed, not the picked one. Such steps are never timed; only steps without a prefill are,
   and only against steps of about the same number of rows.

It starts on the most threads the room allows, read over a tenth of a second when the engine starts (one thread
where nothing can be read).

``DecodeThreads`` is what the engine holds: a fixed count or the picker, applied on the decode thread only, and the
process's setting restored when that thread ends (torch's count is per thread, but the last one set is also what
threads started later begin with).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

CHECK_EVERY = 0.5  # seconds between two readings of the room
FIRST_CHECK = 0.1  # the first reading after start or idling: 10 clock ticks a core, enough to see a busy core
TRIAL_STEPS = 3  # timed steps per count in a trial
TRIAL_LIMIT = 40  # timed steps a trial may take when the rows keep changing
FASTER_BY = 0.05  # another count must be this much faster to replace the current one
REJECT_AT = 2.0  # a trial step this many times the current count's fastest ends that count's trial
MIN_BACKOFF, MAX_BACKOFF = 1.0, 32.0  # seconds between trials while the choice holds
ROOM_SLACK = 0.5  # free cores are rounded to the nearest: 1.6 free cores fit 2 threads, 1.4 fit 1


def candidate_counts(max_threads: int) -> list[int]:
    """1, 2, 4, ... and ``max_threads`` itself: on a large machine the trial stays short."""
    counts = {max_threads}
    c = 1
    while c < max_threads:
        counts.add(c)
        c *= 2
    return sorted(counts)


class OtherLoad:
    """Cores' worth of CPU time used by other processes, on the CPUs this process may run on, since the previous
    call; None where /proc cannot tell (not Linux) or the window was too short to count."""

    def __init__(self, proc: str | Path = "/proc", cpus: set[int] | None = None):
        self.proc = Path(proc)
        if cpus is None:
            cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        self.cpus = {f"cpu{c}" for c in cpus}
        self._last = self._read()

    @property
    def n_cpus(self) -> int:
        return len(self.cpus)

    def _read(self) -> tuple[int, int, int] | None:
        """(busy ticks, all ticks) summed over our CPUs, and this process's own busy ticks."""
        try:
            stat = (self.proc / "stat").read_text()
            own = (self.proc / "self" / "stat").read_text()
        except OSError:
            return None
        busy = total = 0
        for line in stat.splitlines():
            fields = line.split()
            if not fields or fields[0] not in self.cpus:
                continue
            # user nice system idle iowait irq softirq steal: steal is time the hypervisor gave to someone else
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, fields[1:9])
            busy += user + nice + system + irq + softirq + steal
            total += user + nice + system + idle + iowait + irq + softirq + steal
        # the command name (field 2) may hold spaces: count from the ")" that ends it; utime, stime are 14, 15
        after_name = own.rsplit(")", 1)[1].split()
        ours = int(after_name[11]) + int(after_name[12])
        return busy, total, ours

    def __call__(self) -> float | None:
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None or not self.cpus:
            return None
        busy, total, ours = (a - b for a, b in zip(now, last, strict=True))
        if total < 4 * len(self.cpus):  # under 4 ticks a core: too few to count
            return None
        return max(0.0, busy - ours) / (total / len(self.cpus))


def threads_that_fit(max_threads: int | None = None, window: float = FIRST_CHECK) -> int:
    """The room check alone, once (for decoding outside the engine: beam search): the most threads, up to
    ``max_threads`` (default: torch's setting), that fit in the cores other processes leave free over the next
    ``window`` seconds; ``max_threads`` where /proc cannot tell."""
    max_threads = max_threads or torch.get_num_threads()
    load = OtherLoad()
    time.sleep(window)
    others = load()
    if others is None:
        return max_threads
    return min(max_threads, _fits(load.n_cpus, others))


def _fits(n_cpus: int, others: float) -> int:
    return max(1, math.floor(n_cpus - others + ROOM_SLACK))


class ThreadPicker:
    """The count for each step of a decode thread, from the room other processes leave (``other_load``, cores
    they used since its previous call, None if unknown) and the times of the steps run (see the module
    docstring). ``clock`` and ``other_load`` are injectable so that the choice can be tested with fake times.

    Per step: ``count = picker.next_step(rows)`` (rows: the rows of a step that only decodes; None for a step
    with a prefill, which is never timed), run the step on ``count`` threads, then ``picker.step_took(seconds)``.
    ``idle()`` when the thread is about to wait for work: the load seen before says little about the load after.
    """

    def __init__(
        self,
        max_threads: int,
        *,
        n_cpus: int | None = None,
        other_load: Callable[[], float | None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        if other_load is None:
            load = OtherLoad()
            other_load, n_cpus = load, n_cpus or load.n_cpus
        self.counts = candidate_counts(max(1, max_threads))
        self.n_cpus = n_cpus or os.cpu_count() or 1
        self.other_load = other_load
        self.clock = clock
        self.current = 1
        self.allowed = [1]  # until the first reading of the room
        self.room_known = False
        self.picks: deque[tuple[float, int, str]] = deque(maxlen=64)  # (time, count, why), the latest ones
        now = clock()
        self._next_check = now + FIRST_CHECK
        self._next_trial = math.inf  # set by the first reading
        self._backoff = MIN_BACKOFF
        self._resumed = False
        self._trial: list[int] = []  # the counts the running trial still times; [] = no trial
        self._trial_left = 0  # timed steps before the trial decides with what it has
        self._samples: dict[tuple[int, int], list[float]] = {}  # (rows bucket, count) -> step seconds
        self._step: tuple[int, int | None] = (1, None)  # the count and bucket of the step in flight

    # --- the decode thread's calls ---

    def next_step(self, rows: int | None) -> int:
        now = self.clock()
        if self._resumed:
            self._resumed = False
            self.other_load()  # start a fresh window: the idle spell's average is stale
            self._next_check = now + FIRST_CHECK
            self._trial = []
        if now >= self._next_check:
            self._check_room(now)
        if not self._trial and now >= self._next_trial and len(self.allowed) > 1:
            self._trial, self._samples, self._trial_left = list(self.allowed), {}, TRIAL_LIMIT
        # a step with a prefill runs many tokens through big products, which a free core speeds up: it takes all
        # the room other processes leave (never a count that does not fit: that is the collapse); it is not timed
        count, bucket = (self.current if rows is not None else self.allowed[-1]), None
        if rows is not None and self._trial:
            # the count with the fewest steps timed at this many rows (the current one first, as the yardstick)
            bucket = _bucket(rows)
            count = min(
                self._trial, key=lambda c: (len(self._samples.get((bucket, c), ())), c != self.current)
            )
        self._step = (count, bucket)
        return count

    def step_took(self, seconds: float) -> None:
        count, bucket = self._step
        if bucket is None or count not in self._trial:
            return
        self._samples.setdefault((bucket, count), []).append(seconds)
        yardstick = self._samples.get((bucket, self.current))
        if count != self.current and yardstick and seconds > REJECT_AT * min(yardstick):
            self._trial.remove(count)  # one step was enough: this is the collapse, or close to it
        self._trial_left -= 1
        timed = any(
            all(len(self._samples.get((b, c), ())) >= TRIAL_STEPS for c in self._trial)
            for b, _ in self._samples
        )
        if timed or self._trial_left == 0 or self._trial == [self.current]:
            self._decide()

    def idle(self) -> None:
        self._resumed = True

    def settle(self, sleep: Callable[[float], None] = time.sleep) -> None:
        """Reads the room once before the first step and starts on the most threads it allows (a trial then
        checks that count against the others): on free cores the first requests do not wait on one thread for a
        trial to reach them. Costs the engine's start a tenth of a second."""
        self.other_load()
        sleep(FIRST_CHECK)
        self._check_room(self.clock())
        if self.room_known and self.allowed[-1] != self.current:
            self._pick(self.allowed[-1], "the room at start")

    # --- the choice ---

    def _check_room(self, now: float) -> None:
        self._next_check = now + CHECK_EVERY
        others = self.other_load()
        self.room_known = others is not None
        if others is None:
            fits = self.counts[-1]  # no reading: the trials' rejections are the only guard
        else:
            fits = _fits(self.n_cpus, others)
        allowed = [c for c in self.counts if c <= fits] or [1]
        grew = allowed[-1] > self.allowed[-1]
        self.allowed = allowed
        if self.current > allowed[-1]:
            self._pick(allowed[-1], f"others use {others:.1f} of {self.n_cpus} cores")
            self._trial = []
            self._backoff = MIN_BACKOFF
            self._next_trial = now + MIN_BACKOFF
        elif grew or self._next_trial == math.inf:
            self._trial = []
            self._next_trial = now  # more room than when the current count was chosen: try it now
        else:
            self._trial = [c for c in self._trial if c in allowed]

    def _decide(self) -> None:
        """The fastest count at the row count where the most of the trial's counts were timed."""
        now = self.clock()
        counts, samples = self._trial, self._samples
        self._trial, self._samples = [], {}

        def coverage(b: int) -> tuple[int, int]:
            return sum((b, c) in samples for c in counts), sum(len(samples.get((b, c), ())) for c in counts)

        bucket = max({b for b, _ in samples}, key=coverage)
        times = {c: statistics.median(samples[(bucket, c)]) for c in counts if (bucket, c) in samples}
        if self.current not in times:  # never timed side by side (the rows kept changing): try again soon
            self._next_trial = now + MIN_BACKOFF
            return
        best = min(times, key=times.get)
        if best != self.current and times[best] < (1 - FASTER_BY) * times[self.current]:
            self._pick(best, f"{1000 * times[best]:.2f} ms a step against {1000 * times[self.current]:.2f}")
            self._backoff = MIN_BACKOFF
        else:
            self._backoff = min(MAX_BACKOFF, 2 * self._backoff)
        self._next_trial = now + self._backoff

    def _pick(self, count: int, why: str) -> None:
        self.current = count
        self.picks.append((self.clock(), count, why))


def _bucket(rows: int) -> int:
    """Quarter octaves of the row count: steps within ~19% of each other's rows are timed against each other."""
    return round(4 * math.log2(rows))


class DecodeThreads:
    """torch's thread count on the engine's decode thread: ``threads`` an int keeps that count, ``"auto"`` picks it
    (``ThreadPicker``, up to the process's setting, on CPU only), None leaves the process's setting. Create, use
    and ``close`` it on the decode thread: the count is per thread in torch, but setting it also changes what
    threads started afterwards begin with, so ``close`` puts the process's setting back."""

    def __init__(self, threads: int | str | None, device: torch.device):
        self.initial = torch.get_num_threads()  # the process's setting, as this new thread inherits it
        self.picker = None
        if threads == "auto":
            if device.type == "cpu" and self.initial > 1:
                self.picker = ThreadPicker(self.initial)
                self.picker.settle()
            self._apply(self.picker.current if self.picker else self.initial)
        else:
            self._apply(self.initial if threads is None else int(threads))

    @property
    def count(self) -> int:
        """The count chosen for now (a trial may be running a step on another)."""
        return self.picker.current if self.picker is not None else self.current

    def step(self, run: Callable[[], None], rows: int | None) -> None:
        """Runs one engine step on the count for it (``rows``: see ``ThreadPicker.next_step``)."""
        if self.picker is None:
            run()
            return
        self._apply(self.picker.next_step(rows))
        start = time.perf_counter()
        run()
        self.picker.step_took(time.perf_counter() - start)

    def idle(self) -> None:
        if self.picker is not None:
            self.picker.idle()

    def close(self) -> None:
        self._apply(self.initial)

    def _apply(self, count: int) -> None:
        self.current = count
        if torch.get_num_threads() != count:
            torch.set_num_threads(count)
