"""Analytic FLOP counts, the basis of MFU figures and of equal-compute comparisons.

Conventions (PaLM, Appendix B): a multiply-add is 2 FLOPs; only matmuls count (norms, softmax, GELU and the
optimizer are noise at these sizes); attention scores and values are counted over the full ``seq_len`` window;
training costs 3x the forward pass (forward + two matmuls per weight in backward). Each ILT kind counts its own
modules (``ILT.flops_per_token``).
"""

from __future__ import annotations

from .config import ModelConfig
from .ilts import ilt_class


def ilt_forward_flops_per_token(c: ModelConfig) -> int:
    """All ILTs of the model, per token position (each ILT sees the layer history at one token)."""
    if c.n_layers_ilt == 0:
        return 0
    kind = ilt_class(c.ilt_kind)
    return sum(kind.flops_per_token(c, layer) for layer in kind.follows(c))


def forward_flops_per_token(c: ModelConfig, seq_len: int) -> int:
    d = c.d_model
    per_layer = 2 * (3 * d * d + d * d + 2 * d * c.d_ff) + 2 * 2 * seq_len * d  # qkv, proj, MLP; QK^T and AV
    lm_head = 2 * d * c.vocab_size
    return c.n_layers * per_layer + lm_head + ilt_forward_flops_per_token(c)


def training_flops_per_token(c: ModelConfig, seq_len: int) -> int:
    return 3 * forward_flops_per_token(c, seq_len)
