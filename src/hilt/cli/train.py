"""`hilt train`: its flags, built from ``TrainConfig`` and ``ModelConfig`` (hilt.cli.flags), and the call into
``hilt.training.run``. Also the model and data flag groups other commands share.
"""

from __future__ import annotations

import argparse

from hilt.cli.flags import add_fields, values
from hilt.model.config import ModelConfig  # plain Python, no torch
from hilt.training.config import TrainConfig  # plain Python, no torch

DATA_FIELDS = ("cache_dir", "doc_separator", "text_field")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """ModelConfig's fields as flags. Their defaults are None, so that a flag given on --resume can be checked
    against the checkpoint; ModelConfig fills in the real defaults (which the help texts show)."""
    g = p.add_argument_group(
        "model (ignored on --resume: the checkpoint's config rules; a contradicting flag is an error)"
    )
    add_fields(g, ModelConfig, unset_default=True, help_for={"ilt_kind": ilt_kind_help()})


def ilt_kind_help() -> str:
    from hilt.model.ilts import KINDS  # torch: only the commands that build a model have this flag

    return "the inter-layer module: " + "; ".join(f"{name}: {cls.help}" for name, cls in KINDS.items())


def model_args(args: argparse.Namespace) -> dict:
    """The model flags as given: ModelConfig field -> value, None where left out."""
    return {name: getattr(args, name) for name in MODEL_FIELDS}


MODEL_FIELDS = tuple(f for f in ModelConfig.__dataclass_fields__ if f != "vocab_size")


def add_data_flags(p: argparse.ArgumentParser) -> None:
    """How the input is read and cached (train and prepare share these, so they find the same cache)."""
    add_fields(p.add_argument_group("data"), TrainConfig, only=DATA_FIELDS)


def add_train(p: argparse.ArgumentParser) -> None:
    add_fields(p, TrainConfig, exclude=DATA_FIELDS)
    add_data_flags(p)
    add_model_flags(p)


def cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from hilt.training.run import run_training

    settings = values(args, [f.name for f in fields(TrainConfig)])
    run_training(TrainConfig(**settings), model_args(args))
    return 0
