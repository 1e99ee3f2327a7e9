"""ModelConfig: everything needed to rebuild a model, saved inside every checkpoint; the design's constants; and the
ILT curriculum. Plain Python (no torch), so the CLI can build its flags without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

# --- the design's ILT constants (defaults of ModelConfig; every one is a CLI flag too) -----------------------
ILT_DIM = 128
NHEAD_ILT = 2
N_LAYERS_ILT = 2
ILT_DROPOUT = 0.1
ILT_RANK = 32  # query/key width of the depth kind's attention over the layer history
ILT_WINDOW = 2
MODULATION_SCALE_START = 0.01
MODULATION_SCALE_END = 0.1

DROPOUT = 0.1

# variants the ablation rejected (docs/evaluation.md), and their "off" values in the configs that saved them
REMOVED = {"ilt_zero_init": False, "ilt_gate": False, "ilt_embed": False}
REMOVED_AT = "ab15cea"  # the last commit that builds them and ilt_kind "depth_multiway"


def modulation_scale(progress: float, start: float, end: float) -> float:
    """The ILT curriculum: ``start + progress * (end - start)`` where progress = epochs done / epochs (fractional
    within an epoch). Epoch e of E starts at ``start + (e / E) * (end - start)``, the design's formula."""
    return start + min(max(progress, 0.0), 1.0) * (end - start)


@dataclass(kw_only=True)
class ModelConfig:
    """Everything needed to rebuild a model; saved inside every checkpoint."""

    # each field's help is its flag's (hilt.cli.flags builds the flags from these fields)
    vocab_size: int  # from the tokenizer, not a flag
    d_model: int = field(default=256, metadata={"help": "model width d_model", "flag": "--model_dim"})
    n_layers: int = field(default=6, metadata={"help": "main transformer layers"})
    n_heads: int = field(default=8, metadata={"help": "attention heads"})
    d_ff: int | None = field(
        default=None, metadata={"help": "feed-forward width", "default_help": "4 * model_dim"}
    )
    dropout: float = field(default=DROPOUT, metadata={"help": "dropout of the main layers"})
    max_seq_len: int = field(
        default=1024, metadata={"help": "longest context the positional encoding covers"}
    )
    tie_weights: bool = field(default=True, metadata={"help": "share the token embedding with the LM head"})
    n_layers_ilt: int = field(
        default=N_LAYERS_ILT,
        metadata={"help": "layers inside each ILT; 0 = plain transformer (no ILTs at all)"},
    )
    ilt_dim: int = field(default=ILT_DIM, metadata={"help": "ILT width ILT_DIM"})
    nhead_ilt: int = field(default=NHEAD_ILT, metadata={"help": "ILT attention heads NHEAD_ILT"})
    ilt_dropout: float = field(default=ILT_DROPOUT, metadata={"help": "ILT dropout ILT_DROPOUT"})
    ilt_window: int = field(default=ILT_WINDOW, metadata={"help": "layer outputs each ILT sees"})
    # the curriculum: training ramps modulation_scale from start to end; evaluation and generation use end
    modulation_scale_start: float = field(
        default=MODULATION_SCALE_START, metadata={"help": "curriculum start"}
    )
    modulation_scale_end: float = field(
        default=MODULATION_SCALE_END, metadata={"help": "curriculum end, used for eval and generation"}
    )
    # a name in hilt.model.ilts.KINDS ("design": the seed's ILT above; the others read the layer history at each
    # token, start as an exact plain transformer and ignore the design's fields: ilt_dim, nhead_ilt, ilt_window,
    # the curriculum); the flag's help lists the kinds from the registry
    ilt_kind: str = field(default="design", metadata={"help": "the inter-layer module"})
    ilt_rank: int = field(
        default=ILT_RANK, metadata={"help": "query/key rank of the depth kind's attention over layers"}
    )

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
        if not isinstance(self.ilt_rank, int) or isinstance(self.ilt_rank, bool) or self.ilt_rank < 1:
            raise ValueError(f"ModelConfig.ilt_rank must be a positive integer, got {self.ilt_rank!r}")
        # ilt_kind, and what that kind asks of the other fields, are checked by the kind's class when the model
        # is built (hilt.model.ilts): the kinds live with torch, and this file does not import it
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
        """A saved config; one of an older HILT too, whose removed variants are dropped where they were off and
        refused, in one line, where they were on."""
        values = dict(values)
        for name, off in REMOVED.items():
            value = values.pop(name, off)
            if value != off:
                raise ValueError(
                    f"this model uses {name}={value!r}, an ILT variant HILT no longer builds; "
                    f"HILT at commit {REMOVED_AT} still trains and loads it"
                )
        if values.get("ilt_kind") == "depth_multiway":
            raise ValueError(
                "this model uses ilt_kind 'depth_multiway', an ILT kind HILT no longer builds; "
                f"HILT at commit {REMOVED_AT} still trains and loads it"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {', '.join(unknown)}")
        return cls(**values)
