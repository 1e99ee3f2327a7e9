"""What each ILT does, measured on real inputs: how large its modulation is next to the layer output it is added
to, and how its attention splits between the layers in its window. ``hilt inspect`` prints both for a prompt and
draws the attention as a heat map; the trainer logs them every ``--ilt_stats_every`` steps.

The model never keeps its attention weights, so forward hooks capture the input of every ILT
attention block and the weights are recomputed here from that block's own q/k projection. Nothing in the training
hot path changes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hilt.errors import UserError
from hilt.model.ilts import ilt_class
from hilt.model.kernels import causal_weights
from hilt.model.layers import MultiHeadAttention
from hilt.model.transformer import HierarchicalTransformer


def attention_weights(attn: MultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
    """The causal softmax weights ``attn`` applies to ``x`` (N, W, E): (N, H, W, W), rows = queries."""
    N, W, E = x.shape
    q, k, _ = attn.qkv(x).split(E, dim=2)
    q, k = (t.view(N, W, attn.n_heads, E // attn.n_heads).transpose(1, 2) for t in (q, k))  # (N, H, W, D)
    return causal_weights(q, k)  # (N, H, W, W): the very weights the ILT's short attention applies


def ilt_stats(
    model: HierarchicalTransformer, idx: torch.Tensor, modulation_scale: float | None = None
) -> dict:
    """``HierarchicalTransformer.ilt_stats``, with a model without ILTs as the user's mistake it is here."""
    if not model.ilts:
        raise UserError("this model has no ILTs (n_layers_ilt = 0): there is nothing to inspect")
    return model.ilt_stats(idx, modulation_scale)


# --- hilt inspect --------------------------------------------------------------------------------------------


def format_stats(stats: dict, kind: str) -> str:
    """The report of ``ilt_stats`` for a model of ILT ``kind``, in the kind's own words."""
    cls = ilt_class(kind)
    lines = []
    for i, layer in enumerate(stats["after_layer"]):
        lines += cls.format_stats(i, layer, {key: values[i] for key, values in stats.items()})
    return "\n".join(lines)


def history_panels(stats: dict) -> list[tuple[str, np.ndarray]]:
    """(title, modules x sources matrix with NaN where a module has no such source) per stream's attention, or
    the static weights for the x0 kind."""
    n, sources = len(stats["labels"]), stats["labels"][-1]
    key = "attn" if stats["attn"][0] else "static"
    panels = []
    for stream in range(len(stats[key][0])):
        mat = np.full((n, len(sources)), np.nan)
        for i in range(n):
            if stream < len(stats[key][i]):
                row = stats[key][i][stream]
                mat[i, : len(row)] = row
        what = "attention" if key == "attn" else "static |w|"
        panels.append((f"{what}, residual", mat))
    return panels


def save_history_heatmap(stats: dict, path: str | Path, title: str = "") -> None:
    """One panel per stream: the modules' (rows) attention over the sources (columns), averaged over tokens."""
    from hilt.evaluation.plot import pyplot

    plt = pyplot()
    panels = history_panels(stats)
    sources = stats["labels"][-1]
    fig, axes = plt.subplots(
        1, len(panels), figsize=(1.0 * len(sources) * len(panels) + 2, 0.8 * len(sources) + 1)
    )
    axes = np.atleast_1d(axes)
    for ax, (name, mat) in zip(axes, panels, strict=True):
        vmax = 1.0 if name.startswith("attention") else max(float(np.nanmax(mat)), 1e-12)
        image = ax.imshow(mat, vmin=0.0, vmax=vmax, cmap="viridis")
        for r, c in zip(*np.nonzero(~np.isnan(mat)), strict=True):
            w = mat[r, c]
            ax.text(c, r, f"{w:.2f}", ha="center", va="center", color="white" if w < 0.6 * vmax else "black")
        ax.set_xticks(range(len(sources)), sources)
        ax.set_yticks(range(mat.shape[0]), [f"after L{i + 1}" for i in range(mat.shape[0])])
        ax.set_xlabel("source")
        ax.set_title(name, fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_heatmap(stats: dict, path: str | Path, title: str = "") -> None:
    """One panel per (ILT, inner layer): its (W, W) attention weights, annotated."""
    if "static" in stats:
        return save_history_heatmap(stats, path, title)
    from hilt.evaluation.plot import pyplot

    plt = pyplot()
    n_ilts, n_inner = len(stats["attn"]), len(stats["attn"][0])
    fig, axes = plt.subplots(
        n_ilts, n_inner, figsize=(2.6 * n_inner + 1, 2.4 * n_ilts + 0.6), squeeze=False, layout="constrained"
    )
    for i in range(n_ilts):
        labels = stats["labels"][i]
        for j in range(n_inner):
            ax = axes[i][j]
            mat = np.array(stats["attn"][i][j])  # (W, W)
            future = np.triu(np.ones_like(mat, dtype=bool), k=1)
            image = ax.imshow(np.where(future, np.nan, mat), vmin=0.0, vmax=1.0, cmap="viridis")
            for r, c in zip(*np.nonzero(~future), strict=True):  # causal: keys at or before the query
                w = mat[r, c]
                ax.text(c, r, f"{w:.2f}", ha="center", va="center", color="white" if w < 0.6 else "black")
            ax.set_xticks(range(len(labels)), labels)
            ax.set_yticks(range(len(labels)), labels)
            ax.set_title(f"ILT {i + 1} · inner layer {j + 1}", fontsize=9)
            if j == 0:
                ax.set_ylabel(f"query (ratio {stats['ratio'][i]:.3f})")
            if i == n_ilts - 1:
                ax.set_xlabel("key")
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_inspect(
    model_path: str, prompt: str, out: str, device: str = "auto", modulation_scale: float | None = None
) -> dict:
    from hilt.checkpoint.store import load_model_and_tokenizer
    from hilt.device import resolve_device

    torch_device = resolve_device(device)
    model, tokenizer, _ = load_model_and_tokenizer(model_path, torch_device)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise UserError("--prompt is empty: give some text to inspect the ILTs on")
    ids = ids[-model.config.max_seq_len :]
    stats = ilt_stats(model, torch.tensor([ids], device=torch_device), modulation_scale)
    print(
        f"{model_path}: {len(ids)} prompt tokens, averaged over tokens and heads (ilt_kind {model.config.ilt_kind})"
    )
    print(format_stats(stats, model.config.ilt_kind))
    save_heatmap(stats, out, title=f"{Path(model_path).name}: ILT attention on {len(ids)} tokens")
    print(f"Saved the heat map to {out}")
    return stats
