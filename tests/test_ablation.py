"""The ablation's bookkeeping: equal cost is only fair if the costs are right."""

import importlib.util
import json
import math
import sys

import numpy as np
import pytest
import torch

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("ablation", REPO / "benchmarks" / "ablation.py")
ablation = importlib.util.module_from_spec(spec)
sys.modules["ablation"] = ablation  # dataclasses look their module up there
spec.loader.exec_module(ablation)

TINY = dict(vocab_size=97, d_model=32, n_layers=3, n_heads=4, ilt_dim=16, max_seq_len=16)
REDUCED = dict(vocab_size=1024, d_model=128, n_layers=4, n_heads=4, ilt_dim=64, max_seq_len=64)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"n_layers_ilt": 0},
        {"ilt_embed": True},
        {"ilt_gate": True},
        {"ilt_window": 3},
        {"ilt_kind": "depth", "ilt_rank": 8},
        {"ilt_kind": "depth_multiway", "ilt_rank": 8},
        {"ilt_kind": "dense"},
        {"ilt_kind": "x0"},
    ],
    ids=["hilt", "plain", "embed", "gate", "window3", "depth", "depth_multiway", "dense", "x0"],
)
def test_analytic_flops_equal_torchs_count(overrides):
    config = ablation.model_config(TINY, overrides)
    assert ablation.counted_forward_flops(config, 16) == ablation.cost(config, 16)["forward_flops_per_token"]


def test_matched_plain_is_within_a_few_percent_on_params_and_flops():
    hilt = ablation.cost(ablation.model_config(REDUCED, {}), 64)
    overrides = ablation.matched_plain(REDUCED, 64)
    plain = ablation.cost(ablation.model_config(REDUCED, overrides), 64)
    assert overrides["n_layers_ilt"] == 0
    assert abs(plain["params"] / hilt["params"] - 1) < 0.12
    assert abs(plain["train_flops_per_token"] / hilt["train_flops_per_token"] - 1) < 0.12
    # and it is closer than the plain model of the same shape, which simply lacks the ILTs
    same_shape = ablation.cost(ablation.model_config(REDUCED, {"n_layers_ilt": 0}), 64)
    assert same_shape["params"] < 0.75 * hilt["params"]


def _run(arm, seed, loss, seconds):
    curve = [
        {"step": 1, "flops": 1.0, "seconds": seconds / 2, "val_loss": loss + 1.0},
        {"step": 2, "flops": 2.0, "seconds": seconds, "val_loss": loss},
    ]
    return {"arm": arm, "seed": seed, "steps": 2, "tokens": 64, "flops": 2.0, "train_seconds": seconds,
            "val_loss": loss, "curve": curve}  # fmt: skip


def test_summary_pairs_seeds_and_reads_losses_at_equal_time():
    arms = [ablation.Arm("hilt", "", {}), ablation.Arm("plain", "", {"n_layers_ilt": 0})]
    results = [_run("hilt", 0, 4.0, 20.0), _run("hilt", 1, 4.2, 20.0), _run("plain", 0, 3.9, 10.0),
               _run("plain", 1, 4.0, 10.0)]  # fmt: skip
    cost = {"params": 2, "params_non_embedding": 1, "train_flops_per_token": 3}
    hilt, plain = ablation.summarise(results, arms, {"hilt": cost, "plain": cost})
    assert hilt["val_loss"] == pytest.approx(4.1) and hilt["val_loss_sd"] == pytest.approx(
        np.std([4.0, 4.2], ddof=1)
    )
    assert plain["delta_vs_hilt"] == pytest.approx((-0.1 - 0.2) / 2)  # per seed: 3.9 - 4.0 and 4.0 - 4.2
    assert hilt["delta_vs_plain"] == pytest.approx(0.15) and hilt["delta_vs_plain_seeds"] == 2
    assert hilt["delta_vs_x0_seeds"] == 0  # no x0 arm ran: its column says so
    # plain finished in 10 s; hilt was half-way then: loss + 1 at its first validation
    assert plain["equal_seconds"] == 10.0
    assert hilt["val_loss_at_equal_seconds"] == pytest.approx(5.1)
    assert plain["val_loss_at_equal_seconds"] == pytest.approx(3.95)
    table = ablation.markdown([hilt, plain], {})
    assert "| plain |" in table and "-0.1500 ± 0.0707 (2)" in table and "+0.1500 ± 0.0707 (2)" in table


