"""ilt_kind "dense": a learned per-channel multiple of every source so far, added after every main layer."""

from __future__ import annotations

from dataclasses import replace

import torch

from .config import ModelConfig
from .ilt import History, contributions, sources_stats
from .ilt_x0 import X0ILT
from .kernels import Paths


class DenseILT(X0ILT):
    """DenseFormer's depth-weighted average: the x0 kind over every source, the embedding and each main layer's
    contribution so far (S = i + 2 after main layer i); the depth kind's static part without its query::

        x0, d_0 .. d_i ─> Σ_s lambda_s ⊙ source_s ─> modulation
        h' = h + modulation                                           (every lambda starts at 0)
    """

    kind = "dense"
    help = (
        "after every main layer, a learned per-channel multiple of the embedding and of every earlier layer's "
        "contribution; starts at exactly 0"
    )

    @classmethod
    def build(cls, config: ModelConfig, layer: int, paths: Paths) -> DenseILT:
        return cls(config.d_model, layer + 2)

    def forward(self, h: torch.Tensor, history: History) -> tuple[torch.Tensor, History]:
        sources = contributions(h, history)
        weights = self.static[0]  # (S, C)
        modulation = weights[0] * sources[0]
        for w, source in zip(weights[1:], sources[1:], strict=True):
            modulation = torch.addcmul(modulation, w, source)
        return h + modulation, replace(history, memo={**history.memo, "sources": sources})

    @torch.no_grad()
    def stats(self, h: torch.Tensor, history: History) -> dict:
        out, after = self.forward(h, history)
        return sources_stats(h, out, len(after.memo["sources"]), self.static, [])
