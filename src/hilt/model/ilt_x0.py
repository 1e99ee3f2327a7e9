"""ilt_kind "x0": a learned per-channel multiple of the embedding, added after every main layer."""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .ilt import ILT, History, format_sources, sources_stats
from .kernels import Paths


class X0ILT(ILT):
    """modded-nanogpt's x0 mixing: no attention, no per-token weights, a baseline the attending kinds must beat::

    h' = h + lambda ⊙ x0                   (lambda, one weight per channel, starts at 0)
    """

    kind = "x0"
    help = "after every main layer, a learned per-channel multiple of the embedding; starts at exactly 0"

    def __init__(self, d_model: int, n_sources: int = 1):
        super().__init__()
        # (streams, S, C), like the depth kind's static weights
        self.static = nn.Parameter(torch.zeros(1, n_sources, d_model))

    @classmethod
    def build(cls, config: ModelConfig, layer: int, paths: Paths) -> X0ILT:
        return cls(config.d_model)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.static)

    def forward(self, h: torch.Tensor, history: History) -> tuple[torch.Tensor, History]:
        return h + self.static[0][0] * history.x0, history

    @classmethod
    def flops_per_token(cls, config: ModelConfig, layer: int) -> int:
        return 0  # elementwise work only

    @torch.no_grad()
    def stats(self, h: torch.Tensor, history: History) -> dict:
        out, _ = self.forward(h, history)
        return sources_stats(h, out, len(history.states) + 1, self.static, [])

    @classmethod
    def format_stats(cls, index: int, layer: int, stats: dict) -> list[str]:
        return format_sources(index, layer, stats)
