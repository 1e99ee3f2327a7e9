"""What the benchmark scripts share: the line naming the CPU a figure was measured on, and training steps timed
taking turns. Each script imports it as ``common``: Python puts a script's own folder first on its path, so
``.venv/bin/python benchmarks/<name>.py`` from the repository root finds it.

torch is imported inside the functions that need it, so a script that must not load it (bench_data.py's prepare
runs, serve_bench.py's clients) can still name the CPU.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from pathlib import Path

# GPT-2's 50,257 ids + HILT's <PAD>, <BOS>, <EOS>: the vocabulary of every default-shaped model
VOCAB = 50260


# --- what kind of CPU this is ----------------------------------------------------------------------------------


def read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return ""


def cpu_flags(cpuinfo: str) -> set[str]:
    """The CPU's feature flags in /proc/cpuinfo's text (empty where there is none)."""
    line = next((ln for ln in cpuinfo.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def cpu_name(cpuinfo: str | None = None) -> str:
    cpuinfo = read_cpuinfo() if cpuinfo is None else cpuinfo
    name = next(
        (ln.partition(":")[2].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), ""
    )
    return name or platform.processor() or "unknown CPU"


def cpu_kind(assume_no_native_bf16: bool = False) -> str:
    """One line naming the CPU, its widest vector unit, whether its bf16 is native (AVX-512 BF16 or AMX: bf16
    matmuls in hardware; elsewhere torch emulates them, several times slower than fp32), its cores and torch's CPU
    capability (which ``ATEN_CPU_CAPABILITY`` caps), for the head of a table: its figures are this machine's."""
    import torch

    from hilt.device import cpu_has_native_bf16

    cpuinfo = read_cpuinfo()
    flags = cpu_flags(cpuinfo)
    widest = next(
        (label for flag, label in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"),
                                   ("avx2", "AVX2")) if flag in flags),
        "no AVX2",
    )  # fmt: skip
    # the hardware's answer; without /proc/cpuinfo, torch's (which also says no under ISA caps)
    native = bool({"avx512_bf16", "amx_bf16"} & flags) if flags else cpu_has_native_bf16()
    bf16 = "native bf16" if native else "bf16 emulated"
    forced = ", run as without it (--assume_no_native_bf16)" if assume_no_native_bf16 else ""
    return (
        f"{cpu_name(cpuinfo)} ({widest}, {bf16}{forced}), {os.cpu_count()} cores, torch CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}"
    )


# --- training steps, taking turns ------------------------------------------------------------------------------


class Contestant:
    """One model + optimizer + precision; ``step()`` is one forward + backward + clip + AdamW step, as train.py's."""

    def __init__(self, name, model, amp_dtype, flops_per_token, loss_fn):
        from hilt.training.run import TrainConfig, build_optimizer

        self.name, self.model, self.amp_dtype = name, model, amp_dtype
        self.flops_per_token = flops_per_token
        self.loss_fn = loss_fn
        self.optimizer = build_optimizer(model, TrainConfig(text_file="-"))
        self.times: list[float] = []

    def step(self, x, y) -> None:
        import torch

        t0 = time.perf_counter()
        ctx = torch.autocast("cpu", dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        with ctx:
            loss = self.loss_fn(self.model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - t0)


def take_turns(contestants: list[Contestant], x, y, warmup: int, steps: int, shuffle=None) -> None:
    """warmup + steps rounds of one step per contestant, in turn (in a new order every round when ``shuffle``, a
    ``random.Random``, is given): a drift in the machine's speed hits every contestant alike. Only the last
    ``steps`` are timed."""
    for i in range(warmup + steps):
        for c in shuffle.sample(contestants, len(contestants)) if shuffle else contestants:
            c.step(x, y)
            if i < warmup:
                c.times.clear()
        print(f"  training round {i + 1}/{warmup + steps}", file=sys.stderr, end="\r")
