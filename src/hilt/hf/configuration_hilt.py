"""HiltConfig: HILT's ModelConfig as a transformers ``PretrainedConfig`` (``model_type`` "hilt").

Every ModelConfig field is an attribute of the same name (no aliases), so config.json holds exactly what a HILT
checkpoint's ``config`` holds. Beside them, ``max_position_embeddings`` is the context the model was trained on
(the training run's ``seq_len``; ``max_seq_len`` is only the size of the positions table): the name under which
transformers' ``generate()`` and evaluation harnesses look for a model's maximum length. Exported folders carry this
file beside ``config.py``; see hilt/hf/export.py.
"""

from __future__ import annotations

from dataclasses import fields

from transformers import PretrainedConfig

from ..model.config import REMOVED, ModelConfig

MODEL_FIELDS = tuple(f.name for f in fields(ModelConfig))


class HiltConfig(PretrainedConfig):
    model_type = "hilt"

    def __init__(self, vocab_size: int = 50260, max_position_embeddings: int | None = None, **kwargs):
        given = {name: kwargs.pop(name) for name in MODEL_FIELDS if name in kwargs}
        removed = {name: kwargs.pop(name) for name in REMOVED if name in kwargs}
        # ModelConfig validates every field and fills the derived ones (d_ff), so a bad config.json fails here; an
        # older export's removed variants are dropped where off and refused where on
        model_config = ModelConfig.from_dict({"vocab_size": vocab_size, **given, **removed})
        for name, value in model_config.to_dict().items():
            setattr(self, name, value)
        # a folder exported before the trained context was recorded: the whole positions table, as it then said
        trained = model_config.max_seq_len if max_position_embeddings is None else max_position_embeddings
        if not 1 <= trained <= model_config.max_seq_len:
            raise ValueError(
                f"max_position_embeddings must be between 1 and max_seq_len ({model_config.max_seq_len}), "
                f"got {trained}"
            )
        self.max_position_embeddings = trained
        # transformers ties the LM head to the embedding only when its own flag says so
        kwargs.setdefault("tie_word_embeddings", model_config.tie_weights)
        super().__init__(**kwargs)

    @property
    def num_hidden_layers(self) -> int:
        """Read by transformers' cache classes to size themselves; not saved (config.json holds n_layers)."""
        return self.n_layers

    def to_model_config(self) -> ModelConfig:
        return ModelConfig.from_dict({name: getattr(self, name) for name in MODEL_FIELDS})