def test_one_run_trains_its_budgeted_steps_with_the_real_trainer(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "train.npy", rng.integers(0, 97, 2000).astype(np.uint16))
    np.save(tmp_path / "val.npy", rng.integers(0, 97, 300).astype(np.uint16))
    config = ablation.model_config(TINY, {})
    task = {"arm": "hilt", "overrides": {}, "seed": 0, "steps": 4, "cost": ablation.cost(config, 16), "base": TINY,
            "work": str(tmp_path), "text_file": "unused", "tokenizer": None, "batch_size": 4, "seq_len": 16,
            "lr": 1e-3, "evals": 2}  # fmt: skip
    threads = torch.get_num_threads()
    try:
        result = ablation.run_one(task)
    finally:
        torch.set_num_threads(threads)
    assert result["steps"] == 4 and [p["step"] for p in result["curve"]] == [2, 4]
    assert result["flops"] == 4 * 4 * 16 * task["cost"]["train_flops_per_token"]
    assert result["val_loss"] == result["curve"][-1]["val_loss"] < np.log(97) + 0.5
    assert len(result["ilt"]["ratio"]) == 2
    run_dir = tmp_path / "runs" / "hilt-s0"
    epochs = [r for r in map(json.loads, (run_dir / "metrics.jsonl").open()) if r["kind"] == "epoch"]
    assert [e["val_loss"] for e in epochs] == [p["val_loss"] for p in result["curve"]]
    assert not list(run_dir.glob("*.pt"))


def test_a_budget_longer_than_the_validations_allow_fails_loudly(tmp_path):
    """An epoch never spans passes over the data: 3,296 steps in 4 validations of at most 405 batches each would
    silently stop at 1,620. The script refuses before training; a run that still came up short raises."""
    assert ablation.too_few_evals(3296, 16, 405) is None
    assert "use --evals 9 or more" in ablation.too_few_evals(3296, 4, 405)
    rng = np.random.default_rng(0)
    np.save(
        tmp_path / "train.npy", rng.integers(0, 97, 2000).astype(np.uint16)
    )  # 124 windows: 31 batches of 4
    np.save(tmp_path / "val.npy", rng.integers(0, 97, 300).astype(np.uint16))
    config = ablation.model_config(TINY, {"n_layers_ilt": 0})
    task = {"arm": "plain", "overrides": {"n_layers_ilt": 0}, "seed": 0, "steps": 80, "cost": ablation.cost(config, 16),
            "base": TINY, "work": str(tmp_path), "text_file": "unused", "tokenizer": None, "batch_size": 4,
            "seq_len": 16, "lr": 1e-3, "evals": 2}  # fmt: skip
    threads = torch.get_num_threads()
    try:
        with pytest.raises(RuntimeError, match="31 steps after validation 1, planned 40"):
            ablation.run_one(task)
    finally:
        torch.set_num_threads(threads)


def test_one_seed_shows_no_spread_rather_than_a_zero_one():
    arms = [ablation.Arm("plain", "", {"n_layers_ilt": 0}), ablation.Arm("depth", "", {"ilt_kind": "depth"})]
    results = [_run("plain", 0, 3.5, 10.0), _run("depth", 0, 3.45, 10.0)]
    cost = {"params": 2, "params_non_embedding": 1, "train_flops_per_token": 3}
    plain, depth = ablation.summarise(results, arms, {"plain": cost, "depth": cost})
    assert math.isnan(depth["delta_vs_plain_sd"]) and depth["delta_vs_plain"] == pytest.approx(-0.05)
    row = ablation.markdown([plain, depth], {}).splitlines()[-1]
    assert "| 3.4500 |" in row and "| -0.0500 (1) |" in row and "±" not in row


def test_equal_time_by_measured_step_cost_reads_the_slower_arm_earlier_on_its_curve():
    arms = [ablation.Arm("plain", "", {"n_layers_ilt": 0}), ablation.Arm("depth", "", {"ilt_kind": "depth"})]
    # both ran 2 steps; depth's step costs 4/3 of plain's, so in plain's time it reaches step 1.5
    results = [_run("plain", 0, 3.5, 10.0), _run("depth", 0, 3.4, 99.0), _run("plain", 1, 3.6, 10.0),
               _run("depth", 1, 3.4, 99.0)]  # fmt: skip
    cost = {"params": 2, "params_non_embedding": 1, "train_flops_per_token": 3}
    plain, depth = ablation.summarise(
        results, arms, {"plain": cost, "depth": cost}, {"plain": 1.0, "depth": 4 / 3}
    )
    assert depth["equal_time_step"] == pytest.approx(1.5)
    assert depth["val_loss_at_equal_time"] == pytest.approx(3.9)  # half-way between 4.4 and 3.4
    assert depth["equal_time_delta_vs_plain"] == pytest.approx((0.4 + 0.3) / 2)  # paired with plain's end
    assert plain["val_loss_at_equal_time"] == pytest.approx(3.55)
    row = ablation.markdown([plain, depth], {}).splitlines()[-1]
    assert row.endswith("| 2 | 3.9000 | +0.3500 ± 0.0707 (2) |")
    # without a measurement the table has no such columns
    assert "step cost" not in ablation.markdown(
        ablation.summarise(results, arms, {"plain": cost, "depth": cost}), {}
    )
