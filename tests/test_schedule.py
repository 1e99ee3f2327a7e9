import math

import pytest

from hilt.model import modulation_scale
from hilt.training.schedule import lr_factor


def test_curriculum_follows_the_design_formula():
    start, end, epochs = 0.01, 0.1, 10
    for epoch in range(epochs):
        assert modulation_scale(epoch / epochs, start, end) == pytest.approx(
            start + epoch / epochs * (end - start)
        )
    assert modulation_scale(0.0, start, end) == pytest.approx(0.01)
    assert modulation_scale(0.5, start, end) == pytest.approx(0.055)
    assert modulation_scale(1.0, start, end) == pytest.approx(0.1)
    assert modulation_scale(1.7, start, end) == pytest.approx(0.1)  # clamped past the end


def test_cosine_schedule_key_points():
    assert lr_factor(0, 100) == pytest.approx(1.0)
    assert lr_factor(50, 100) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, 100) == pytest.approx(0.1)
    values = [lr_factor(s, 100) for s in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_warmup_then_cosine():
    assert lr_factor(0, 100, warmup_steps=10) == pytest.approx(0.1)
    assert lr_factor(9, 100, warmup_steps=10) == pytest.approx(1.0)
    assert lr_factor(10, 100, warmup_steps=10) == pytest.approx(1.0)


def test_step_and_constant_schedules():
    assert [lr_factor(s, 90, "step") for s in (0, 29, 30, 60, 89)] == [1.0, 1.0, 0.5, 0.25, 0.25]
    assert {lr_factor(s, 90, "none") for s in range(90)} == {1.0}
    with pytest.raises(ValueError, match="unknown scheduler"):
        lr_factor(0, 10, "linear")


def test_longer_total_stretches_the_same_curve():
    assert lr_factor(50, 100) == pytest.approx(lr_factor(100, 200))
    assert math.isclose(lr_factor(100, 200), 0.55)
