"""ilt_kind "design": the seed's Inter-Layer Transformer, a small transformer over the latest layer outputs."""

from __future__ import annotations

import torch
from torch import nn

from . import kernels
from .config import ModelConfig
from .ilt import ILT, History
from .kernels import Paths
from .layers import layer_class


class DesignILT(ILT):
    """Mixes the latest main-layer outputs at each token position into a modulation of the current one.

    For every token position independently (positions are never mixed, so a KV cache stays exact)::

        h_prev (B,T,C) ──┐                     "layer sequence" of length W (ilt_window, default 2)
                         ├─ stack ─> (B·T, W, C) ─> Linear C→E ─> LayerNorm
        h_cur  (B,T,C) ──┘                          │
                                                    ▼
                          n_layers_ilt x TransformerLayer(E, nhead_ilt), causal over layers:
                          h_cur attends to h_prev and itself, h_prev only to itself
                                                    │
                                                    ▼
                          dropout ─> mean over W ─> Linear E→C ─> modulation (B,T,C)

        h_cur' = h_cur + modulation_scale * modulation

    h_cur is the output of the main layer this ILT follows; h_prev the residual stream entering it (the output
    of the layer before, modulated by its own ILT). ``modulation_scale`` follows a curriculum during training
    (small at first, so the ILTs start as a gentle perturbation of a plain transformer) and is held at its final
    value for validation and generation. One ILT sits between each consecutive pair of main layers.
    """

    kind = "design"
    help = (
        "the seed's ILT: a small transformer (ilt_dim, nhead_ilt, n_layers_ilt) over the latest ilt_window layer "
        "outputs between consecutive main layers, weighed by the modulation_scale curriculum"
    )

    def __init__(
        self,
        d_model: int,
        ilt_dim: int,
        n_heads: int,
        n_layers: int,
        dropout: float,
        window: int = 2,
        paths: Paths = kernels.REFERENCE,
    ):
        super().__init__()
        self.window = window
        self.proj_in = paths.linear(d_model, ilt_dim)
        self.ln = nn.LayerNorm(ilt_dim)
        self.layers = nn.ModuleList(
            layer_class(paths)(ilt_dim, n_heads, 4 * ilt_dim, dropout, short=True, paths=paths)
            for _ in range(n_layers)
        )
        self.dropout = paths.dropout(dropout)
        self.proj_out = paths.linear(ilt_dim, d_model)

    @classmethod
    def follows(cls, config: ModelConfig) -> list[int]:
        return list(range(1, config.n_layers))  # between consecutive main layers

    @classmethod
    def build(cls, config: ModelConfig, layer: int, paths: Paths) -> DesignILT:
        c = config
        return cls(c.d_model, c.ilt_dim, c.nhead_ilt, c.n_layers_ilt, c.ilt_dropout, c.ilt_window, paths)

    def layer_window(self, h: torch.Tensor, history: History) -> list[torch.Tensor]:
        """The W layer outputs this ILT reads, oldest first: up to W - 1 earlier ones, then ``h``."""
        return [*history.states[1:][-(self.window - 1) :], h]

    def forward(self, h: torch.Tensor, history: History) -> tuple[torch.Tensor, History]:
        return h + history.scale * self.modulation(self.layer_window(h, history)), history

    def modulation(self, window: list[torch.Tensor]) -> torch.Tensor:
        """window: the latest layer outputs, oldest first, each (B, T, C). Returns the modulation (B, T, C)."""
        B, T, C = window[-1].shape
        x = torch.stack(window, dim=2).reshape(
            B * T, len(window), C
        )  # (B·T, W, C): a batch of layer sequences
        x = self.ln(self.proj_in(x))  # (B·T, W, E)
        for layer in self.layers:
            x = layer(x)
        x = self.dropout(x).mean(dim=1)  # (B·T, E)
        return self.proj_out(x).view(B, T, C)

    @classmethod
    def flops_per_token(cls, config: ModelConfig, layer: int) -> int:
        E, w = (
            config.ilt_dim,
            min(config.ilt_window, layer + 1),
        )  # the window is shorter after the first layers
        inner = 2 * w * (3 * E * E + E * E + 2 * E * 4 * E) + 2 * 2 * w * w * E  # projections + attention
        return (
            2 * w * config.d_model * E + config.n_layers_ilt * inner + 2 * E * config.d_model
        )  # in, layers, out

    @torch.no_grad()
    def stats(self, h: torch.Tensor, history: History) -> dict:
        """``ILT.stats`` plus ``scale``, ``attn`` (per inner layer, the (W, W) attention weights averaged over
        tokens and heads; row = query layer, column = key layer, oldest first) and ``attn_prev`` (the weight the
        newest layer puts on the one before it, averaged over the inner layers)."""
        window = self.layer_window(h, history)
        modulation = self.modulation(window)
        ratio = (history.scale * modulation.float()).norm(dim=-1) / h.float().norm(dim=-1).clamp_min(1e-12)
        B, T, C = h.shape
        x = self.ln(self.proj_in(torch.stack(window, dim=2).reshape(B * T, len(window), C)))
        attn = []
        for layer in self.layers:
            q, k, _ = layer.attn.qkv(layer.ln1(x).float()).chunk(3, dim=2)
            heads = layer.attn.n_heads
            q, k = (t.view(B * T, len(window), heads, -1).transpose(1, 2) for t in (q, k))  # (N, H, W, D)
            attn.append(kernels.causal_weights(q, k).mean(dim=(0, 1)))  # (W, W)
            x = layer(x)
        newest = len(history.states)  # the 1-based number of the main layer this ILT follows
        labels = [f"L{newest - len(window) + 1 + j}" for j in range(len(window))]
        return {
            "scale": float(history.scale),
            "ratio": ratio.mean().item(),
            "attn": [m.tolist() for m in attn],
            "attn_prev": sum(m[-1, -2].item() for m in attn) / len(attn) if attn else float("nan"),
            "labels": labels,
        }

    @classmethod
    def format_stats(cls, index: int, layer: int, stats: dict) -> list[str]:
        labels = stats["labels"]
        lines = [
            f"ILT {index + 1} (after layer {layer + 1}, mixes {', '.join(labels)}): scale {stats['scale']:.4f} | "
            f"|scale*modulation| / |layer output| = {stats['ratio']:.4f}"
        ]
        for j, mat in enumerate(stats["attn"]):
            newest = ", ".join(f"{name} {w:.3f}" for name, w in zip(labels, mat[-1], strict=True))
            lines.append(f"  inner layer {j + 1}: {labels[-1]} attends to {newest}")
        return lines
