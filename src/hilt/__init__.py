"""HILT: the Hierarchical Transformer with Inter-Layer Transformers."""

from hilt.model import HierarchicalTransformer, InterLayerTransformer, ModelConfig

__all__ = ["HierarchicalTransformer", "InterLayerTransformer", "ModelConfig"]
__version__ = "0.1.0"
