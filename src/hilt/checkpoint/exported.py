"""A folder written by ``hilt export`` -> the HILT model, its tokenizer and what its checkpoint knew: what every
command that takes ``--model_path`` uses when it is given a folder (see ``hilt.checkpoint.store.load_model_and_tokenizer``).

Reads config.json, model.safetensors, hilt_checkpoint.json and the tokenizer with json, safetensors and torch only:
transformers (seconds to import, and optional) is not needed to use an exported model from HILT.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch

from hilt.errors import UserError
from hilt.model.config import REMOVED, ModelConfig

META_FILE = "hilt_checkpoint.json"  # the checkpoint's keys besides config and weights, written by hilt export


def load_exported(path: str | Path, device: torch.device):
    """(model in eval mode on ``device``, its hilt Tokenizer, a checkpoint-like dict) from a folder written by
    ``export``: the same return as ``hilt.checkpoint.store.load_model_and_tokenizer``. The dict holds ``config``,
    ``tokenizer`` (the returned tokenizer's identity) and, when the folder records them, ``val_loss``,
    ``global_step``, ``train_config`` and the other keys of hilt_checkpoint.json. Needs no transformers."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from hilt.data.tokenizer import Tokenizer
    from hilt.model import HierarchicalTransformer

    folder = Path(path)
    values = read_json(folder / "config.json", folder)
    if values is None or values.get("model_type") != "hilt":
        found = (
            "no config.json" if values is None else f"model_type {values.get('model_type')!r} in config.json"
        )
        raise UserError(
            f"{folder} is not a HILT export ({found}); give a checkpoint or a folder written by hilt export"
        )
    meta = read_json(folder / META_FILE, folder) or {}
    known = {f.name for f in fields(ModelConfig)}
    # config.json also holds transformers' own keys, so only the exporter's list tells a newer HILT's field; an
    # older HILT's removed variants are ModelConfig.from_dict's to judge
    newer = sorted(set(meta.get("config_fields", ())) - known - set(REMOVED))
    if newer:
        raise UserError(
            f"{folder} was exported by a newer HILT: this one does not know ModelConfig.{', '.join(newer)}"
        )
    try:
        config = ModelConfig.from_dict({k: v for k, v in values.items() if k in known or k in REMOVED})
    except (TypeError, ValueError) as e:
        raise UserError(f"{folder}/config.json: invalid model config: {e}") from None
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise UserError(f"{folder} has no model.safetensors")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{weights} is not readable safetensors: {e}") from None
    state = {k.removeprefix("model."): v for k, v in state.items()}
    if config.tie_weights and "head.weight" not in state and "embed.weight" in state:
        state["head.weight"] = state["embed.weight"]  # stored once; the model shares one tensor anyway
    model = HierarchicalTransformer(config)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(
            f"{weights}: weights do not match the architecture in config.json: {str(e).splitlines()[0]}"
        ) from None

    shipped = Tokenizer.load()
    if meta.get("tokenizer") == shipped.name:
        tokenizer = shipped  # the package's GPT-2 files: the same identity, so token caches are shared
    else:
        tokenizer = Tokenizer.load(folder)
        meta["train_config"] = {**(meta.get("train_config") or {}), "tokenizer": str(folder)}
    if tokenizer.vocab_size != config.vocab_size:
        raise UserError(
            f"{folder} has a vocabulary of {config.vocab_size} ids; its tokenizer has {tokenizer.vocab_size}"
        )
    ckpt = {**meta, "config": config.to_dict(), "tokenizer": tokenizer.name}
    return model.to(device).eval(), tokenizer, ckpt


def read_json(path: Path, folder: Path) -> dict | None:
    """The JSON object in ``path``; None when the file is missing."""
    if not path.is_file():
        if not folder.is_dir():
            raise UserError(f"{folder} is not a folder")
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a {type(value).__name__}, not a JSON object")
    return value
