"""Training metrics as JSON lines (one object per optimizer step, epoch or ILT-statistics sample), the format
`hilt plot` reads, and optionally the same numbers as TensorBoard scalars (``--tensorboard``)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from hilt.errors import UserError


def perplexity(loss: float) -> float:
    """exp(loss), capped before it overflows; NaN for a missing (non-finite) loss."""
    return math.exp(min(loss, 700.0)) if math.isfinite(loss) else math.nan


class MetricsLog:
    """Appends records to ``path``; with ``tensorboard_dir`` also writes each number as a scalar named
    ``<kind>/<key>`` (lists become ``<kind>/<key>/<i>``) at the record's ``step``."""

    def __init__(self, path: str | Path, tensorboard_dir: str | Path | None = None):
        self.path = Path(path)
        self.tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError(
                    "--tensorboard needs the tensorboard package: pip install tensorboard"
                ) from None
            self.tb = SummaryWriter(str(tensorboard_dir), flush_secs=30)

    def write(self, **record) -> None:
        record = {k: _finite_or_none(v) for k, v in record.items()}
        record["time"] = time.time()
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            kind, step = record.get("kind", "metrics"), record.get("step", 0)
            for name, value in _scalars(record, prefix=kind):
                self.tb.add_scalar(name, value, step)
            if kind != "step":  # epoch ends are rare and worth seeing at once; steps flush every 30 s
                self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _finite_or_none(value):
    """JSON has no NaN/inf: a diverged number is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    return value


def _scalars(record: dict, prefix: str):
    """(tag, number) pairs of a record, nested lists flattened by index; bookkeeping keys skipped."""
    for key, value in record.items():
        if key in ("kind", "step", "time"):
            continue
        yield from _flatten(f"{prefix}/{key}", value)


def _flatten(tag: str, value):
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int | float):
        yield tag, value
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _flatten(f"{tag}/{i}", v)
