"""hilt.flops: the analytic counts behind MFU and the ablation's equal-compute budgets, against torch's own count of
the same model's matmuls (torch.utils.flop_counter.FlopCounterMode) for every ILT kind."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from hilt.model import HierarchicalTransformer, ModelConfig
from hilt.model.flops import forward_flops_per_token, ilt_forward_flops_per_token, training_flops_per_token
from hilt.model.ilts import KINDS as ILT_KINDS

TINY = dict(vocab_size=97, d_model=32, n_layers=3, n_heads=4, ilt_dim=16, max_seq_len=16)
T = 16

# every --ilt_kind, the design with a longer window, and the plain model
SETTINGS = {
    **{kind: {"ilt_kind": kind} for kind in ILT_KINDS},
    "depth, rank 8": {"ilt_kind": "depth", "ilt_rank": 8},
    "design, ilt_window 3": {"ilt_window": 3},
    "plain": {"n_layers_ilt": 0},
}


def counted_flops_per_token(config: ModelConfig, backward: bool) -> int:
    """torch's count of one pass over T tokens. The reference layers (no CPU kernels) under the math SDPA backend
    spell attention out as matmuls the counter sees; it does not count oneDNN's or the fused kernels."""
    model = HierarchicalTransformer(config, cpu_kernels=False)
    idx = torch.zeros(1, T, dtype=torch.long)
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter, torch.set_grad_enabled(backward):
        logits = model(idx)
        if backward:
            logits.float().sum().backward()
    return counter.get_total_flops() // T


@pytest.mark.parametrize("overrides", SETTINGS.values(), ids=SETTINGS.keys())
def test_forward_count_equals_torchs(overrides):
    config = ModelConfig(**TINY, **overrides)
    assert forward_flops_per_token(config, T) == counted_flops_per_token(config, backward=False)


@pytest.mark.parametrize("overrides", SETTINGS.values(), ids=SETTINGS.keys())
def test_training_count_is_forward_and_backward(overrides):
    config = ModelConfig(**TINY, **overrides)
    assert training_flops_per_token(config, T) == 3 * forward_flops_per_token(config, T)
    assert training_flops_per_token(config, T) == counted_flops_per_token(config, backward=True)


def test_the_ilts_share_of_the_default_model():
    """The figures the docs quote: the design's ILTs add 24.7% to the default model's training FLOPs at
    bench.py's 128 tokens, and 68% to the ablation's reduced model; x0 and dense add no matmul."""
    default, plain = ModelConfig(vocab_size=50260), ModelConfig(vocab_size=50260, n_layers_ilt=0)
    assert training_flops_per_token(default, 128) == 134_473_728
    assert training_flops_per_token(plain, 128) == 107_870_208
    reduced = dict(vocab_size=1024, d_model=128, n_layers=4, n_heads=4, ilt_dim=64, max_seq_len=64)
    ratio = training_flops_per_token(ModelConfig(**reduced), 64) / training_flops_per_token(
        ModelConfig(**reduced, n_layers_ilt=0), 64
    )
    assert ratio == pytest.approx(1.678, abs=1e-3)
    for kind in ("x0", "dense"):
        assert ilt_forward_flops_per_token(ModelConfig(**reduced, ilt_kind=kind)) == 0
    assert ilt_forward_flops_per_token(ModelConfig(**reduced, n_layers_ilt=0)) == 0
