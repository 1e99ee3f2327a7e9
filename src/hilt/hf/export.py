"""HILT checkpoint -> Hugging Face folder (``hilt export``); the way back is ``hilt.checkpoint.exported.load_exported``.

    from hilt.hf.export import export
    export("runs/x/best_model.pt", "hf/x")

The folder holds config.json (HiltConfig: every ModelConfig field), model.safetensors (the LM head tied to the
embedding is stored once), generation_config.json (bos/eos/pad ids and the modulation scale), the tokenizer
(tokenizer.json, tokenizer_config.json, special_tokens_map.json), the modelling code (every file of hilt/model/
but its __init__.py, byte for byte as in the package, plus configuration_hilt.py and modeling_hilt.py with their
imports made local), hilt_checkpoint.json (what the checkpoint knew besides its weights: tokenizer
identity, step, losses, training settings), a README.md model card and hilt_export.json, the list of the files the
export wrote: ``overwrite`` replaces only a folder that holds it and nothing else.

The maximum length the folder advertises (config.json's ``max_position_embeddings``, the tokenizer's
``model_max_length``) is the context the model was trained on, the training run's ``seq_len``, not the size of its
positions table (``max_seq_len``): evaluation harnesses score windows of that length, so they see what
``hilt eval`` sees.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import torch

from hilt.checkpoint.exported import META_FILE, load_exported  # noqa: F401 (load_exported: folder -> HILT, re-exported)
from hilt.errors import UserError
from hilt.hf import TRANSFORMERS
from hilt.model.config import ModelConfig

PACKAGE = Path(__file__).resolve().parents[1]  # src/hilt
# the model's own files (hilt/model/), copied unchanged: they import only torch and each other
MODEL_FILES = tuple(sorted(p.name for p in (PACKAGE / "model").glob("*.py") if p.name != "__init__.py"))
# transformers' side, from hilt/hf/: their ``from ..model.x`` becomes ``from .x`` in the flat folder
HF_FILES = ("configuration_hilt.py", "modeling_hilt.py")
AUTO_MAP = {
    "AutoConfig": "configuration_hilt.HiltConfig",
    "AutoModelForCausalLM": "modeling_hilt.HiltForCausalLM",
}
# what the folder keeps of a checkpoint besides config and weights (optimizer and RNG state are training's)
META_KEYS = (
    "tokenizer",
    "global_step",
    "epoch",
    "val_loss",
    "best_loss",
    "train_loss",
    "perplexity",
    "train_config",
)
# written last into every export; lists the folder's files, so that --overwrite can tell an export from anything else
MARKER_FILE = "hilt_export.json"


# --- checkpoint -> folder ------------------------------------------------------------------------------------


def export(model_path: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Writes the Hugging Face folder of the checkpoint (or exported folder) ``model_path`` to ``out_dir``.

    The folder is written next to ``out_dir`` under a temporary name and renamed at the end, so a failure, Ctrl+C
    or SIGTERM leaves no half-written folder. An existing non-empty ``out_dir`` is replaced only with
    ``overwrite``, and only when it is an earlier export's folder (see ``check_out_dir``)."""
    from hilt.checkpoint.store import load_model_and_tokenizer

    if not TRANSFORMERS:
        raise UserError("hilt export needs transformers, one of HILT's extras: pip install 'hilt[extras]'")
    out = check_out_dir(model_path, out_dir, overwrite)  # before the seconds of loading, which it may save
    with sigterm_raises():
        model, tokenizer, ckpt = load_model_and_tokenizer(model_path, torch.device("cpu"))
        tmp = old = None
        try:
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
            except OSError as e:
                raise UserError(f"--out_dir {out_dir}: cannot write there: {e.strerror or e}") from None
            write_folder(model, tokenizer, ckpt, tmp)
            # mkdtemp made the folder private (and safetensors its file); an export is for sharing: the umask
            umask = os.umask(0)
            os.umask(umask)
            for path in (tmp, *tmp.iterdir()):
                path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
            if out.exists():
                # loading took seconds, in which the folder may have changed: check again before deleting it
                check_out_dir(model_path, out_dir, overwrite)
                old = tmp.with_name(tmp.name + ".old")
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old)
            else:
                os.replace(tmp, out)
        except BaseException:
            if old is not None and old.exists() and not out.exists():
                os.replace(old, out)  # stopped between the two renames: the earlier export goes back in place
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            raise
    return Path(out_dir)


