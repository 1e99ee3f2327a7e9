"""The one contract every ILT kind follows, and what it is handed: the layer history so far.

The model runs its main layers in order; after each one that has an ILT, it calls it::

    h = layer(x)                      the main layer's output (B, T, C)
    x, history = ilt(h, history)      the residual stream the next layer reads, and the updated history

``History`` holds what every kind may read (the embedded input, the residual stream entering each main layer so
far, the curriculum's ``scale``) and a ``memo`` for what one kind keeps for its later modules (the depth kind's
sources and their keys). ILTs mix layers at each token, never positions, so a KV cache stays exact whatever the
kind. A kind is a subclass of ``ILT`` registered by name in ``hilt.model.ilts``; the model, ``hilt.model.flops``,
``hilt inspect`` and the export ask it, not a list of names, what it is.

This module imports only torch: the export copies it beside the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from .config import ModelConfig
from .kernels import Paths


@dataclass
class History:
    """The layer history at each token, as the ILTs see it.

    ``x0``      the embedded input (B, T, C), which the first main layer reads;
    ``states``  the residual stream entering each main layer so far, oldest first: ``states[0]`` is ``x0`` and
                ``states[i]`` what main layer i read (an earlier ILT's output); the model appends to it;
    ``scale``   ``modulation_scale`` for this call (the curriculum's value while training, its end value after);
    ``memo``    what a kind keeps between its own modules (the depth kind's sources and keys)."""

    x0: torch.Tensor
    scale: float
    states: list[torch.Tensor] = field(default_factory=list)
    memo: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.states:
            self.states.append(self.x0)


class ILT(nn.Module):
    """An inter-layer module of one kind. Subclasses set ``kind`` and ``help``, build themselves from the config
    and the main layer they follow, and implement ``forward``; the class methods tell the rest of the project
    where the modules sit and what they cost."""

    kind: ClassVar[str]
    help: ClassVar[str]  # one line for `hilt train --help`

    def forward(self, h: torch.Tensor, history: History) -> tuple[torch.Tensor, History]:
        """``h`` (B, T, C), the output of the main layer this module follows -> the residual stream (B, T, C) the
        next layer reads, and the history with whatever this kind keeps added."""
        raise NotImplementedError

    @classmethod
    def validate(cls, config: ModelConfig) -> None:
        """Raises ValueError, naming the field, for settings this kind cannot build."""

    @classmethod
    def follows(cls, config: ModelConfig) -> list[int]:
        """The main layers (0-based) this kind puts a module after: every one by default."""
        return list(range(config.n_layers))

    @classmethod
    def build(cls, config: ModelConfig, layer: int, paths: Paths) -> ILT:
        """The module that follows main layer ``layer``, built of the modules ``paths`` picks (the reference's or
        the speed paths of ``kernels.py``)."""
        raise NotImplementedError

    @classmethod
    def flops_per_token(cls, config: ModelConfig, layer: int) -> int:
        """Forward matmul FLOPs of the module after main layer ``layer``, per token (``hilt.model.flops``'s
        conventions: a multiply-add is 2, elementwise work is not counted)."""
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Called after the model's own initialisation, which draws every Linear: a kind that must start at an
        exact plain transformer zeroes what makes its output here."""

    @torch.no_grad()
    def stats(self, h: torch.Tensor, history: History) -> dict:
        """What ``hilt inspect`` reports of this module for the call ``self(h, history)``: ``ratio`` (mean over
        tokens of |modulation| / |h|, the modulation's size next to the layer output it is added to) and
        kind-specific entries, each a number, a string or a (nested) list of them. Called right after that call,
        before the model appends to ``history``."""
        out, _ = self.forward(h, history)
        ratio = (out.float() - h.float()).norm(dim=-1) / h.float().norm(dim=-1).clamp_min(1e-12)
        return {"ratio": ratio.mean().item()}

    @classmethod
    def format_stats(cls, index: int, layer: int, stats: dict) -> list[str]:
        """Lines of ``hilt inspect``'s report for module ``index`` (0-based), which follows main ``layer``."""
        return [
            f"ILT {index + 1} (after layer {layer + 1}): |modulation| / |layer output| = {stats['ratio']:.4f}"
        ]


# --- the kinds that read the layer history as sources (depth, dense, x0) -------------------------------------
# Their "sources" are what the residual stream is a sum of: the embedding x0 and each main layer's contribution
# so far (its output minus its input).


def contributions(h: torch.Tensor, history: History) -> list[torch.Tensor]:
    """The sources after the main layer whose output is ``h``: x0, then every main layer's contribution so far,
    this one's last. Kept in ``history.memo["sources"]`` by the module before."""
    return [*history.memo.get("sources", [history.x0]), h - history.states[-1]]


def sources_stats(
    h: torch.Tensor, out: torch.Tensor, n_sources: int, static: torch.Tensor, attn: list
) -> dict:
    """``ILT.stats`` of a kind that mixes sources: ``scale`` 1.0 (no curriculum), ``attn`` (the attention over
    the sources averaged over tokens, one row per stream; empty without attention), ``static`` (the static
    weights' mean |w| over channels, per source, one row per stream), ``attn_prev`` (the attention on the newest
    source, the layer's own contribution; NaN without attention) and ``labels`` ("emb", then "L<n>" for main
    layer n's contribution, 1-based)."""
    ratio = (out.float() - h.float()).norm(dim=-1) / h.float().norm(dim=-1).clamp_min(1e-12)
    return {
        "scale": 1.0,
        "ratio": ratio.mean().item(),
        "attn": attn,
        "static": static.detach().float().abs().mean(dim=-1).tolist(),
        "attn_prev": sum(a[-1] for a in attn) / len(attn) if attn else math.nan,
        "labels": ["emb"] + [f"L{n + 1}" for n in range(n_sources - 1)],
    }


def format_sources(index: int, layer: int, stats: dict) -> list[str]:
    """``ILT.format_stats`` for ``sources_stats``."""
    labels = stats["labels"]
    lines = [
        f"ILT {index + 1} (after layer {layer + 1}, reads {', '.join(labels)}): "
        f"|modulation| / |layer output| = {stats['ratio']:.4f}"
    ]
    for stream, weights in enumerate(stats["static"]):
        attn = stats["attn"][stream] if stats["attn"] else None
        parts = [
            f"{name} {'' if attn is None else f'{attn[s]:.3f} '}|w| {weights[s]:.4f}"
            for s, name in enumerate(labels[: len(weights)])
        ]
        what = "attention and static |w|" if attn is not None else "static |w|"
        lines.append(f"  residual ({what}): {', '.join(parts)}")
    return lines
