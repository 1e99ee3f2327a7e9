"""Which device to run on and which precision autocast should use there."""

from __future__ import annotations

import os

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
    """torch's CPU threads from now on, for this thread and every thread started after it (None keeps torch's
    choice, one per core). Generation offers it because a decoding step is hundreds of small operators and each
    parallel one wakes the other threads and waits for them: on a 2-core VM one thread decoded 1.3-2.4x faster
    than two at every concurrency measured (docs/generation.md, "Threads")."""
    if threads is not None:
        torch.set_num_threads(threads)
