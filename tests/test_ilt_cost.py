"""benchmarks/ilt_cost.py: its stripped variants must keep every matmul of the ILTs, or its floor is no floor."""

import importlib.util

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("ilt_cost", REPO / "benchmarks" / "ilt_cost.py")
ilt_cost = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ilt_cost)

TINY = dict(vocab_size=97, d_model=32, n_layers=3, n_heads=4, ilt_dim=16, max_seq_len=16)


def counted_training_flops(model, idx) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.backends.mkldnn.flags(enabled=False):  # torch's matmuls: the counter misses oneDNN's
        model(idx).float().pow(2).mean().backward()
    return counter.get_total_flops()


def test_every_variant_runs_the_same_matmuls_and_only_the_plain_model_fewer():
    models = ilt_cost.variants(TINY)
    idx = torch.randint(0, TINY["vocab_size"], (2, 16))
    flops = {name: counted_training_flops(model, idx) for name, model in models.items()}
    full = flops.pop("ILTs (the defaults)")
    plain = flops.pop("n_layers_ilt=0")
    assert plain < full
    assert flops == dict.fromkeys(flops, full)


@pytest.mark.parametrize("level", ["gelu", "matmuls"])
def test_stripped_ilts_leave_the_rest_of_the_model_alone_and_still_learn(level):
    models = ilt_cost.variants(TINY)
    stripped = models["ILTs without dropout, GELU" if level == "gelu" else "ILTs' matmuls only"]
    assert stripped.layers[0].ff.__class__.__name__ == "FeedForward"  # main layers untouched
    idx = torch.randint(0, TINY["vocab_size"], (2, 16))
    loss = stripped(idx).float().logsumexp(-1).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stripped.ilts.parameters())
