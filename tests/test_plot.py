import json

import pytest

from hilt.cli import main
from hilt.errors import UserError
from hilt.evaluation.plot import plot_runs, read_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def _write(path, records):
    path.mkdir(parents=True, exist_ok=True)
    with (path / "metrics.jsonl").open("w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def _steps(first, last, loss=5.0):
    return [
        {"kind": "step", "step": s, "loss": loss - 0.01 * s, "lr": 1e-3, "grad_norm": 1.0}
        for s in range(first, last + 1)
    ]


def test_resumed_and_restarted_runs_keep_only_the_final_history(tmp_path):
    # steps 1-6, then a resume from a checkpoint at step 4 re-logs 5-8; a half-written line from a crash
    _write(tmp_path / "resumed", _steps(1, 6, loss=9.0) + ['{"kind": "step", "st'] + _steps(5, 8))
    steps = read_metrics(tmp_path / "resumed")["step"]
    assert [r["step"] for r in steps] == list(range(1, 9))
    assert steps[3]["loss"] == pytest.approx(9.0 - 0.04) and steps[4]["loss"] == pytest.approx(5.0 - 0.05)
    # a fresh run with --overwrite in the same folder: only the new run remains
    _write(tmp_path / "restarted", _steps(1, 20, loss=9.0) + _steps(1, 3))
    assert [r["loss"] for r in read_metrics(tmp_path / "restarted")["step"]] == pytest.approx(
        [4.99, 4.98, 4.97]
    )


def test_plot_overlays_several_runs_with_ilt_panels(tmp_path):
    ilt = {
        "kind": "ilt",
        "ratio": [0.01, 0.02],
        "attn_prev": [0.4, 0.6],
        "attn": [[[[1, 0], [0.4, 0.6]]]] * 2,
    }
    _write(
        tmp_path / "hilt",
        _steps(1, 10)
        + [{"kind": "epoch", "step": 10, "train_loss": 4.9, "val_loss": 4.8}]
        + [{**ilt, "step": 5}, {**ilt, "step": 10}],
    )
    _write(
        tmp_path / "plain",
        _steps(1, 10, loss=5.2) + [{"kind": "epoch", "step": 10, "train_loss": 5.1, "val_loss": 5.0}],
    )
    out = plot_runs([tmp_path / "hilt", tmp_path / "plain"], tmp_path / "cmp.png")
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 20_000


def test_hilt_plot_cli(tmp_path, capsys):
    _write(tmp_path / "run", _steps(1, 4))
    assert main(["plot", str(tmp_path / "run")]) == 0
    assert (tmp_path / "run" / "metrics.png").read_bytes()[:8] == PNG
    assert (
        main(["plot", str(tmp_path / "run"), str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")])
        == 2
    )
    err = capsys.readouterr().err
    assert "no metrics.jsonl in" in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()
    _write(tmp_path / "empty", [])
    with pytest.raises(UserError, match="no metrics records"):
        read_metrics(tmp_path / "empty")
