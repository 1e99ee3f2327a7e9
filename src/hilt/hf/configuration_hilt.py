"""HiltConfig: HILT's ModelConfig as a transformers ``PretrainedConfig`` (``model_type`` "hilt").

Every ModelConfig field is an attribute of the same name (no aliases), so config.json holds exactly what a HILT
checkpoint's ``config`` holds. Exported folders carry this file beside ``config.py``; see hilt/hf/export.py.
"""

from __future__ import annotations

from dataclasses import fields

from transformers import PretrainedConfig

from ..model.config import REMOVED, ModelConfig

MODEL_FIELDS = tuple(f.name for f in fields(ModelConfig))


class HiltConfig(PretrainedConfig):
    model_type = "hilt"

    def __init__(self, vocab_size: int = 50260, **kwargs):
        given = {name: kwargs.pop(name) for name in MODEL_FIELDS if name in kwargs}
        # an older export's config.json: its removed variants are dropped where off and refused where on
        given = ModelConfig.from_dict(
            {"vocab_size": vocab_size, **given, **{n: kwargs.pop(n) for n in REMOVED if n in kwargs}}
        ).to_dict()
        given.pop("vocab_size")
        # ModelConfig validates every field and fills the derived ones (d_ff), so a bad config.json fails here
        model_config = ModelConfig(vocab_size=vocab_size, **given)
        for name, value in model_config.to_dict().items():
            setattr(self, name, value)
        # transformers ties the LM head to the embedding only when its own flag says so
        kwargs.setdefault("tie_word_embeddings", model_config.tie_weights)
        super().__init__(**kwargs)

    @property
    def num_hidden_layers(self) -> int:
        """Read by transformers' cache classes to size themselves; not saved (config.json holds n_layers)."""
        return self.n_layers

    def to_model_config(self) -> ModelConfig:
        return ModelConfig.from_dict({name: getattr(self, name) for name in MODEL_FIELDS})
