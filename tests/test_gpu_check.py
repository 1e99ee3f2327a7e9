"""benchmarks/gpu_check.py (`make gpu-check`): the script that checks the CUDA side on the first GPU lent must work
the first time, so its code runs here on every commit: without CUDA it says so and exits 0, `--cpu_smoke` runs
every step on the CPU with a tiny model, and a failing or hung step stops the run with one line."""

import functools
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hilt.model import HierarchicalTransformer
from tests.conftest import REPO, tiny_config

SCRIPT = REPO / "benchmarks" / "gpu_check.py"
STEPS = ["train", "kernels", "generate", "engine", "export", "torchrun", "bench"]


@functools.cache
def gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_script(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def table_rows(markdown: str) -> list[tuple[str, str, str]]:
    """(step, check, result) of each row of the results table."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    rows = [line.strip("| ").split(" | ", 2) for line in lines[1:]]  # lines[0] is the header
    return [(step, check, result) for step, check, result in rows]


def processes_naming(text: str) -> list[str]:
    """Command lines of live processes that contain ``text``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in args:
            found.append(args)
    return found


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would check it")
def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path):
    run = run_script("--results", str(tmp_path / "gpu_check.md"), timeout=300)
    assert run.returncode == 0, run.stderr
    assert len(run.stdout.splitlines()) == 1 and run.stdout.startswith("no CUDA device"), run.stdout
    assert not (tmp_path / "gpu_check.md").exists()


