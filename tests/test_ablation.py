"""benchmarks/ablation.py, run as a user runs it (a subprocess, a tiny model on a slice of data.txt): every arm trains
for the steps its FLOP budget buys, counted by hilt.model.flops; deltas are paired by seed; the table reads equal time by
the measured step cost; a budget the validations cannot hold is refused before any training; --resume finds the
finished runs of the same text wherever it lies; the medium scale reads the corpus shipped in the repository."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hilt.model import ModelConfig
from hilt.model.flops import training_flops_per_token
from tests.conftest import DATA_TXT, REPO

TINY = dict(d_model=32, n_layers=2, n_heads=2, ilt_dim=16)
B, T, VOCAB = 4, 16, 300
BUDGET = 24 * B * T * 217_344  # 24 steps of the plain model


def ablation(tmp: Path, text: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "benchmarks/ablation.py", "--text_file", str(text), "--work_dir", str(tmp / "work"),
           "--out_dir", str(tmp / "out"), "--tokenizer", f"bpe{VOCAB}", "--seq_len", str(T), "--batch_size", str(B),
           "--workers", "1", "--val_tokens", "512", *(f"--{k}={v}" for k, v in TINY.items()), *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "slice.txt"
    path.write_text(DATA_TXT.read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, text) -> tuple[Path, dict, str]:
    """Step costs measured first (--step_times), then 4 arms x 2 seeds at the budget."""
    tmp = tmp_path_factory.mktemp("ablation")
    timed = ablation(tmp, text, "--arms", "plain,hilt", "--step_times", "2", "--vocab_size", str(VOCAB))
    assert timed.returncode == 0, timed.stderr
    run = ablation(tmp, text, "--arms", "hilt,plain,plain+,ilt_off", "--seeds", "2", "--evals", "2",
                   "--budget", str(BUDGET))  # fmt: skip
    assert run.returncode == 0, run.stderr
    return tmp, json.loads((tmp / "out" / "ablation.json").read_text()), run.stdout


@pytest.mark.slow
def test_every_arm_trains_the_steps_its_flop_budget_buys(finished):
    tmp, results, _ = finished
    rows = {r["arm"]: r for r in results["rows"]}
    assert list(rows) == ["hilt", "plain", "plain+", "ilt_off"]
    for arm, row in rows.items():
        config = ModelConfig(vocab_size=VOCAB, max_seq_len=T, **{**TINY, "ilt_rank": 32, **row["overrides"]})
        per_token = training_flops_per_token(config, T)
        assert row["train_flops_per_token"] == per_token
        assert row["flop_count_check"] == 1.0  # torch's count of the same model agreed
        steps = round(BUDGET / (per_token * B * T))
        assert row["steps"] == steps - steps % 2  # a whole number of steps per validation
        runs = [r for r in results["runs"] if r["arm"] == arm]
        assert sorted(r["seed"] for r in runs) == [0, 1]
        assert all(r["flops"] == row["steps"] * B * T * per_token for r in runs)
        assert all([p["step"] for p in r["curve"]] == [row["steps"] // 2, row["steps"]] for r in runs)
        assert all(r["val_loss"] < np.log(VOCAB) + 0.5 for r in runs)
    assert rows["plain"]["steps"] == 24 and rows["hilt"]["steps"] == 16
    assert rows["ilt_off"]["train_flops_per_token"] == rows["hilt"]["train_flops_per_token"]
    # plain+ gets the ILTs' parameters back as depth and width: closer to hilt's size than plain is
    assert abs(rows["plain+"]["params"] / rows["hilt"]["params"] - 1) < 0.15
    assert rows["plain"]["params"] < rows["plain+"]["params"]
    # each run's metrics stay for `hilt plot`; its weights do not
    metrics = tmp / "work" / "runs" / "hilt-s0" / "metrics.jsonl"
    epochs = [r for r in map(json.loads, metrics.open()) if r["kind"] == "epoch"]
    hilt_s0 = next(r for r in results["runs"] if r["arm"] == "hilt" and r["seed"] == 0)
    assert [e["val_loss"] for e in epochs] == [p["val_loss"] for p in hilt_s0["curve"]]
    assert not list((tmp / "work" / "runs").glob("*/*.pt"))


@pytest.mark.slow
def test_deltas_are_paired_by_seed_and_equal_time_uses_the_step_cost(finished):
    tmp, results, _ = finished
    loss = {(r["arm"], r["seed"]): r["val_loss"] for r in results["runs"]}
    rows = {r["arm"]: r for r in results["rows"]}
    for arm in ("hilt", "plain+", "ilt_off"):
        paired = [loss[arm, s] - loss["plain", s] for s in (0, 1)]
        assert rows[arm]["delta_vs_plain"] == pytest.approx(np.mean(paired))
        assert rows[arm]["delta_vs_plain_sd"] == pytest.approx(np.std(paired, ddof=1))
        assert rows[arm]["delta_vs_plain_seeds"] == 2
    assert rows["plain"]["delta_vs_x0_seeds"] == 0  # no x0 arm ran: its column says so
    # --step_times measured hilt's step against plain's; in plain's time hilt reaches that fraction of its steps
    costs = json.loads((tmp / "out" / "ablation_step_times.json").read_text())["cpu_vs_plain"]
    assert costs["plain"] == 1.0 and costs["hilt"] > 1.0
    assert rows["hilt"]["equal_time_step"] == pytest.approx(min(24 / costs["hilt"], 16))
    assert "equal_time_step" not in rows["plain+"]  # its step was not timed
    table = (tmp / "out" / "ablation.md").read_text()
    assert "at plain's time by step cost" in table
    hilt_line = next(line for line in table.splitlines() if line.startswith("| hilt |"))
    assert f"{rows['hilt']['delta_vs_plain']:+.4f} ± {rows['hilt']['delta_vs_plain_sd']:.4f} (2)" in hilt_line


@pytest.mark.slow
def test_a_budget_longer_than_the_validations_allow_is_refused_before_training(tmp_path, text):
    proc = ablation(
        tmp_path, text, "--arms", "plain", "--seeds", "1", "--evals", "2", "--budget", str(BUDGET * 100)
    )
    assert proc.returncode == 2
    assert "more than one pass over the data" in proc.stderr and "use --evals" in proc.stderr
    assert not (tmp_path / "out" / "ablation_runs.jsonl").exists()


@pytest.mark.slow
def test_resume_reuses_finished_runs_of_the_same_text_at_another_path(finished, tmp_path):
    """The committed runs files must serve any clone: a run is matched by its text's content, not its path."""
    tmp, results, _ = finished
    moved = tmp_path / "elsewhere" / "slice.txt"
    moved.parent.mkdir()
    moved.write_bytes(Path(results["meta"]["settings"]["text_file"]).read_bytes())
    again = ablation(tmp, moved, "--arms", "hilt,plain,plain+,ilt_off", "--seeds", "2", "--evals", "2",
                     "--budget", str(BUDGET), "--resume")  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "--resume: 8 runs already done" in again.stdout
    assert " val loss " not in again.stdout.split("--resume:")[1].split("\n| arm |")[0]  # nothing trained
    rows = json.loads((tmp / "out" / "ablation.json").read_text())["rows"]
    assert [r["val_loss"] for r in rows] == [r["val_loss"] for r in results["rows"]]


