"""What each ILT does, measured on real inputs: how large its modulation is next to the layer output it is added
to, and how its attention splits between the layers in its window. ``hilt inspect`` prints both for a prompt and
draws the attention as a heat map; the trainer logs them every ``--ilt_stats_every`` steps.

The model never keeps its attention weights, so forward hooks capture the input of every ILT
attention block and the weights are recomputed here from that block's own q/k projection. Nothing in the training
hot path changes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from hilt.errors import UserError
from hilt.kernels import causal_weights
from hilt.model import HierarchicalTransformer, MultiHeadAttention


def attention_weights(attn: MultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
    """The causal softmax weights ``attn`` applies to ``x`` (N, W, E): (N, H, W, W), rows = queries."""
    N, W, E = x.shape
    q, k, _ = attn.qkv(x).split(E, dim=2)
    q, k = (t.view(N, W, attn.n_heads, E // attn.n_heads).transpose(1, 2) for t in (q, k))  # (N, H, W, D)
    return causal_weights(q, k)  # (N, H, W, W): the very weights the ILT's short attention applies


def window_labels(model: HierarchicalTransformer, ilt_index: int, window_len: int) -> list[str]:
    """Names of the rows ILT ``ilt_index`` (0-based) mixes: "emb" for the embedding, "L<n>" for the output of main
    layer n (1-based). ILT i runs after layer i + 2 (1-based), so its newest row is L(i + 2)."""
    labels = ["emb"] if model.config.ilt_embed else []
    n_layers = window_len - len(labels)
    newest = ilt_index + 2
    return labels + [f"L{newest - n_layers + 1 + j}" for j in range(n_layers)]


@torch.no_grad()
def ilt_stats(
    model: HierarchicalTransformer, idx: torch.Tensor, modulation_scale: float | None = None
) -> dict:
    """Per-ILT statistics over the tokens of ``idx`` (B, T), model in eval mode, at ``modulation_scale`` (None: the
    config's final value; a gated ILT uses its learned gate instead).

    Returns lists indexed by ILT:
      ``scale``     the factor the modulation is multiplied by;
      ``ratio``     mean over tokens of |scale * modulation| / |layer output it is added to| (L2 over channels);
      ``attn``      per inner ILT layer, the (W, W) attention weights averaged over tokens and heads
                    (row = query layer, column = key layer, oldest first);
      ``attn_prev`` weight the newest layer puts on the one before it, averaged over the inner layers;
      ``labels``    the names of the W layers (see ``window_labels``).
    """
    if not model.ilts:
        raise UserError("this model has no ILTs (n_layers_ilt = 0): there is nothing to inspect")
    if model.config.ilt_kind != "design":
        return history_stats(model, idx)
    if modulation_scale is None:
        modulation_scale = model.config.modulation_scale_end
    seen: dict[int, tuple[list[torch.Tensor], torch.Tensor]] = {}  # ILT -> (its window, its modulation)
    attn_inputs: dict[tuple[int, int], torch.Tensor] = {}  # (ILT, inner layer) -> attention input (N, W, E)
    hooks = []
    for i, ilt in enumerate(model.ilts):
        hooks.append(ilt.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, (args[0], out))))
        for j, layer in enumerate(ilt.layers):
            hooks.append(
                layer.attn.register_forward_pre_hook(
                    lambda m, args, i=i, j=j: attn_inputs.__setitem__((i, j), args[0])
                )
            )
    was_training = model.training
    model.eval()
    try:
        # eager even when the layers are compiled (--compile): a compiled graph does not call the hooks above
        with torch.compiler.set_stance("force_eager"):
            model(idx, modulation_scale)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)

    out = {"scale": [], "ratio": [], "attn": [], "attn_prev": [], "labels": []}
    for i, ilt in enumerate(model.ilts):
        window, modulation = seen[i]
        scale = float(modulation_scale if ilt.gate is None else ilt.gate)
        current = window[-1].float()  # (B, T, C): the layer output the modulation is added to
        ratio = (scale * modulation.float()).norm(dim=-1) / current.norm(dim=-1).clamp_min(1e-12)  # (B, T)
        mats = [
            attention_weights(layer.attn, attn_inputs[(i, j)].float()).mean(dim=(0, 1))  # (W, W)
            for j, layer in enumerate(ilt.layers)
        ]
        out["scale"].append(scale)
        out["ratio"].append(ratio.mean().item())
        out["attn"].append([m.tolist() for m in mats])
        out["attn_prev"].append(sum(m[-1, -2].item() for m in mats) / len(mats))
        out["labels"].append(window_labels(model, i, len(window)))
    return out


STREAM_NAMES = ("residual", "next attention input")


@torch.no_grad()
def history_stats(model: HierarchicalTransformer, idx: torch.Tensor) -> dict:
    """``ilt_stats`` for the kinds that read the whole layer history (depth, depth_multiway, dense, x0): one
    module after every main layer, reading the embedding and each layer's contribution so far (its sources).

    Returns lists indexed by module:
      ``scale``     1.0: these kinds add their modulation as it is (no curriculum);
      ``ratio``     mean over tokens of |residual modulation| / |layer output it is added to|;
      ``attn``      per stream, the attention over the sources averaged over tokens (empty for dense and x0);
      ``static``    per stream, the static weights' mean |w| over channels, per source;
      ``attn_prev`` the attention on the newest source (the layer's own contribution), averaged over streams
                    (NaN for dense and x0, which have no attention);
      ``labels``    the sources' names: "emb", then "L<n>" for main layer n's contribution (1-based).
    """
    seen: dict[
        int, tuple
    ] = {}  # module -> (state, sources, output); the model appends to its sources list later
    hooks = [
        ilt.register_forward_hook(
            lambda m, args, out, i=i: seen.__setitem__(i, (args[0], list(args[1]), out))
        )
        for i, ilt in enumerate(model.ilts)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.compiler.set_stance("force_eager"):
            model(idx)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out = {"scale": [], "ratio": [], "attn": [], "static": [], "attn_prev": [], "labels": []}
    for i, ilt in enumerate(model.ilts):
        h, sources, (modulations, keys) = seen[i]
        ratio = modulations[0].float().norm(dim=-1) / h.float().norm(dim=-1).clamp_min(1e-12)  # (B, T)
        attn = ilt.weights(h, keys).float().mean(dim=(0, 1)).tolist() if hasattr(ilt, "weights") else []
        out["scale"].append(1.0)
        out["ratio"].append(ratio.mean().item())
        out["attn"].append(attn)  # (streams, S)
        out["static"].append(ilt.static.detach().float().abs().mean(dim=-1).tolist())  # (streams, S or 1)
        out["attn_prev"].append(sum(a[-1] for a in attn) / len(attn) if attn else math.nan)
        out["labels"].append(["emb"] + [f"L{n + 1}" for n in range(len(sources) - 1)])
    return out


# --- hilt inspect --------------------------------------------------------------------------------------------


def format_stats(stats: dict) -> str:
    if "static" in stats:
        return format_history_stats(stats)
    lines = []
    for i, labels in enumerate(stats["labels"]):
        lines.append(
            f"ILT {i + 1} (after layer {labels[-1][1:]}, mixes {', '.join(labels)}): scale {stats['scale'][i]:.4f} | "
            f"|scale*modulation| / |layer output| = {stats['ratio'][i]:.4f}"
        )
        for j, mat in enumerate(stats["attn"][i]):
            newest = ", ".join(f"{name} {w:.3f}" for name, w in zip(labels, mat[-1], strict=True))
            lines.append(f"  inner layer {j + 1}: {labels[-1]} attends to {newest}")
    return "\n".join(lines)


def format_history_stats(stats: dict) -> str:
    lines = []
    for i, labels in enumerate(stats["labels"]):
        lines.append(
            f"ILT {i + 1} (after layer {i + 1}, reads {', '.join(labels)}): "
            f"|modulation| / |layer output| = {stats['ratio'][i]:.4f}"
        )
        for stream, weights in enumerate(stats["static"][i]):
            attn = stats["attn"][i][stream] if stats["attn"][i] else None
            parts = [
                f"{name} {'' if attn is None else f'{attn[s]:.3f} '}|w| {weights[s]:.4f}"
                for s, name in enumerate(labels[: len(weights)])
            ]
            what = "attention and static |w|" if attn is not None else "static |w|"
            lines.append(f"  {STREAM_NAMES[stream]} ({what}): {', '.join(parts)}")
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
        panels.append((f"{what}, {STREAM_NAMES[stream]}", mat))
    return panels


def save_history_heatmap(stats: dict, path: str | Path, title: str = "") -> None:
    """One panel per stream: the modules' (rows) attention over the sources (columns), averaged over tokens."""
    from hilt.plot import pyplot

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
    from hilt.plot import pyplot

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
    from hilt.checkpoint import load_model_and_tokenizer
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
    print(format_stats(stats))
    save_heatmap(stats, out, title=f"{Path(model_path).name}: ILT attention on {len(ids)} tokens")
    print(f"Saved the heat map to {out}")
    return stats
