"""``hilt plot RUN_DIR [RUN_DIR ...]``: training curves from each run's metrics.jsonl as one PNG, runs overlaid.

Panels: train loss (per step) and validation loss (per epoch); perplexity; learning rate; gradient norm; and, when
the runs logged them, the ILT statistics of ``hilt.evaluation.inspect`` (modulation-to-output ratio and the newest layer's
attention to the previous one, per ILT). The x axis is the optimizer step.
"""

from __future__ import annotations

import json
from pathlib import Path

from hilt.errors import UserError
from hilt.training.metrics import perplexity

METRICS_FILE = "metrics.jsonl"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (never needs a display)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plots need matplotlib: pip install matplotlib") from None
    return plt


def read_metrics(run: str | Path) -> dict[str, list[dict]]:
    """Records of a run folder (or a metrics.jsonl path) grouped by kind ("step", "epoch", "ilt").

    A resumed run re-logs the steps after its checkpoint, and a run restarted with --overwrite starts again at
    step 1: when a record's step is not after the previous one of its kind, earlier records from that step on are
    dropped, so each curve shows the run that produced the final checkpoint. A line cut short by a crash is
    skipped."""
    path = Path(run)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise UserError(f"no {METRICS_FILE} in {run} (train with --out_dir {run} to create it)")
    kinds: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or "step" not in record:
            continue
        records = kinds.setdefault(record.get("kind", "step"), [])
        while records and records[-1]["step"] >= record["step"]:
            records.pop()
        records.append(record)
    if not kinds:
        raise UserError(f"{path} holds no metrics records")
    return kinds


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
    return [s for s, _ in pairs], [v for _, v in pairs]


def plot_runs(runs: list[str | Path], out: str | Path) -> Path:
    """Draws every run in ``runs`` on one figure and saves it as ``out`` (PNG)."""
    plt = pyplot()
    data = [(run, read_metrics(run)) for run in runs]
    names = [Path(run).name or str(run) for run in runs]
    if len(set(names)) < len(names):
        names = [str(run) for run in runs]
    has_ilt = any(kinds.get("ilt") for _, kinds in data)
    n_panels = 6 if has_ilt else 4
    fig, axes = plt.subplots(
        2, n_panels // 2, figsize=(5 * n_panels // 2, 8), squeeze=False, layout="constrained"
    )
    ax_loss, ax_ppl, ax_lr, ax_grad = axes[0][0], axes[0][1], axes[1][0], axes[1][1]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, ((_, kinds), name) in enumerate(zip(data, names, strict=True)):
        color = colors[n % len(colors)]
        steps, epochs = kinds.get("step", []), kinds.get("epoch", [])
        x, y = _series(steps, "loss")
        ax_loss.plot(x, y, color=color, alpha=0.45, linewidth=0.8, label=f"{name} train (step)")
        x, y = _series(epochs, "val_loss")
        ax_loss.plot(x, y, "o-", color=color, label=f"{name} val (epoch)")
        ax_ppl.plot(x, [perplexity(v) for v in y], "o-", color=color, label=f"{name} val")
        x, y = _series(epochs, "train_loss")
        ax_ppl.plot(x, [perplexity(v) for v in y], "s--", color=color, alpha=0.6, label=f"{name} train")
        ax_lr.plot(*_series(steps, "lr"), color=color, label=name)
        ax_grad.plot(*_series(steps, "grad_norm"), color=color, alpha=0.7, linewidth=0.8, label=name)
        if has_ilt:
            _plot_ilt(axes[0][2], axes[1][2], kinds.get("ilt", []), color, name)
    ax_loss.set(title="loss", ylabel="cross-entropy (nats)")
    ax_ppl.set(title="perplexity", yscale="log")
    ax_lr.set(title="learning rate")
    ax_grad.set(title="gradient norm (before clipping)", yscale="log")
    if has_ilt:
        axes[0][2].set(title="ILT |scale·modulation| / |layer output|", yscale="log")
        axes[1][2].set(title="ILT attention: newest layer → previous", ylim=(0, 1))
    for ax in axes.flat:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    out = Path(out)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _plot_ilt(ax_ratio, ax_attn, records: list[dict], color: str, name: str) -> None:
    if not records:
        return
    n_ilts = len(records[-1]["ratio"])
    styles = ["-", "--", ":", "-."]
    for i in range(n_ilts):
        rows = [r for r in records if len(r.get("ratio") or []) == n_ilts]
        steps = [r["step"] for r in rows]
        style = styles[i % len(styles)]
        ax_ratio.plot(steps, [r["ratio"][i] for r in rows], style, color=color, label=f"{name} ILT {i + 1}")
        ax_attn.plot(
            steps, [r["attn_prev"][i] for r in rows], style, color=color, label=f"{name} ILT {i + 1}"
        )


def run_plot(runs: list[str], out: str | None = None) -> Path:
    if out is None:
        out = Path(runs[0]) / "metrics.png" if len(runs) == 1 and Path(runs[0]).is_dir() else Path("runs.png")
    path = plot_runs(runs, out)
    print(f"Saved {path}")
    return path
