"""ilt_kind "depth": per token, a low-rank attention over the layer history, plus a static weight per source."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import ModelConfig
from .ilt import ILT, History, contributions, format_sources, sources_stats
from .kernels import Paths


class DepthILT(ILT):
    """A single-head low-rank attention over the layer history plus a static weight per source, added to the
    residual stream after main layer i (S = i + 2 sources, r = ilt_rank).

    For every token position independently (positions are never mixed, so a KV cache stays exact)::

        sources: x0 (embedding), d_0 .. d_i (each main layer's contribution)       (B,T,S,C)
           │ each new one: RMSNorm ─> Linear C→r ─> key ───────────┐                (B,T,S,r)
           │                                                      ▼
        h (B,T,C), state after layer i ─> RMSNorm ─> Linear C→r ─> query ─> softmax over sources of
           │                                        (zero init)          query·key / sqrt(r) = a (B,T,S)
           ▼
        modulation = gate ⊙ Σ_s a_s source_s  +  Σ_s static_s ⊙ source_s                (B,T,C)
                     └ per token, dynamic ┘      └ per channel: a direct path to x0 from step 0 ┘
        h' = h + modulation               (gate and static start at 0: exactly the plain transformer)

    The static part is x0 mixing (modded-nanogpt) and DenseFormer generalised to every source; the dynamic part
    is Attention Residuals' input-dependent query (keys RMS-normed) at low rank. Each source is keyed once, by
    the module after the layer that made it; later modules reuse the key (``History.memo["keys"]``). No
    curriculum: the module starts at exactly 0 and ignores ``modulation_scale``.
    """

    kind = "depth"
    help = (
        "after every main layer, a rank-ilt_rank attention over the embedding and every earlier layer's "
        "contribution plus a static weight per source; starts as an exact plain transformer"
    )
    streams = 1  # the weights keep a leading stream axis of 1: checkpoints store them so

    def __init__(self, d_model: int, rank: int, n_sources: int, paths: Paths = kernels.REFERENCE):
        super().__init__()
        self.rank = rank
        self.key = paths.linear(d_model, rank, bias=False)  # keys the sources that are new to this module
        self.query = paths.linear(d_model, self.streams * rank, bias=False)
        self.gate = nn.Parameter(torch.zeros(self.streams, d_model))
        self.static = nn.Parameter(torch.zeros(self.streams, n_sources, d_model))
        self.cpu_kernels = paths.kernels

    @classmethod
    def validate(cls, config: ModelConfig) -> None:
        if config.ilt_rank > config.d_model:
            raise ValueError(
                f"ModelConfig.ilt_rank ({config.ilt_rank}) must be at most d_model ({config.d_model})"
            )

    @classmethod
    def build(cls, config: ModelConfig, layer: int, paths: Paths) -> DepthILT:
        return cls(config.d_model, config.ilt_rank, layer + 2, paths)

    def reset_parameters(self) -> None:
        """Zero query, gate and static weights (called after the model's own init, which draws every Linear)."""
        for p in (self.query.weight, self.gate, self.static):
            nn.init.zeros_(p)

    def keys(self, sources: list[torch.Tensor], keys: list[torch.Tensor]) -> list[torch.Tensor]:
        """The keys of all sources: those already made, then this module's keys of the new ones, each (B, T, r)."""
        return keys + [self.key(F.rms_norm(s, s.shape[-1:])) for s in sources[len(keys) :]]

    def queries(self, h: torch.Tensor) -> torch.Tensor:
        """The query from the state after this module's layer, (B, T, 1, r)."""
        B, T, C = h.shape
        return self.query(F.rms_norm(h, (C,))).view(B, T, self.streams, self.rank)

    def weights(self, h: torch.Tensor, keys: list[torch.Tensor]) -> torch.Tensor:
        """The attention over the sources, (B, T, 1, S)."""
        k = torch.stack(keys, dim=3)  # (B, T, r, S)
        return (self.queries(h) @ k * self.rank**-0.5).softmax(dim=-1, dtype=torch.float32)  # (B, T, 1, S)

    def forward(self, h: torch.Tensor, history: History) -> tuple[torch.Tensor, History]:
        sources = contributions(h, history)
        keys = self.keys(sources, history.memo.get("keys", []))
        history = replace(history, memo={**history.memo, "sources": sources, "keys": keys})
        if self.cpu_kernels and h.device.type == "cpu" and torch.is_grad_enabled():
            # a CPU speed path with the same maths (kernels.py)
            modulation = kernels.depth_mix(self.queries(h), keys, sources, self.gate, self.static)
            return h + modulation.unbind(dim=2)[0], history
        stacked = torch.stack(sources, dim=2)  # (B, T, S, C)
        # in the keys' dtype: what autocast computes, and what generation's bf16 copy (bf16 matrices, fp32
        # residual stream: hilt.generation.decoding) computes too
        dtype = keys[0].dtype
        dynamic = self.weights(h, keys).to(dtype) @ stacked.to(dtype)  # (B, T, 1, C)
        static = (stacked.unsqueeze(2) * self.static).sum(dim=3)  # (B, T, 1, C)
        modulation = self.gate * dynamic + static  # (B, T, 1, C)
        return h + modulation.unbind(dim=2)[0], history

    @classmethod
    def flops_per_token(cls, config: ModelConfig, layer: int) -> int:
        C, r, S = config.d_model, config.ilt_rank, layer + 2
        new = 2 if layer == 0 else 1  # sources keyed here: x0 and d_0 by the first module, then one per layer
        return 2 * C * r * (new + 1) + 2 * r * S + 2 * S * C  # keys and query; scores; mixture

    @torch.no_grad()
    def stats(self, h: torch.Tensor, history: History) -> dict:
        out, after = self.forward(h, history)
        attn = self.weights(h, after.memo["keys"]).float().mean(dim=(0, 1)).tolist()  # (1, S)
        return sources_stats(h, out, len(after.memo["sources"]), self.static, attn)

    @classmethod
    def format_stats(cls, index: int, layer: int, stats: dict) -> list[str]:
        return format_sources(index, layer, stats)
