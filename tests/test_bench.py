"""benchmarks/bench.py: which CPU it says it runs on, and that a CPU without native bf16 gets fp32 contestants only."""

import importlib.util

import pytest
import torch

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("bench", REPO / "benchmarks" / "bench.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def cpuinfo(name: str, *flags: str) -> str:
    # two processors, as /proc/cpuinfo lists them
    block = f"processor\t: 0\nmodel name\t: {name}\nflags\t\t: fpu sse2 {' '.join(flags)}\n\n"
    return block + block.replace("processor\t: 0", "processor\t: 1")


AVX2 = cpuinfo("AMD EPYC 7B12", "avx", "avx2", "fma")
AVX512_BF16 = cpuinfo("AMD EPYC 9B14", "avx2", "avx512f", "avx512_bf16")
AMX = cpuinfo("Intel(R) Xeon(R) Platinum 8481C", "avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


@pytest.fixture(autouse=True)
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("text, native", [(AVX2, False), (AVX512_BF16, True), (AMX, True)])
def test_native_bf16_comes_from_the_cpu_flags(text, native):
    flags = bench.cpu_flags(text)
    assert ("avx2" in flags) and ("fpu" in flags)
    assert bench.native_bf16(flags) is native
    assert bench.native_bf16(flags, assume_no=True) is False


def test_cpu_kind_names_the_cpu_and_its_bf16():
    assert bench.cpu_kind(AVX2).startswith("AMD EPYC 7B12 (AVX2, bf16 emulated)")
    assert bench.cpu_kind(AVX512_BF16).startswith("AMD EPYC 9B14 (AVX-512 BF16, native bf16)")
    assert bench.cpu_kind(AMX).startswith("Intel(R) Xeon(R) Platinum 8481C (AMX, native bf16)")
    forced = bench.cpu_kind(AVX512_BF16, assume_no_native_bf16=True)
    assert "native bf16, run as without it (--assume_no_native_bf16)" in forced
    assert bench.cpu_kind("").startswith("unknown CPU (no AVX2")


def test_without_native_bf16_every_training_contestant_is_fp32():
    specs = bench.training_specs(native=False, ilt_kinds=("x0",))
    assert [name for name, _, _ in specs] == [
        "HILT (fp32, ILTs on)",
        "HILT (fp32, n_layers_ilt=0)",
        "HILT (fp32, ilt_kind x0)",
        "HF GPT-2 (fp32)",
    ]
    assert all(dtype is None for _, _, dtype in specs)
    assert [settings for _, settings, _ in specs] == [{}, {"n_layers_ilt": 0}, {"ilt_kind": "x0"}, None]


def test_with_native_bf16_both_precisions_race():
    specs = {name: dtype for name, _, dtype in bench.training_specs(native=True)}
    assert specs["HILT (bf16, ILTs on)"] == specs["HF GPT-2 (bf16 autocast)"] == torch.bfloat16
    assert (
        specs["HILT (fp32, ILTs on)"]
        is specs["HILT (fp32, n_layers_ilt=0)"]
        is specs["HF GPT-2 (fp32)"]
        is None
    )