@pytest.mark.slow
def test_the_medium_scale_trains_on_the_shipped_corpus(tmp_path):
    """A clone has benchmarks/data/kjv.txt.xz and nothing outside the repository: the medium scale unpacks it (the
    corpus reader takes plain text only) and records the text's SHA-256, which its README states."""
    readme = (REPO / "benchmarks" / "data" / "README.md").read_text(encoding="utf-8")
    stated = next(line.split()[0] for line in readme.splitlines() if line.strip().endswith("  kjv.txt"))
    proc = subprocess.run(
        [sys.executable, "benchmarks/ablation.py", "--scale", "medium", "--smoke", "--arms", "plain", "--workers",
         "1", "--work_dir", str(tmp_path)],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    runs = [json.loads(line) for line in (tmp_path / "smoke" / "ablation_medium_runs.jsonl").open()]
    assert sorted(r["seed"] for r in runs) == [0, 1]
    assert {r["settings"]["text_sha256"] for r in runs} == {stated}
    assert (tmp_path / "kjv.txt").stat().st_size == 4_304_196
    # the committed medium runs were trained on the same text
    committed = REPO / "benchmarks" / "results" / "ablation_medium_runs.jsonl"
    assert {json.loads(line)["settings"]["text_sha256"] for line in committed.open()} == {stated}
