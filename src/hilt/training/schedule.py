"""The learning-rate schedule: a pure function of (step, total), so a run resumed with a larger ``--epochs`` simply
continues the same formula over the new total. (The ILT curriculum is the model's own: ``modulation_scale`` in
``hilt.model``.)
"""

from __future__ import annotations

import math

SCHEDULERS = ("cosine", "step", "none")


def lr_factor(
    step: int, total_steps: int, kind: str = "cosine", warmup_steps: int = 0, min_factor: float = 0.1
) -> float:
    """Multiplier of the base learning rate before optimizer step ``step`` (0-based).

    cosine: linear warm-up, then a half cosine from 1 down to ``min_factor`` at ``total_steps``.
    step:   halves the rate after each third of training.
    none:   constant (after warm-up).
    """
    if kind not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {kind!r}; choose from {', '.join(SCHEDULERS)}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if kind == "cosine":
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))
    if kind == "step":
        return 0.5 ** min(2, int(progress * 3))
    return 1.0
