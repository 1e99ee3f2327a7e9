"""The benchmark suite runs as its docs say, `.venv/bin/python benchmarks/<name>.py` from the repository root: each
script starts (its shared module found, the package's names it imports still there) and answers --help with
every flag its parser declares. The scripts run as subprocesses; no test imports one."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.test_docs import script_flags

SUITE = [
    "ab_revisions", "ablation", "bench", "bench_data", "engine_bench", "eval_bench", "serve_bench", "threads_bench"
]  # fmt: skip


def run_script(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny runs: a second thread only waits on a busy machine
    return subprocess.run(
        [sys.executable, f"benchmarks/{name}.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", SUITE)
def test_every_benchmark_starts_and_lists_its_flags(name):
    declared = script_flags(REPO / "benchmarks" / f"{name}.py")
    proc = run_script(name, "--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:")
    assert len(declared) >= 4
    assert sorted(f for f in declared if f not in proc.stdout) == []


@pytest.mark.slow
def test_eval_bench_times_every_phase_of_a_tiny_model():
    proc = run_script(
        "eval_bench",
        *("--d_model", "32", "--n_layers", "2", "--n_heads", "2", "--ilt_dim", "16"),
        *("--batch_size", "2", "--seq_len", "16", "--batches", "1", "--rounds", "1"),
    )
    assert proc.returncode == 0, proc.stderr
    head, table = proc.stdout.split("\n\n", 1)
    assert " cores, torch CPU capability " in head  # the CPU the figures belong to
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    phases = {row[0].lstrip("| "): float(row[1].replace(",", "")) for row in rows[1:]}
    assert len(phases) == 5 and all(rate > 0 for rate in phases.values())
    training = phases["training step (fwd+bwd+AdamW)"]
    assert rows[1][2] == "1.00x"
    assert float(rows[2][2].rstrip("x")) == pytest.approx(
        phases["hilt eval (evaluate_tokens)"] / training, abs=0.01
    )


def test_equivalence_compares_two_fingerprints_entry_by_entry(tmp_path):
    """A refactor's before/after check: identical fingerprints pass, one changed entry fails and is named."""
    before, same, other = (tmp_path / f"{n}.json" for n in ("before", "same", "other"))
    before.write_text('{"model": {"design w2": "ab"}, "design fp32": {"weights": "cd"}}')
    same.write_text(before.read_text())
    other.write_text('{"model": {"design w2": "ab"}, "design fp32": {"weights": "ce"}}')
    assert run_script("equivalence", "--compare", str(before), str(same)).returncode == 0
    proc = run_script("equivalence", "--compare", str(before), str(other))
    assert proc.returncode == 1
    assert "design fp32: DIFFERENT" in proc.stdout and "model: identical" in proc.stdout
