"""Checkpoints: one versioned dict of plain containers, tensors and numbers, written atomically and only ever read
with ``torch.load(..., weights_only=True)`` so a crafted file cannot run code.

Keys (FORMAT_VERSION 2): format_version, config (ModelConfig as a dict), model_state_dict, optimizer_state_dict,
scheduler_state_dict, scaler_state_dict, epoch (epochs completed), batch_in_epoch (batches of the current epoch
already trained), global_step, best_loss, train_loss, val_loss, perplexity, train_config (the run's settings),
rng_state, tokenizer (its identity string), history (per-epoch metrics), epoch_stats (the current epoch's running
sums), data_fingerprint (how the training data was batched), data_digest (a checksum of the ids trained and
validated on; absent before it was introduced), data_start_epoch (the epoch at which that data's first epoch began).

Format 1 is read too: its config may name the ILT variants the ablation rejected (``ModelConfig.REMOVED``), which
load where they were off and are refused, in one line, where they were on.
"""

from __future__ import annotations

import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch

from hilt.errors import UserError
from hilt.files import TMP_SUFFIX, atomic_write
from hilt.model import HierarchicalTransformer, ModelConfig

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
REQUIRED_KEYS = ("format_version", "config", "model_state_dict")
CHECKPOINT_NAMES = ("best_model.pt", "last_model.pt")


def atomic_save(obj: dict, path: str | Path) -> None:
    """``torch.save`` through ``atomic_write``: a crash never leaves a torn checkpoint."""
    atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_temporaries(folder: str | Path) -> None:
    """Temporary files left by a save that was killed half-way (the real checkpoints are untouched)."""
    for name in CHECKPOINT_NAMES:
        for tmp in Path(folder).glob(f".{name}.*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Loads and checks a checkpoint; every failure is a UserError naming the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise UserError(f"checkpoint path is a directory: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types for damaged files; all mean the same to a user
        unsafe = re.search(r"GLOBAL (\S+)", str(e)) if isinstance(e, pickle.UnpicklingError) else None
        if unsafe:
            raise UserError(
                f"refusing to load {path}: it asks to import {unsafe.group(1)}, and only tensors and plain data "
                "are allowed (unpickling other objects could run code)"
            ) from None
        raise UserError(
            f"{path} is not a readable HILT checkpoint (truncated or corrupt?): {type(e).__name__}"
        ) from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is not a HILT checkpoint (it holds a {type(ckpt).__name__}, not a dict)")
    if "format_version" not in ckpt and "model_state_dict" in ckpt:
        # the seed project's checkpoints had no version and no complete config: say so instead of guessing
        raise UserError(
            f"{path} is an unversioned (pre-1) checkpoint; this HILT reads format {FORMAT_VERSION} - retrain, "
            "or load its model_state_dict into a HierarchicalTransformer whose ModelConfig you know"
        )
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise UserError(f"{path} is not a HILT checkpoint (missing {', '.join(missing)})")
    version = ckpt["format_version"]
    if version not in READABLE_FORMATS:
        raise UserError(
            f"{path} has checkpoint format {version}; this HILT reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))}"
        )
    return ckpt


def model_from_checkpoint(ckpt: dict, path: str | Path = "checkpoint") -> HierarchicalTransformer:
    """Rebuilds the model from the config stored in the checkpoint and loads its weights."""
    try:
        config = ModelConfig.from_dict(ckpt["config"])
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: invalid model config in checkpoint: {e}") from None
    model = HierarchicalTransformer(config)
    try:
        model.load_state_dict(ckpt["model_state_dict"])
    except RuntimeError as e:
        raise UserError(
            f"{path}: weights do not match the architecture in its config: {str(e).splitlines()[0]}"
        ) from None
    return model


def check_compatible(
    ckpt: dict, config: ModelConfig, path: str | Path, *, tokenizer=None, requested: dict | None = None
) -> None:
    """What every command that continues from a checkpoint checks: the tokenizer about to be used is the one the
    checkpoint was trained with, and no flag (``requested``: ModelConfig field -> value, None = not given) names an
    architecture other than the checkpoint's (an error, not silently ignored)."""
    if tokenizer is not None and ckpt.get("tokenizer") and ckpt["tokenizer"] != tokenizer.name:
        raise UserError(f"{path} was trained with tokenizer {ckpt['tokenizer']}, not {tokenizer.name}")
    stored = config.to_dict()
    clashes = [
        f"{k}={v} (checkpoint has {stored[k]})"
        for k, v in (requested or {}).items()
        if v is not None and stored[k] != v
    ]
    if clashes:
        raise UserError(
            f"{path} was trained with another architecture: {', '.join(clashes)}; drop those flags"
        )


def load_model_and_tokenizer(path: str | Path, device: torch.device, requested: dict | None = None):
    """(model in eval mode on ``device``, the tokenizer it was trained with, the checkpoint dict): what
    generation, evaluation and inspection start from. ``path`` is a checkpoint or a folder written by
    ``hilt export``; ``requested`` are architecture flags the user gave (see ``check_compatible``)."""
    from hilt.data.tokenizer import Tokenizer

    if Path(path).is_dir():
        from hilt.checkpoint.exported import (
            load_exported,  # json + safetensors: no transformers import (seconds)
        )

        model, tokenizer, ckpt = load_exported(path, device)
        check_compatible(ckpt, model.config, path, requested=requested)
        return model, tokenizer, ckpt
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path)
    tokenizer = Tokenizer.load((ckpt.get("train_config") or {}).get("tokenizer"))
    check_compatible(ckpt, model.config, path, tokenizer=tokenizer, requested=requested)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise UserError(
            f"{path} has a vocabulary of {model.config.vocab_size} ids; its tokenizer has {tokenizer.vocab_size}"
        )
    return model.to(device).eval(), tokenizer, ckpt