@pytest.mark.slow
def test_cpu_smoke_runs_every_step_and_writes_the_table(tmp_path):
    results, work = tmp_path / "gpu_check.md", tmp_path / "work"
    # a made-up peak of 100 GFLOP/s, so that the MFU arithmetic runs on the CPU too
    run = run_script(
        "--cpu_smoke", "--results", str(results), "--work_dir", str(work), "--peak_tflops", "0.1"
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = results.read_text()
    assert table.startswith("# gpu_check: all 7 steps passed")
    assert re.search(r"\d{4}-\d\d-\d\d .*on CPU: .*torch \d", table)  # dated, with the device and versions
    rows = table_rows(table)
    assert list(dict.fromkeys(step.split()[1] for step, _, _ in rows if step != "all")) == STEPS
    result = {check: text for _, check, text in rows}

    def row(prefix: str) -> str:
        return next(text for check, text in result.items() if check.startswith(prefix))

    # step 1: each precision's loss fell, bf16 and fp16 within 2% of fp32, fp16 with its scaler, exact resume
    for precision in ("bf16", "fp16", "fp32"):
        first, val = map(
            float, re.search(r"loss ([\d.]+) -> val ([\d.]+)", row(f"{precision} training")).groups()
        )
        assert val < 0.9 * first
    for precision in ("bf16", "fp16"):
        assert float(re.search(r"([\d.]+)% from fp32", row(f"{precision} training")).group(1)) <= 2
    assert "GradScaler on" in row("fp16 training")
    resume = row("SIGKILL at step")
    assert resume.startswith("bit-exact") and re.search(r"step \d+ loss = killed run's", resume)
    # step 2: the SDPA kernel ran and agreed; the compiled run's steady step was timed
    assert float(re.search(r"flash_attention logits ([\d.e+-]+)", row("SDPA kernels")).group(1)) <= 0.05
    assert re.search(r"[\d.]+ ms vs eager [\d.]+ ms", row("--compile, steady step"))
    # step 3: the cache changes nothing; both decoding speeds measured
    assert row("greedy, cache vs no cache").startswith("identical")
    with_cache, without = map(
        float, re.search(r"([\d.]+) tokens/s with the cache, ([\d.]+) without", row("batch 1")).groups()
    )
    assert with_cache > 0 and without > 0
    # step 4: tokens/s at every concurrency, batched rows equal to their runs alone
    rates = re.findall(r"(\d+): ([\d,.]+) tokens/s \(([\d.]+)x\)", row("engine,"))
    assert [int(n) for n, _, _ in rates] == [1, 4, 8] and all(
        float(r.replace(",", "")) > 0 for _, r, _ in rates
    )
    assert row("4 requests batched vs alone") == "identical"
    # step 5: transformers' greedy text is hilt generate's
    assert "= hilt generate's" in row("transformers")
    # step 6: the torchrun checkpoint scores its own val loss again
    scored, saved = re.search(r"val ([\d.]+) = saved ([\d.]+)", row("torchrun")).groups()
    assert scored == saved
    # step 7: three contestants, each with tokens/s and an MFU
    for name in ("HILT, design ILTs", "HILT, n_layers_ilt=0", "HF GPT-2"):
        rate, mfu = re.search(r"([\d,]+) tokens/s .*MFU ([\d.]+)%", row(name)).groups()
        assert float(rate.replace(",", "")) > 0 and float(mfu) > 0
    assert list(work.iterdir()) == []  # the scratch folder goes after a passing run


def test_a_failing_step_stops_the_run_with_one_line(tmp_path):
    missing = tmp_path / "missing.txt"
    run = run_script(
        "--cpu_smoke", "--text_file", str(missing), "--work_dir", str(tmp_path / "work"), timeout=600
    )
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    failures = [line for line in run.stderr.splitlines() if line.startswith("FAIL")]
    assert len(failures) == 1 and "Traceback" not in run.stderr, run.stderr
    assert failures[0].startswith("FAIL [1/7] train: hilt train") and "exited with status 2" in failures[0]
    assert "[2/7]" not in run.stdout  # nothing after the failing step ran
    assert not processes_naming(str(tmp_path))  # the child the step started is gone too


def test_a_step_past_its_timeout_is_stopped_with_one_line(tmp_path):
    run = run_script(
        "--cpu_smoke", "--timeout_scale", "0.002", "--work_dir", str(tmp_path / "work"), timeout=600
    )
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    failures = [line for line in run.stderr.splitlines() if line.startswith("FAIL")]
    assert len(failures) == 1 and re.match(r"FAIL \[1/7\] train: timed out after [\d.]+ s$", failures[0])
    assert not processes_naming(str(tmp_path))


# --- the pieces, in this process --------------------------------------------------------------------------------


def test_the_mfu_peak_comes_from_the_gpus_name_or_the_override():
    peak = gpu_check_module().gpu_peak_tflops
    assert peak("NVIDIA H100 80GB HBM3") == 989.0  # SXM
    assert peak("NVIDIA H100 PCIe") == 756.0
    assert peak("NVIDIA H100 NVL") == 835.0
    assert peak("NVIDIA H200") == 989.0
    assert peak("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak("NVIDIA L40S") == 362.0 and peak("NVIDIA L4") == 121.0
    assert peak("Tesla V100-SXM2-16GB") is None  # no bf16 tensor cores: no MFU without --peak_tflops
    assert peak("Tesla V100-SXM2-16GB", override=125.0) == 125.0
    assert peak("NVIDIA H100 80GB HBM3", override=800.0) == 800.0


def test_greedy_agreement_allows_a_parting_only_at_a_near_tie():
    gc = gpu_check_module()
    model = HierarchicalTransformer(tiny_config()).eval()
    prompt = [1, 2, 3]
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]))[0, -1]
    best, second = logits.topk(2).indices.tolist()
    gap = (logits[best] - logits[second]).item()
    device = torch.device("cpu")
    assert gc.greedy_agreement(model, prompt, [best, 5], [best, 5], device, tie=0.0) == "identical (2 tokens)"
    assert "near-tie at token 0" in gc.greedy_agreement(
        model, prompt, [best], [second], device, tie=gap + 1e-6
    )
    with pytest.raises(gc.CheckFailed, match="part at token 0"):
        gc.greedy_agreement(model, prompt, [best], [second], device, tie=gap / 2)
    with pytest.raises(gc.CheckFailed, match="stopped early"):
        gc.greedy_agreement(model, prompt, [best, 5], [best], device, tie=1e9)


def test_the_steady_step_time_is_the_median_gap_of_the_later_steps():
    gc = gpu_check_module()
    # a slow first step (compilation) and one slow step later: neither moves the figure
    times = [0.0, 5.0, 5.1, 5.2, 5.3, 9.0, 9.1, 9.2, 9.3]
    assert gc.steady_step_time(times) == pytest.approx(0.1)
