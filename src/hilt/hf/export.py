"""HILT checkpoint -> Hugging Face folder (``hilt export``); the way back is ``hilt.checkpoint.exported.load_exported``.

    from hilt.hf.export import export
    export("runs/x/best_model.pt", "hf/x")

The folder holds config.json (HiltConfig: every ModelConfig field), model.safetensors (the LM head tied to the
embedding is stored once), generation_config.json (bos/eos/pad ids and the modulation scale), the tokenizer
(tokenizer.json, tokenizer_config.json, special_tokens_map.json), the modelling code (every file of hilt/model/
but its __init__.py, byte for byte as in the package, plus configuration_hilt.py and modeling_hilt.py with their
imports made local), hilt_checkpoint.json (what the checkpoint knew besides its weights: tokenizer
identity, step, losses, training settings) and a README.md model card.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
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


# --- checkpoint -> folder ------------------------------------------------------------------------------------


def export(model_path: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Writes the Hugging Face folder of the checkpoint (or exported folder) ``model_path`` to ``out_dir``.

    The folder is written next to ``out_dir`` under a temporary name and renamed at the end, so a failure leaves
    no half-written folder. An existing non-empty ``out_dir`` is replaced only with ``overwrite``."""
    from hilt.checkpoint.store import load_model_and_tokenizer

    if not TRANSFORMERS:
        raise UserError("hilt export needs transformers, one of HILT's extras: pip install 'hilt[extras]'")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out_dir {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out_dir {out} exists and is not empty; pass --overwrite to replace it")
    if out.resolve() == Path(model_path).resolve():
        raise UserError(f"--out_dir {out} is the folder being exported; choose another")
    model, tokenizer, ckpt = load_model_and_tokenizer(model_path, torch.device("cpu"))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        write_folder(model, tokenizer, ckpt, tmp)
        # mkdtemp made the folder private (and safetensors its file); an export is for sharing: the umask decides
        umask = os.umask(0)
        os.umask(umask)
        for path in (tmp, *tmp.iterdir()):
            path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
        if out.exists():
            old = tmp.with_name(tmp.name + ".old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


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
    hf_config = HiltConfig(**config.to_dict(), **specials)
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

    write_tokenizer(tokenizer, config.max_seq_len, folder)
    meta = {key: ckpt[key] for key in META_KEYS if ckpt.get(key) is not None}
    meta["config_fields"] = list(config.to_dict())  # how load_exported tells a field it does not know
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    card = model_card(config, meta, hf_model.num_parameters(), tokenizer)
    (folder / "README.md").write_text(card, encoding="utf-8")


def write_tokenizer(tokenizer, max_seq_len: int, folder: Path) -> None:
    """tokenizer.json (the BPE with <PAD>/<BOS>/<EOS> as special tokens, at the ids HILT gives them) and the two
    small files AutoTokenizer reads beside it. Left padding: what batched generation with a decoder needs."""
    tokenizer._tok.save(str(folder / "tokenizer.json"))
    special = {"bos_token": "<BOS>", "eos_token": "<EOS>", "pad_token": "<PAD>"}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": max_seq_len,
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


def model_card(config: ModelConfig, meta: dict, n_params: int, tokenizer) -> str:
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
        f"| context | {c.max_seq_len} tokens, sinusoidal positions |",
        f"| vocabulary | {c.vocab_size} ids; `<PAD>`, `<BOS>`, `<EOS>` are {specials} |",
        f"| ILT kind | {ilt_kind(c)} |",
        *ilt_rows(c),
        f"| LM head tied to the embedding | {'yes' if c.tie_weights else 'no'} |",
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
