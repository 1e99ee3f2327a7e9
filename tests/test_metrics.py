import json
import math

import pytest

from hilt.training.metrics import MetricsLog


def test_jsonl_records_with_nonfinite_numbers_as_null(tmp_path):
    log = MetricsLog(tmp_path / "m.jsonl")
    log.write(kind="step", step=1, loss=2.5, grad_norm=math.inf, ratio=[0.1, math.nan])
    log.write(kind="epoch", step=1, val_loss=2.0)
    first, second = (json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines())
    assert first["loss"] == 2.5 and first["grad_norm"] is None and first["ratio"] == [0.1, None]
    assert second["kind"] == "epoch" and second["val_loss"] == 2.0 and second["time"] >= first["time"]


def test_tensorboard_gets_the_same_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = MetricsLog(tmp_path / "m.jsonl", tensorboard_dir=tmp_path / "tb")
    for step in (1, 2):
        log.write(kind="step", step=step, loss=3.0 / step, lr=1e-3)
    log.write(kind="ilt", step=2, ratio=[0.25, 0.5], attn=[[[1.0, 0.0], [0.3, 0.7]]])
    log.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    loss = events.Scalars("step/loss")
    assert [(e.step, e.value) for e in loss] == [(1, 3.0), (2, 1.5)]
    assert events.Scalars("ilt/ratio/1")[0].value == 0.5
    assert events.Scalars("ilt/attn/0/1/0")[0].value == pytest.approx(0.3)
    assert "step/kind" not in events.Tags()["scalars"]
