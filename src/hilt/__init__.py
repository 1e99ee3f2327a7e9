"""HILT: the Hierarchical Transformer with Inter-Layer Transformers."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hilt.model import HierarchicalTransformer, ModelConfig

__all__ = ["HierarchicalTransformer", "ModelConfig"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # `import hilt.cli` runs this file first; importing the model here would import torch (seconds) for
    # `hilt --help` and `hilt prepare`, which never touch a model. `from hilt import ModelConfig` still works.
    if name in __all__:
        from hilt import model

        return getattr(model, name)
    raise AttributeError(f"module 'hilt' has no attribute {name!r}")
