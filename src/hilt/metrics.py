"""Training metrics as JSON lines (one object per optimizer step or epoch), the format `hilt plot` reads."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


class MetricsLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(self, **record) -> None:
        record = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
        }
        record["time"] = time.time()
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