def check_out_dir(model_path: str | Path, out_dir: str | Path, overwrite: bool) -> Path:
    """``out_dir`` as an absolute path, once it is known that the export may write it; else a UserError.

    ``overwrite`` deletes the folder, so it must be an earlier export's: one holding hilt_export.json and only
    the files that lists. Whatever the flag, the folder may not hold the checkpoint being exported or the current
    directory, and its nearest existing ancestor must be a folder (``afile/sub`` fails here, not after loading)."""
    out = Path(os.path.abspath(out_dir))  # "." and "x/.." name real folders, with a parent to write beside
    source = Path(model_path).resolve()
    if out.is_symlink():
        raise UserError(f"--out_dir {out_dir} is a symbolic link; give the folder itself")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out_dir {out_dir} is a file, not a folder")
    ancestor = next((p for p in out.parents if p.exists()), out)  # out itself only for the root
    if not ancestor.is_dir():
        raise UserError(f"--out_dir {out_dir} lies under {ancestor}, which is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"--out_dir {out_dir}: {ancestor} is not writable")
    real = out.resolve()
    if real == source:
        raise UserError(f"--out_dir {out_dir} is the folder being exported; choose another")
    if source.is_relative_to(real):
        raise UserError(
            f"--out_dir {out_dir} holds the checkpoint being exported ({model_path}); choose another"
        )
    if source.is_dir() and real.is_relative_to(source):
        raise UserError(f"--out_dir {out_dir} lies inside the folder being exported; choose another")
    if out.is_dir() and Path.cwd().resolve().is_relative_to(real):
        raise UserError(f"--out_dir {out_dir} holds the current directory; choose another")
    if not out.is_dir() or not any(out.iterdir()):
        return out
    if not overwrite:
        raise UserError(f"--out_dir {out_dir} exists and is not empty; pass --overwrite to replace it")
    listed = export_files(out)
    if listed is None:
        raise UserError(
            f"--out_dir {out_dir} was not written by hilt export (it has no valid {MARKER_FILE}); "
            "--overwrite replaces only an earlier export: remove the folder yourself or choose another"
        )
    foreign = sorted(
        p.name for p in out.iterdir() if p.name not in listed or p.is_symlink() or not p.is_file()
    )
    if foreign:
        raise UserError(
            f"--out_dir {out_dir} holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, "
            "which hilt export did not write; --overwrite replaces only an export's own files"
        )
    return out


def export_files(folder: Path) -> set[str] | None:
    """The file names hilt_export.json in ``folder`` lists (itself among them); None when it is missing or bad."""
    try:
        marker = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
        files = marker["files"]
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError):
        return None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return {*files, MARKER_FILE}


class Terminated(BaseException):
    """SIGTERM during an export, raised where the process is, so the cleanup that Ctrl+C's KeyboardInterrupt
    gets runs for it too."""


