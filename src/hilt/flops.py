"""Analytic FLOP counts, the basis of MFU figures and of equal-compute comparisons.

Conventions (PaLM, Appendix B): a multiply-add is 2 FLOPs; only matmuls count (norms, softmax, GELU and the
optimizer are noise at these sizes); attention scores and values are counted over the full ``seq_len`` window;
training costs 3x the forward pass (forward + two matmuls per weight in backward).
"""

from __future__ import annotations

from hilt.model import ModelConfig


def ilt_forward_flops_per_token(c: ModelConfig) -> int:
    """All ILTs of the model, per token position (each ILT sees a short sequence of layer outputs)."""
    if c.n_layers_ilt == 0:
        return 0
    if c.ilt_kind != "design":
        return history_ilt_forward_flops_per_token(c)
    E, total = c.ilt_dim, 0
    for i in range(1, c.n_layers):  # ILT i follows main layer i (0-based) and sees up to ilt_window outputs
        w = min(c.ilt_window, i + 1) + (1 if c.ilt_embed else 0)  # ilt_embed adds the embedding row
        layer = 2 * w * (3 * E * E + E * E + 2 * E * 4 * E) + 2 * 2 * w * w * E  # projections + attention
        total += 2 * w * c.d_model * E + c.n_layers_ilt * layer + 2 * E * c.d_model  # in, layers, out
    return total


def history_ilt_forward_flops_per_token(c: ModelConfig) -> int:
    """The modules of the history kinds (hilt.model.DepthAttentionILT and its relatives), per token. Their
    static per-channel weights and the x0 and dense kinds are elementwise work, not matmuls: not counted."""
    if c.ilt_kind in ("x0", "dense"):
        return 0
    C, r, total = c.d_model, c.ilt_rank, 0
    for i in range(c.n_layers):  # the module after main layer i reads S = i + 2 sources
        S = i + 2
        new = 2 if i == 0 else 1  # sources keyed here: x0 and d_0 by the first module, then one per layer
        w = 2 if c.ilt_kind == "depth_multiway" and i < c.n_layers - 1 else 1  # streams
        total += 2 * C * r * (new + w) + 2 * w * r * S + 2 * w * S * C  # keys, queries; scores; mixture
    return total


def forward_flops_per_token(c: ModelConfig, seq_len: int) -> int:
    d = c.d_model
    per_layer = 2 * (3 * d * d + d * d + 2 * d * c.d_ff) + 2 * 2 * seq_len * d  # qkv, proj, MLP; QK^T and AV
    lm_head = 2 * d * c.vocab_size
    return c.n_layers * per_layer + lm_head + ilt_forward_flops_per_token(c)


def training_flops_per_token(c: ModelConfig, seq_len: int) -> int:
    return 3 * forward_flops_per_token(c, seq_len)