# --- resuming: where in the data a checkpoint left off ----------------------------------------------------


def check_same_data(ckpt: dict, digest: str, path: str | Path, *, new_data: bool = False) -> str | None:
    """Refuses to resume on data other than the checkpoint's (its position in the data and its best validation
    loss would mean nothing there) unless ``new_data`` says it is meant. Returns a note to show, or None."""
    recorded = ckpt.get("data_digest")
    if new_data:
        return None
    if recorded is None:
        return (
            f"note: {path} records no data checksum (an older HILT wrote it); the data could not be checked"
        )
    if recorded != digest:
        raise UserError(
            f"{path} was trained on other data than this run reads (the ids' checksums differ: a changed "
            "--text_file, --max_tokens, tokenizer or reader flag); resume with the data it was trained on, or add "
            "--new_data to continue training on this data from its first epoch, with best_model.pt judged afresh"
        )
    return None


def data_fingerprint(train_data) -> dict:
    """What a position in the training data (epoch, batch) means: the same tokens batched the same way."""
    d = train_data
    return {
        "tokens": len(d.tokens),
        "seq_len": d.seq_len,
        "batch_size": d.batch_size,
        "world_size": d.world_size,
        "seed": d.seed,
        "epoch_tokens": d.epoch_tokens,
    }


def resume_position(ckpt: dict, train_data) -> tuple[int, int, dict | None]:
    """(epoch, batch in that epoch, the epoch's running stats) to continue from. With the same data and batching
    training continues mid-epoch, exactly: the RNG state is restored too. If they changed, the old position means
    nothing, so training starts the next epoch afresh (stats None) and the caller says so."""
    epoch, batch = int(ckpt["epoch"]), int(ckpt["batch_in_epoch"])
    if ckpt.get("data_fingerprint") == data_fingerprint(train_data):
        restore_rng_state(ckpt["rng_state"])
        return epoch, batch, dict(ckpt["epoch_stats"])
    return (epoch + 1, 0, None) if batch else (epoch, 0, None)


# --- RNG state as tensors and numbers, so it survives weights_only loading ----------------------------------


def capture_rng_state() -> dict:
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_version": py_version,
        "python_gauss": py_gauss,
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_pos": int(np_pos),
        "numpy_has_gauss": int(np_has_gauss),
        "numpy_gauss": float(np_gauss),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"].cpu())
    random.setstate(
        (state["python_version"], tuple(int(v) for v in state["python"].tolist()), state["python_gauss"])
    )
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_gauss"],
        )
    )
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
