"""Which device to run on and which precision autocast should use there."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Iterator

import torch

from hilt.errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but no CUDA device is available")
    return device


# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA) below AVX512_CORE_BF16
_ONEDNN_ISAS_WITHOUT_BF16 = {
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
}


def cpu_has_native_bf16() -> bool:
    """AVX-512 BF16 or AMX: bf16 matmuls run several times faster than fp32 (measured ~4x on such CPUs). The CPU
    must have them and torch must be allowed to use them: ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``
    makes torch and oneDNN run as on an AVX2-only CPU, where bf16 is emulated (a 512 x 512 bf16 matmul 7x slower
    than fp32 here), so the CPU then counts as without it."""
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    has = any(getattr(cpu, name, lambda: False)() for name in checks)
    capped = (
        torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2")
        or os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _ONEDNN_ISAS_WITHOUT_BF16
    )
    return has and not capped


def autocast_dtype(device: torch.device, use_amp: bool = True) -> torch.dtype | None:
    """bf16 on CUDA GPUs that support it (else fp16, which needs a GradScaler) and on CPUs with native bf16;
    None (plain fp32) everywhere else or with ``use_amp=False``."""
    if not use_amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def set_cpu_threads(threads: int | None) -> None:
    """torch's CPU threads from now on, for this thread and every thread started after it: an explicit
    `hilt generate --threads` or `hilt serve --threads`. None changes nothing: without the flag the engine's
    decode thread picks its own count (``Engine(threads="auto")``, hilt.generation.threads; docs/generation.md, "Threads")."""
    if threads is not None:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """``set_cpu_threads`` for a block, with the calling thread's count and the process's put back after it: a
    command run from Python (a test, a notebook) leaves torch as it found it."""
    before = torch.get_num_threads()
    set_cpu_threads(threads)
    try:
        yield
    finally:
        if threads is not None:
            torch.set_num_threads(before)


@functools.cache
def _openmp_runtimes() -> tuple[ctypes.CDLL, ...]:
    """The GNU OpenMP runtimes loaded in this process (torch's own, and any other library's copy), found in
    /proc/self/maps; none where there is none to find (macOS, Windows, another OpenMP runtime)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line and "/" in line}
    except OSError:
        return ()
    runtimes = []
    for path in sorted(paths):
        try:
            runtime = ctypes.CDLL(path)  # already loaded: the same library, not a second copy
        except OSError:
            continue
        if hasattr(runtime, "omp_pause_resource_all"):
            runtimes.append(runtime)
    return tuple(runtimes)


def release_openmp_workers() -> None:
    """Ends the OpenMP worker threads that the calling thread's parallel operators started (the next parallel
    operator of this thread starts them again; other threads keep theirs).

    GNU OpenMP keeps one pool of workers per thread that has run a parallel operator, and once it manages more
    threads than there are CPUs it lets idle workers spin only briefly (libgomp's throttled spin count): each
    parallel operator then wakes sleeping ones through the kernel. So a thread that loaded a model (the main
    thread) and then only waits still slows a decode thread down: on 2 cores a parallel add of 200K floats took
    12 us in the decode thread with the main thread's pool released, 33-69 us without, and the engine decoded one
    request at ~110 tokens/s instead of 255-300 (docs/generation.md, "Threads")."""
    for runtime in _openmp_runtimes():
        # omp_pause_soft: this thread's pool only; inside a parallel region it refuses and changes nothing
        runtime.omp_pause_resource_all(1)
