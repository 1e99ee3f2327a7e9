"""ModelConfig: everything needed to rebuild a model, saved inside every checkpoint; the design's constants; and the
ILT curriculum. Plain Python (no torch), so the CLI can build its flags without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

# --- the design's ILT constants (defaults of ModelConfig; every one is a CLI flag too) -----------------------
ILT_DIM = 128
NHEAD_ILT = 2
N_LAYERS_ILT = 2
ILT_DROPOUT = 0.1

# which inter-layer module sits between the main layers (hilt.model builds one class per kind)
ILT_KINDS = ("design", "depth", "depth_multiway", "dense", "x0")
ILT_RANK = 32  # query/key width of the depth kinds' attention over the layer history
ILT_WINDOW = 2
MODULATION_SCALE_START = 0.01
MODULATION_SCALE_END = 0.1

DROPOUT = 0.1


def modulation_scale(progress: float, start: float, end: float) -> float:
    """The ILT curriculum: ``start + progress * (end - start)`` where progress = epochs done / epochs (fractional
    within an epoch). Epoch e of E starts at ``start + (e / E) * (end - start)``, the design's formula."""
    return start + min(max(progress, 0.0), 1.0) * (end - start)


@dataclass(kw_only=True)
class ModelConfig:
    """Everything needed to rebuild a model; saved inside every checkpoint."""

    vocab_size: int
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 8
    d_ff: int | None = None  # None -> 4 * d_model
    dropout: float = DROPOUT
    max_seq_len: int = 1024
    tie_weights: bool = True
    n_layers_ilt: int = N_LAYERS_ILT  # 0 -> plain transformer, no ILT parameters at all
    ilt_dim: int = ILT_DIM
    nhead_ilt: int = NHEAD_ILT
    ilt_dropout: float = ILT_DROPOUT
    ilt_window: int = ILT_WINDOW  # how many of the latest layer outputs an ILT sees
    # the curriculum: training ramps modulation_scale from start to end; evaluation and generation use end
    modulation_scale_start: float = MODULATION_SCALE_START
    modulation_scale_end: float = MODULATION_SCALE_END
    # ILT variants compared in benchmarks/ablation.py; all off = the design's ILT
    ilt_zero_init: bool = (
        False  # zero the ILTs' output projection: training starts from an exact plain transformer
    )
    ilt_gate: bool = False  # a learned scale per ILT (from modulation_scale_start) replaces the curriculum
    ilt_embed: bool = False  # each ILT also sees the token embedding, first in its layer window
    # "design": the seed's ILT above. The others read the whole layer history at each token, start as an exact
    # plain transformer and ignore the design-only fields (ilt_dim, nhead_ilt, ilt_window, the curriculum, ...):
    # "depth" and "depth_multiway" attend over the embedding and every earlier layer's contribution (rank
    # ilt_rank), "dense" adds a learned per-channel multiple of each of them (no attention), "x0" of the embedding
    # alone (the baselines the depth kinds must beat)
    ilt_kind: str = "design"
    ilt_rank: int = ILT_RANK

    def __post_init__(self) -> None:
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        positive = (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "d_ff",
            "max_seq_len",
            "ilt_dim",
            "nhead_ilt",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.n_layers_ilt < 0:
            raise ValueError(f"ModelConfig.n_layers_ilt must be >= 0, got {self.n_layers_ilt}")
        if self.ilt_window < 2:
            raise ValueError(
                f"ModelConfig.ilt_window must be >= 2 (previous + current layer), got {self.ilt_window}"
            )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.ilt_dim % self.nhead_ilt:
            raise ValueError(
                f"ModelConfig.ilt_dim ({self.ilt_dim}) must be divisible by nhead_ilt ({self.nhead_ilt})"
            )
        if self.ilt_kind not in ILT_KINDS:
            raise ValueError(
                f"ModelConfig.ilt_kind must be one of {', '.join(ILT_KINDS)}; got {self.ilt_kind!r}"
            )
        if not isinstance(self.ilt_rank, int) or isinstance(self.ilt_rank, bool) or self.ilt_rank < 1:
            raise ValueError(f"ModelConfig.ilt_rank must be a positive integer, got {self.ilt_rank!r}")
        if self.ilt_kind.startswith("depth") and self.ilt_rank > self.d_model:  # the other kinds have no rank
            raise ValueError(
                f"ModelConfig.ilt_rank ({self.ilt_rank}) must be at most d_model ({self.d_model})"
            )
        design_only = [n for n in ("ilt_zero_init", "ilt_gate", "ilt_embed") if getattr(self, n)]
        if self.ilt_kind != "design" and design_only:
            raise ValueError(
                f"ModelConfig.{design_only[0]} is a variant of ilt_kind 'design', not of {self.ilt_kind!r}"
            )
        for name in ("dropout", "ilt_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ModelConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("modulation_scale_start", "modulation_scale_end"):
            if not math.isfinite(getattr(self, name)):  # NaN would make every ILT output NaN
                raise ValueError(f"ModelConfig.{name} must be a finite number, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {', '.join(unknown)}")
        return cls(**values)
