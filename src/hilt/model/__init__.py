"""What a checkpoint rebuilds: the config, the layers, the ILT kinds, the KV cache and the FLOP count. Imports only
torch (``config.py`` not even that), so ``hilt export`` copies the folder as it is.

``from hilt.model import HierarchicalTransformer, ModelConfig`` works; the torch-side names load on first use, so
reading a config never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .config import (  # noqa: F401 (the design's constants: hilt.model is where users look for them)
    DROPOUT,
    ILT_DIM,
    ILT_DROPOUT,
    ILT_RANK,
    ILT_WINDOW,
    MODULATION_SCALE_END,
    MODULATION_SCALE_START,
    N_LAYERS_ILT,
    NHEAD_ILT,
    ModelConfig,
    modulation_scale,
)

if TYPE_CHECKING:
    from .ilt import ILT, History
    from .kv_cache import KVCache
    from .transformer import HierarchicalTransformer

__all__ = ["ILT", "HierarchicalTransformer", "History", "KVCache", "ModelConfig", "modulation_scale"]

_LAZY = {
    "HierarchicalTransformer": "transformer",
    "ILT": "ilt",
    "History": "ilt",
    "KVCache": "kv_cache",
    "PositionalEncoding": "layers",
    "MultiHeadAttention": "layers",
    "FeedForward": "layers",
    "TransformerLayer": "layers",
    "DesignILT": "ilt_design",
    "DepthILT": "ilt_depth",
    "DenseILT": "ilt_dense",
    "X0ILT": "ilt_x0",
}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