@contextmanager
def sigterm_raises():
    """Within the block, SIGTERM raises Terminated instead of ending the process on the spot (which left the
    temporary folder behind). Only where SIGTERM still has its default action and in the main thread: a program
    that handles SIGTERM itself keeps its handler."""
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated

    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def write_folder(model, tokenizer, ckpt: dict, folder: Path) -> None:
    """Everything ``export`` writes, into the existing folder ``folder``."""
    from transformers import GenerationConfig
    from transformers.utils import logging as hf_logging

    from hilt.hf import HiltConfig, HiltForCausalLM

    config: ModelConfig = model.config
    specials = {
        "bos_token_id": tokenizer.bos_id,
        "eos_token_id": tokenizer.eos_id,
        "pad_token_id": tokenizer.pad_id,
    }
    context, recorded = trained_context(config, ckpt)
    hf_config = HiltConfig(**config.to_dict(), **specials, max_position_embeddings=context)
    hf_config.auto_map = AUTO_MAP
    hf_config.architectures = [HiltForCausalLM.__name__]
    if hf_config.to_model_config() != config:
        raise UserError(
            "this checkpoint's config cannot be written as a HiltConfig: "
            f"{config.to_dict()} became {hf_config.to_model_config().to_dict()}"
        )
    hf_model = HiltForCausalLM(hf_config)
    hf_model.model.load_state_dict(model.state_dict())
    hf_model.generation_config = GenerationConfig(**specials, modulation_scale=config.modulation_scale_end)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a one-shard "Writing model shards" bar tells an export's user nothing
    try:
        hf_model.save_pretrained(folder)  # config.json, model.safetensors, generation_config.json
    finally:
        if bars:
            hf_logging.enable_progress_bar()

    for name in MODEL_FILES:
        shutil.copyfile(PACKAGE / "model" / name, folder / name)
    for name in HF_FILES:
        source = (PACKAGE / "hf" / name).read_text(encoding="utf-8")
        (folder / name).write_text(
            re.sub(r"^from \.\.(model\.)?", "from .", source, flags=re.M), encoding="utf-8"
        )

    write_tokenizer(tokenizer, context, folder)
    meta = {key: ckpt[key] for key in META_KEYS if ckpt.get(key) is not None}
    meta["config_fields"] = list(config.to_dict())  # how load_exported tells a field it does not know
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    card = model_card(config, meta, hf_model.num_parameters(), tokenizer, context=context, recorded=recorded)
    (folder / "README.md").write_text(card, encoding="utf-8")
    files = sorted([*(p.name for p in folder.iterdir()), MARKER_FILE])
    marker = {"written_by": "hilt export", "files": files}
    (folder / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def trained_context(config: ModelConfig, ckpt: dict) -> tuple[int, bool]:
    """(the context the model was trained on, whether the checkpoint records it). Training's ``seq_len`` is in
    ``train_config``; a checkpoint without it is assumed to have been trained on its whole positions table."""
    seq_len = (ckpt.get("train_config") or {}).get("seq_len")
    if isinstance(seq_len, int) and 1 <= seq_len <= config.max_seq_len:
        return seq_len, True
    return config.max_seq_len, False


def write_tokenizer(tokenizer, max_length: int, folder: Path) -> None:
    """tokenizer.json (the BPE with <PAD>/<BOS>/<EOS> as special tokens, at the ids HILT gives them) and the two
    small files AutoTokenizer reads beside it. Left padding: what batched generation with a decoder needs.
    ``max_length`` (the trained context) becomes ``model_max_length``, which harnesses read as the window."""
    tokenizer._tok.save(str(folder / "tokenizer.json"))
    special = {"bos_token": "<BOS>", "eos_token": "<EOS>", "pad_token": "<PAD>"}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": max_length,
        "padding_side": "left",
        "model_input_names": ["input_ids", "attention_mask"],  # no token_type_ids: the model has none
        "add_bos_token": False,  # HILT encodes text without special tokens
        "clean_up_tokenization_spaces": False,
    }
    for name, content in (("tokenizer_config.json", tokenizer_config), ("special_tokens_map.json", special)):
        (folder / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")


def ilt_kind(config: ModelConfig) -> str:
    """The ILT in words, for the model card."""
    if config.n_layers_ilt == 0:
        return "none (plain transformer baseline)"
    from hilt.model.ilts import ilt_class

    return f"{config.ilt_kind} ({ilt_class(config.ilt_kind).help})"


def ilt_rows(c: ModelConfig) -> list[str]:
    """The model card's table rows about the ILTs: the fields the model's kind uses."""
    if c.n_layers_ilt == 0:
        return []
    if c.ilt_kind != "design":
        return [f"| ILT rank | {c.ilt_rank} |"]
    return [
        f"| ILTs | {c.n_layers_ilt} layers of width {c.ilt_dim} ({c.nhead_ilt} heads), window {c.ilt_window} |",
        f"| modulation scale | {c.modulation_scale_end} (training ramped it from {c.modulation_scale_start}) |",
    ]


def context_lines(config: ModelConfig, context: int, recorded: bool) -> list[str]:
    """The model card's section on the context: what config.json and the tokenizer advertise, and why."""
    advertised = (
        f"config.json's `max_position_embeddings` and the tokenizer's `model_max_length` are {context}"
    )
    if not recorded:
        return [
            "The checkpoint does not record the sequence length it was trained on, so the whole positions table "
            f"(`max_seq_len`, {context} tokens) is assumed to be the trained context: {advertised}. If training "
            "used shorter sequences, give that length to evaluation harnesses (lm-evaluation-harness: "
            "`--model_args max_length=N`); longer windows score positions the model never saw.",
        ]
    lines = [
        f"The model was trained on sequences of {context} tokens, so {advertised}: evaluation harnesses "
        f"(lm-evaluation-harness with its defaults) score windows of {context} tokens, as `hilt eval` does.",
    ]
    if context < config.max_seq_len:
        lines[0] += (
            f" The positions table reaches {config.max_seq_len} tokens (`max_seq_len`), but positions past "
            f"{context} were never trained; `generate()` warns past them."
        )
    return lines


def model_card(
    config: ModelConfig, meta: dict, n_params: int, tokenizer, *, context: int, recorded: bool
) -> str:
    specials = f"{tokenizer.pad_id}, {tokenizer.bos_id}, {tokenizer.eos_id}"
    tc = meta.get("train_config") or {}
    val_loss = meta.get("val_loss")
    c = config
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [hilt, custom_code]",
        "---",
        "",
        "# HILT: Hierarchical Transformer with Inter-Layer Transformers",
        "",
        "A decoder-only transformer whose consecutive layers are mixed by small Inter-Layer Transformers (ILTs), "
        "trained with HILT and exported with `hilt export`.",
        "",
        "## Architecture",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| parameters | {n_params:,} |",
        f"| layers x width (heads) | {c.n_layers} x {c.d_model} ({c.n_heads}), feed-forward {c.d_ff} |",
        f"| context | {context} tokens{'' if recorded else ' (assumed)'}; positions table {c.max_seq_len} |",
        f"| vocabulary | {c.vocab_size} ids; `<PAD>`, `<BOS>`, `<EOS>` are {specials} |",
        f"| ILT kind | {ilt_kind(c)} |",
        *ilt_rows(c),
        f"| LM head tied to the embedding | {'yes' if c.tie_weights else 'no'} |",
        "",
        "## Context",
        "",
        *context_lines(c, context, recorded),
        "",
        "## Training",
        "",
    ]
    if tc.get("text_file"):
        budget = f", first {tc['max_tokens']:,} tokens" if tc.get("max_tokens") else ""
        lines.append(f"- data: `{tc['text_file']}`{budget}")
    for key, label in (("epochs", "epochs"), ("seq_len", "sequence length"), ("batch_size", "batch size")):
        if tc.get(key) is not None:
            lines.append(f"- {label}: {tc[key]}")
    if meta.get("global_step") is not None:
        lines.append(f"- optimizer steps: {meta['global_step']:,}")
    if val_loss is not None:
        lines.append(f"- validation loss: {val_loss:.4f} (perplexity {math.exp(min(val_loss, 50)):.2f})")
    if lines[-1] == "":
        lines.append("Not recorded in the checkpoint.")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'path = "path/to/this/folder"  # or its id on the Hub',
        "tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)",
        "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)",
        'ids = tokenizer("ROMEO:", return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**ids, max_new_tokens=40)[0]))",
        "```",
        "",
        "`trust_remote_code=True` runs the modelling code in this folder (transformer.py and its neighbours, which "
        "import only torch and transformers); with `hilt` installed, `import hilt.hf` makes it unnecessary.",
        "",
    ]
    return "\n".join(lines)
