"""Do ILTs help? Every arm trains on the same data with the same FLOP budget, for several seeds, and is judged by
its validation loss. The README's "Do ILTs help? (ablation)" table comes from this script:

    .venv/bin/python benchmarks/ablation.py                   # --scale reduced: today's table (~8-30 min)
    .venv/bin/python benchmarks/ablation.py --smoke           # the whole pipeline at a tiny budget (~1 min)
    .venv/bin/python benchmarks/ablation.py --scale small --arms plain,x0,depth --seeds 3 --resume
    .venv/bin/python benchmarks/ablation.py --scale medium --resume

Scales (each flag below still overrides its preset):
  reduced  d_model 128 / 4 layers on data.txt, 2e12 FLOPs per run (~330 plain steps, mid-descent), 3 seeds;
  small    the same model at 2e13 FLOPs (~3,300 plain steps, 8 passes over the data), 5 seeds, 16 validations;
  medium   d_model 256 / 6 layers / 8 heads on the King James Bible (benchmarks/data/kjv.txt.xz, shipped with the
           repository and unpacked into WORK_DIR), 1.5e14 FLOPs (~4,700 plain steps), 5 seeds, 20 validations.
Every finished run is appended at once to OUT_DIR/ablation[_SCALE]_runs.jsonl (committed with the results), so
``--resume`` continues an interrupted ablation, on this machine or in another clone (a run is matched by the
SHA-256 of its text, not by the text's path), and adding arms or seeds to a finished one runs only what is
missing.

Arms (the ILT flags not named stay at their defaults: n_layers_ilt 2, nhead_ilt 2, window 2, dropout 0.1,
curriculum 0.01 -> 0.1):
  hilt       the design's model;
  plain      the same model with n_layers_ilt = 0;
  plain+     a plain transformer given the ILTs' parameters and FLOPs back as depth and width (the (n_layers,
             d_model) whose parameters and FLOPs per token are both closest to hilt's);
  ilt_off    control: hilt with modulation_scale 0, so the ILTs cost what they cost but add nothing. hilt minus
             ilt_off (paired by seed) is the ILTs' own effect, apart from their cost and from seed noise;
  x0         plain + x0 mixing (ilt_kind x0): the stronger baseline; an ILT kind that beats plain only through
             its path to the embedding has not shown that attending over layers adds anything;
  depth      ilt_kind depth: per-token attention over the embedding and every layer's contribution + static
             per-source weights (rank ilt_rank, 32);
  dense      ilt_kind dense: depth's static per-source weights alone (DenseFormer), no attention, x0's cost.
Deltas are paired by seed (same data order, same main-layer initialisation) against plain and against x0.
The arms of the variants the ablation rejected (zero_init, gate, embed, depth_multiway) left with their code; their
runs stay in the committed results, and HILT at commit ab15cea reruns them (docs/evaluation.md).

Equal cost: each arm gets ``--budget`` training FLOPs, counted analytically by ``hilt.model.flops`` (PaLM's convention:
2 FLOPs per multiply-add of every matmul, attention over the full window, backward = 2x forward; the count is
checked against torch's FlopCounterMode for every arm and the ratio stored in the results). An arm that costs more
per token trains for fewer steps. Wall-clock is recorded too (training only, validation excluded).

Reduced size, to finish within an hour on 2 CPU cores: d_model 128, 4 layers, 4 heads, ilt_dim 64 (the design's
ILT_DIM / d_model = 1/2), seq_len 64, batch 16, and a 1,024-id byte-level BPE trained on the training part of
data.txt with Hugging Face ``tokenizers`` (with GPT-2's 50,257 ids the LM head would be 80% of the FLOPs and hide
what the layers do; ``--tokenizer gpt2`` uses it anyway). Every run trains in its own process on one thread.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import lzma
import math
import multiprocessing as mp
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from common import Contestant, cpu_kind, take_turns
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from hilt.data.batches import TokenBatches, train_val_tokens
from hilt.data.tokenizer import Tokenizer
from hilt.evaluation.inspect import ilt_stats
from hilt.evaluation.plot import pyplot
from hilt.model import HierarchicalTransformer, ModelConfig
from hilt.model.flops import forward_flops_per_token, training_flops_per_token
from hilt.training.run import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Arm:
    name: str
    what: str
    overrides: dict


VARIANTS = [
    Arm("hilt", "HILT, design defaults", {}),
    Arm("plain", "n_layers_ilt = 0", {"n_layers_ilt": 0}),
    Arm("plain+", "plain, ILT params/FLOPs back as depth/width", {}),  # overrides filled in by matched_plain
    # the control: same cost, same random numbers as hilt, but the ILTs' output is multiplied by 0
    Arm(
        "ilt_off",
        "control: hilt with modulation_scale 0",
        {"modulation_scale_start": 0.0, "modulation_scale_end": 0.0},
    ),
    Arm("x0", "plain + x0 mixing (ilt_kind x0)", {"ilt_kind": "x0"}),
    Arm("depth", "attention over the layer history", {"ilt_kind": "depth"}),
    Arm("dense", "static weights over the layer history (ilt_kind dense)", {"ilt_kind": "dense"}),
]

SCALES = {
    "reduced": dict(budget=2e12, seeds=3, evals=4),
    "small": dict(budget=2e13, seeds=5, evals=16),
    "medium": dict(
        budget=1.5e14,
        seeds=5,
        evals=20,
        text_file=str(REPO / "benchmarks" / "data" / "kjv.txt.xz"),
        d_model=256,
        n_layers=6,
        n_heads=8,
        ilt_dim=128,
    ),
}
DEFAULTS = dict(
    text_file=str(REPO / "data.txt"),
    d_model=128,
    n_layers=4,
    n_heads=4,
    ilt_dim=64,
)
# flags that do not change what a run computes: a finished run is reused whatever they were. The text is
# matched by its SHA-256 (text_sha256), so another clone, at another path, reuses the committed runs.
NOT_RUN_SETTINGS = (
    *("workers", "out_dir", "work_dir", "resume", "fresh", "arms", "seeds", "text_file"),
    *("step_times", "amp", "threads", "vocab_size"),
)
REFERENCES = ("plain", "x0")  # arms every other arm's loss is compared with, paired by seed


# --- cost ----------------------------------------------------------------------------------------------------


def model_config(base: dict, overrides: dict):
    return ModelConfig(**{**base, **overrides})


def cost(config, seq_len: int) -> dict:
    with torch.device("meta"):  # shapes only: no memory, no time, no random numbers drawn
        model = HierarchicalTransformer(config)
    params = model.num_parameters()
    return {
        "params": params,
        "params_non_embedding": params - model.embed.weight.numel(),
        "forward_flops_per_token": forward_flops_per_token(config, seq_len),
        "train_flops_per_token": training_flops_per_token(config, seq_len),
    }


def matched_plain(base: dict, seq_len: int) -> dict:
    """The plain transformer whose parameters and FLOPs per token are both closest to HILT's: the (n_layers,
    d_model) minimising the larger of the two relative gaps (heads and head count fixed, d_ff = 4 d_model)."""
    target = cost(model_config(base, {}), seq_len)
    best, best_gap = None, math.inf
    for n_layers in range(base["n_layers"], 3 * base["n_layers"] + 1):
        for d_model in range(base["d_model"], 2 * base["d_model"] + 1, base["n_heads"] * 2):
            overrides = {"n_layers_ilt": 0, "n_layers": n_layers, "d_model": d_model}
            c = cost(model_config(base, overrides), seq_len)
            gap = max(
                abs(c["params"] / target["params"] - 1),
                abs(c["train_flops_per_token"] / target["train_flops_per_token"] - 1),
            )
            if gap < best_gap:
                best, best_gap = overrides, gap
    return best


def counted_forward_flops(config, seq_len: int) -> int:
    """torch's own count of one forward pass, per token: the check on the analytic formula. The math SDPA backend
    spells attention out as matmuls the counter sees (it does not count the fused CPU kernel), and the reference
    layers (no CPU kernels) attend over the ILTs' two layers with it too, not in closed form."""
    model = HierarchicalTransformer(config, cpu_kernels=False).eval()
    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter, torch.no_grad():
        model(torch.zeros(1, seq_len, dtype=torch.long))
    return counter.get_total_flops() // seq_len


# --- data ----------------------------------------------------------------------------------------------------


def unpacked_text(text_file: Path, work: Path) -> Path:
    """``text_file`` itself, or for an .xz file (the shipped corpus) its text unpacked into ``work``: the corpus
    reader takes plain text only. Unpacked once; a later call finds the same bytes and leaves them."""
    if text_file.suffix != ".xz":
        return text_file
    data = lzma.decompress(text_file.read_bytes())
    target = work / text_file.stem
    if not (target.exists() and target.read_bytes() == data):
        work.mkdir(parents=True, exist_ok=True)
        target.with_suffix(".tmp").write_bytes(data)
        os.replace(target.with_suffix(".tmp"), target)  # another invocation may be reading the current file
    return target


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_bpe(text_file: Path, out_dir: Path, vocab_size: int, val_fraction: float) -> Path:
    """A byte-level BPE with ``vocab_size`` ids in all (3 of them HILT's special tokens), learnt from the part of
    the text before the validation tail, saved as a Hugging Face tokenizer.json that ``--tokenizer`` loads."""
    text = text_file.read_text(encoding="utf-8")
    train_text = text[: int(len(text) * (1 - val_fraction))]
    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 3, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    bpe.train_from_iterator(train_text.splitlines(keepends=True), trainer=trainer)
    folder = out_dir / f"bpe{vocab_size}"
    folder.mkdir(parents=True, exist_ok=True)
    bpe.save(str(folder / "tokenizer.json"))
    return folder


# --- one run (in a worker process) ---------------------------------------------------------------------------


def die_with_parent(parent_pid: int) -> None:
    """Pool initializer. A worker outlives a killed parent (kill, a closed terminal) and trains on into its run
    folder, which a rerun with --resume deletes and recreates under it; on Linux the kernel ends it instead."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        # the parent died before prctl: nobody would read this worker's results
        if os.getppid() != parent_pid:
            os._exit(1)


def run_one(task: dict) -> dict:
    """Trains one (arm, seed) with the real Trainer, validating ``evals`` times along the way."""
    torch.set_num_threads(1)  # one run per core: small matmuls gain nothing from a second thread
    work, seed, evals = Path(task["work"]), task["seed"], task["evals"]
    run_dir = work / "runs" / f"{task['arm']}-s{seed}"
    if run_dir.exists():  # an interrupted run's folder: unfinished runs start again from step 0
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    train_tokens = np.load(work / "train.npy", mmap_mode="r")
    val_tokens = np.load(work / "val.npy", mmap_mode="r")
    B, T = task["batch_size"], task["seq_len"]
    steps_per_eval = task["steps"] // evals
    cfg = TrainConfig(
        text_file=str(task["text_file"]),
        batch_size=B,
        seq_len=T,
        epochs=evals,  # an "epoch" is the stretch between two validations
        lr=task["lr"],
        amp=False,
        out_dir=str(run_dir),
        seed=seed,
        device="cpu",
        tokenizer=task["tokenizer"],
        epoch_tokens=steps_per_eval * B * T,
        ilt_stats_every=steps_per_eval,
    )
    train = TokenBatches(train_tokens, T, B, seed=seed, epoch_tokens=cfg.epoch_tokens)
    val = TokenBatches(val_tokens, T, B, shuffle=False)
    torch.manual_seed(seed)
    model = HierarchicalTransformer(model_config(task["base"], task["overrides"]))
    trainer = Trainer(model, cfg, train, val, device=torch.device("cpu"))
    curve, seconds = [], 0.0
    with open(run_dir / "log.txt", "w") as log, contextlib.redirect_stdout(log):
        model.train()
        for epoch in range(evals):
            order = train.window_order(epoch)
            t0 = time.perf_counter()
            while trainer.batch_in_epoch < len(train):
                trainer.train_step(order)
            seconds += time.perf_counter() - t0
            if trainer.global_step != (epoch + 1) * steps_per_eval:  # the trap: an epoch is at most one pass
                raise RuntimeError(
                    f"{task['arm']} seed {seed}: {trainer.global_step} steps after validation {epoch + 1}, "
                    f"planned {(epoch + 1) * steps_per_eval}: more validations (--evals) are needed"
                )
            trainer.end_epoch()  # validation, metrics, checkpoints: exactly what `hilt train` does
            flops = trainer.global_step * B * T * task["cost"]["train_flops_per_token"]
            curve.append(
                {
                    "step": trainer.global_step,
                    "flops": flops,
                    "seconds": seconds,
                    "val_loss": trainer.last_val_loss,
                }
            )
    for ckpt in run_dir.glob("*.pt"):  # the metrics stay (`hilt plot` reads them); the weights are not needed
        ckpt.unlink()
    result = {
        "arm": task["arm"],
        "seed": seed,
        "steps": trainer.global_step,
        "tokens": trainer.global_step * B * T,
        "flops": curve[-1]["flops"],
        "train_seconds": seconds,
        "val_loss": trainer.last_val_loss,
        "curve": curve,
    }
    if model.ilts:
        x, _ = next(val.eval_batches())
        stats = ilt_stats(model, x[:8])
        result["ilt"] = {k: stats[k] for k in ("scale", "ratio", "attn_prev")}
    return result


# --- report --------------------------------------------------------------------------------------------------


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN if any value is, and for a single value: no spread is known)."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else math.nan


def pm(mean: float, sd: float) -> str:
    """``mean ± sd``, or the mean alone when there is no sd (one seed)."""
    return f"{mean:.4f}" if math.isnan(sd) else f"{mean:.4f} ± {sd:.4f}"


def loss_at(curve: list[dict], key: str, x: float) -> float:
    """Validation loss at ``x`` (FLOPs or seconds) on a run's curve, interpolated linearly; a run that had
    finished by then counts with its final loss; NaN before its first validation."""
    xs, ys = [p[key] for p in curve], [p["val_loss"] for p in curve]
    return float(np.interp(x, xs, ys)) if x >= xs[0] else math.nan


def summarise(
    results: list[dict], arms: list[Arm], costs: dict, step_costs: dict[str, float] | None = None
) -> list[dict]:
    """One row per arm. ``step_costs`` (arm -> step time / plain's, from ``--step_times`` at the runs' own
    settings) also reads every arm's curve at the step it reaches in the time plain takes for all its steps:
    equal wall-clock from a quiet measurement instead of the runs' own seconds, which other jobs stretch."""
    by_arm = {
        a.name: sorted((r for r in results if r["arm"] == a.name), key=lambda r: r["seed"]) for a in arms
    }
    refs = {name: {r["seed"]: r["val_loss"] for r in by_arm.get(name, [])} for name in ("hilt", *REFERENCES)}
    # equal wall-clock: every arm's loss when the fastest arm's runs were done (mean training time)
    t_equal = min(statistics.fmean(r["train_seconds"] for r in runs) for runs in by_arm.values() if runs)
    rows = []
    for arm in arms:
        runs = by_arm[arm.name]
        if not runs:
            continue
        loss, loss_sd = mean_std([r["val_loss"] for r in runs])
        # paired by seed (same data order, same main-layer initialisation): the fair way to compare arms
        deltas = {}
        for name, ref in refs.items():
            delta = [r["val_loss"] - ref[r["seed"]] for r in runs if r["seed"] in ref]
            d, d_sd = mean_std(delta) if delta else (math.nan, math.nan)
            deltas[f"delta_vs_{name}"], deltas[f"delta_vs_{name}_sd"] = d, d_sd
            deltas[f"delta_vs_{name}_seeds"] = len(delta)
        secs, _ = mean_std([r["train_seconds"] for r in runs])
        at_t, at_t_sd = mean_std([loss_at(r["curve"], "seconds", t_equal) for r in runs])
        by_cost = {}
        if step_costs and arm.name in step_costs and "plain" in step_costs and by_arm.get("plain"):
            plain_steps = by_arm["plain"][0]["steps"] * step_costs["plain"] / step_costs[arm.name]
            at_step = {r["seed"]: loss_at(r["curve"], "step", plain_steps) for r in runs}
            plain_end = {r["seed"]: r["val_loss"] for r in by_arm["plain"]}
            by_cost["equal_time_step"] = min(plain_steps, runs[0]["steps"])
            by_cost["val_loss_at_equal_time"], _ = mean_std(list(at_step.values()))
            paired = [at_step[seed] - plain_end[seed] for seed in at_step if seed in plain_end]
            d, d_sd = mean_std(paired) if paired else (math.nan, math.nan)
            by_cost.update(equal_time_delta_vs_plain=d, equal_time_delta_vs_plain_sd=d_sd)
            by_cost["equal_time_seeds"] = len(paired)
        rows.append(
            {
                "arm": arm.name,
                "what": arm.what,
                "overrides": arm.overrides,
                **costs[arm.name],
                "seeds": len(runs),
                "steps": runs[0]["steps"],
                "tokens": runs[0]["tokens"],
                "val_loss": loss,
                "val_loss_sd": loss_sd,
                **deltas,
                "train_seconds": secs,
                "equal_seconds": t_equal,
                "val_loss_at_equal_seconds": at_t,
                "val_loss_at_equal_seconds_sd": at_t_sd,
                "tokens_per_second": runs[0]["tokens"] / secs,
                **by_cost,
            }
        )
    return rows


def signed_cell(mean: float, sd: float, seeds: int) -> str:
    """A paired Δ as mean ± sd (n seeds); the sd is left out for one seed."""
    return f"{mean:+.4f}" + ("" if math.isnan(sd) else f" ± {sd:.4f}") + f" ({seeds})"


def delta_cell(row: dict, ref: str) -> str:
    """Paired Δ against ``ref``; — for the reference itself or when the reference has not run."""
    if row["arm"] == ref or not row.get(f"delta_vs_{ref}_seeds"):
        return "—"
    return signed_cell(row[f"delta_vs_{ref}"], row[f"delta_vs_{ref}_sd"], row[f"delta_vs_{ref}_seeds"])


def markdown(rows: list[dict], meta: dict) -> str:
    refs = ("hilt", *REFERENCES)
    lines = [
        "| arm | what | params (non-emb.) | train FLOPs/token | steps | seeds | val loss (mean ± sd) | "
        + " | ".join(f"Δ vs {ref} (paired)" for ref in refs)
        + f" | train s | val loss at {rows[0]['equal_seconds']:.0f} s | tokens/s |",
        "| --- " * (10 + len(refs)) + "|",
    ]
    by_cost = any("equal_time_step" in r for r in rows)
    if by_cost:  # read at equal time by the measured step cost (summarise)
        lines[0] += " at plain's time by step cost: step | val loss | Δ vs plain (paired) |"
        lines[1] += " --- | --- | --- |"
    for r in rows:
        cost_cells = " — | — | — |" if by_cost else ""
        if "equal_time_step" in r:
            delta = (
                "—"
                if r["arm"] == "plain"
                else signed_cell(
                    r["equal_time_delta_vs_plain"], r["equal_time_delta_vs_plain_sd"], r["equal_time_seeds"]
                )
            )
            cost_cells = f" {r['equal_time_step']:.0f} | {r['val_loss_at_equal_time']:.4f} | {delta} |"
        lines.append(
            f"| {r['arm']} | {r['what']} | {r['params'] / 1e6:.3f}M ({r['params_non_embedding'] / 1e6:.3f}M) "
            f"| {r['train_flops_per_token'] / 1e6:.2f}M | {r['steps']} | {r['seeds']} | "
            f"{pm(r['val_loss'], r['val_loss_sd'])} | "
            + " | ".join(delta_cell(r, ref) for ref in refs)
            + f" | {r['train_seconds']:.0f} | {pm(r['val_loss_at_equal_seconds'], r['val_loss_at_equal_seconds_sd'])} "
            f"| {r['tokens_per_second']:,.0f} |" + cost_cells
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict], arms: list[Arm], path: Path) -> None:
    plt = pyplot()
    fig, (ax_f, ax_s) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for n, arm in enumerate(arms):
        runs = [r for r in results if r["arm"] == arm.name]
        if not runs:
            continue
        color = colors[n % len(colors)]
        curves = np.array([[p["val_loss"] for p in r["curve"]] for r in runs])  # (seeds, evals)
        mean, sd = curves.mean(0), curves.std(0, ddof=1) if len(runs) > 1 else np.zeros(curves.shape[1])
        flops = np.array([p["flops"] for p in runs[0]["curve"]]) / 1e12
        secs = np.array([[p["seconds"] for p in r["curve"]] for r in runs]).mean(0)
        ax_f.plot(flops, mean, "o-", color=color, label=arm.name, markersize=3)
        ax_f.fill_between(flops, mean - sd, mean + sd, color=color, alpha=0.2)
        ax_s.plot(secs, mean, "o-", color=color, label=arm.name, markersize=3)
    ax_f.set(
        xlabel="training TFLOPs (analytic)", ylabel="validation loss (nats/token)", title="loss per FLOP"
    )
    ax_s.set(xlabel="training seconds (1 thread per run)", title="loss per second")
    for ax in (ax_f, ax_s):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def machine() -> str:
    return f"{cpu_kind()}, torch {torch.__version__}, Python {platform.python_version()}"


def step_times(base: dict, arms: list[Arm], args) -> list[dict]:
    """Training step time of every arm with bench.py's method: forward + backward + clip + AdamW on one fixed
    batch, the arms taking turns in a new random order every round, freed memory kept as train.py keeps it,
    median over ``args.step_times`` timed rounds after 3 untimed ones."""
    from hilt.memory import freed_memory_kept
    from hilt.training.loss import LanguageModelLoss

    class CpuTimed(Contestant):
        """Also takes the step's CPU time on this thread: with one torch thread that is the step's own work,
        which the other processes on a shared machine barely change, while they stretch its wall-clock time."""

        def step(self, x, y) -> None:
            t0 = time.thread_time()
            super().step(x, y)
            self.cpu_times.append(time.thread_time() - t0)

    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.amp else None
    loss = lambda m, x, y: LanguageModelLoss(m)(x, y, 0.1)  # noqa: E731  # what train.py's step calls
    contestants = []
    for arm in arms:
        torch.manual_seed(0)
        model = HierarchicalTransformer(model_config(base, arm.overrides)).train()
        contestants.append(CpuTimed(arm.name, model, dtype, 0, loss))
        contestants[-1].cpu_times = []
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, base["vocab_size"], (args.batch_size, args.seq_len + 1), generator=g)
    with freed_memory_kept():
        take_turns(contestants, x[:, :-1], x[:, 1:], 3, args.step_times, shuffle=random.Random(0))
    for c in contestants:
        c.cpu_times = c.cpu_times[-args.step_times :]  # take_turns clears only the wall-clock warm-up times
    plain = next(c for c in contestants if c.name == "plain")
    return [
        {
            "arm": c.name,
            "step_seconds": statistics.median(c.times),
            "vs_plain": statistics.median(c.times) / statistics.median(plain.times),
            "cpu_seconds": statistics.median(c.cpu_times),
            "cpu_vs_plain": statistics.median(c.cpu_times) / statistics.median(plain.cpu_times),
        }
        for c in contestants
    ]


def too_few_evals(steps: int, evals: int, batches_per_pass: int) -> str | None:
    """Why ``steps`` cannot be trained in ``evals`` stretches of at most one pass each (the Trainer's epoch, which
    run_one uses as the stretch between two validations, never spans passes), or None."""
    if -(-steps // evals) <= batches_per_pass:
        return None
    return (
        f"{steps} steps in {evals} validations is {-(-steps // evals)} steps between two, more than one pass "
        f"over the data ({batches_per_pass} batches): use --evals {-(-steps // batches_per_pass)} or more"
    )


# what a step's cost depends on: a --step_times measurement stands for the runs made with the same values
STEP_COST_SETTINGS = (
    *("d_model", "n_layers", "n_heads", "ilt_dim", "ilt_rank", "seq_len", "batch_size", "vocab_size"),
    *("amp", "threads"),
)


def step_costs_for(out: Path, stem: str, args, vocab_size: int) -> dict[str, float] | None:
    """The arms' step cost relative to plain measured by ``--step_times`` under the runs' own conditions (one
    thread, fp32, their model and batch), or None when none was."""
    path = out / f"{stem}_step_times.json"
    if not path.exists():
        return None
    measured = json.loads(path.read_text())
    runs = {k: getattr(args, k) for k in STEP_COST_SETTINGS} | dict(
        vocab_size=vocab_size, amp=False, threads=1
    )
    return measured["cpu_vs_plain"] if measured["settings"] == runs else None


def print_step_times(args, p: argparse.ArgumentParser, stem: str) -> int:
    base = dict(vocab_size=args.vocab_size, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
                ilt_dim=args.ilt_dim, ilt_rank=args.ilt_rank, max_seq_len=args.seq_len)  # fmt: skip
    wanted = args.arms.split(",")
    if "plain" not in wanted:
        p.error("--step_times compares with plain: include it in --arms")
    arms = [Arm(a.name, a.what, matched_plain(base, args.seq_len)) if a.name == "plain+" else a
            for a in VARIANTS if a.name in wanted]  # fmt: skip
    rows = step_times(base, arms, args)
    settings = {k: getattr(args, k) for k in STEP_COST_SETTINGS}
    costs_file = Path(args.out_dir) / f"{stem}_step_times.json"
    costs = json.loads(costs_file.read_text()) if costs_file.exists() else {}
    if costs.get("settings") != settings:
        costs = {"settings": settings, "machine": machine(), "cpu_vs_plain": {}}
    costs["cpu_vs_plain"].update({r["arm"]: r["cpu_vs_plain"] for r in rows})
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    costs_file.write_text(json.dumps(costs, indent=1) + "\n")  # the runs' table reads equal time from it
    print(
        f"\n{machine()} | {args.threads} thread(s), {'bf16 autocast' if args.amp else 'fp32'}, batch "
        f"{args.batch_size} x {args.seq_len}, d_model {args.d_model} / {args.n_layers} layers, vocab "
        f"{args.vocab_size}, median of {args.step_times} rounds | load average {os.getloadavg()}\n"
    )
    cpu = "CPU time of the step's thread" + ("" if args.threads == 1 else " (misses the other threads' work)")
    print(f"| arm | step (ms) | vs plain | {cpu} (ms) | vs plain |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['arm']} | {r['step_seconds'] * 1e3:.1f} | {r['vs_plain']:.3f}x | {r['cpu_seconds'] * 1e3:.1f} "
            f"| {r['cpu_vs_plain']:.3f}x |"
        )
    return 0


# --- main ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--scale",
        choices=list(SCALES),
        default="reduced",
        help="preset of budget, seeds, validations, data and model size (default reduced; see the top of the file)",
    )
    p.add_argument("--text_file", default=None, help="training text (default: the scale's)")
    p.add_argument(
        "--out_dir", default=str(REPO / "benchmarks" / "results"), help="table, plot and JSON go here"
    )
    p.add_argument(
        "--work_dir", default=None, help="tokens, per-run metrics and logs (default /tmp/hilt_ablation/SCALE)"
    )
    p.add_argument("--budget", type=float, default=None, help="training FLOPs per run (default: the scale's)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0 .. N-1 (default: the scale's)")
    p.add_argument("--arms", default=",".join(a.name for a in VARIANTS), help="comma-separated subset")
    p.add_argument(
        "--evals",
        type=int,
        default=None,
        help="validations per run, evenly spaced; at most one pass over the data between two (default: the scale's)",
    )
    p.add_argument("--workers", type=int, default=2, help="runs in parallel, one thread each (default 2)")
    p.add_argument("--tokenizer", default="bpe1024", help="bpeN (trained here) or gpt2 (default bpe1024)")
    p.add_argument(
        "--val_tokens",
        type=int,
        default=16384,
        help="validate on the first N held-out tokens; 0 = all (default 16384)",
    )
    p.add_argument("--d_model", type=int, default=None)
    p.add_argument("--n_layers", type=int, default=None)
    p.add_argument("--n_heads", type=int, default=None)
    p.add_argument("--ilt_dim", type=int, default=None)
    p.add_argument("--ilt_rank", type=int, default=32, help="rank of the depth kinds' attention (default 32)")
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--smoke", action="store_true", help="tiny budget, 2 seeds, capped validation: seconds")
    p.add_argument(
        "--resume", action="store_true", help="skip runs already in OUT_DIR/ablation[_SCALE]_runs.jsonl"
    )
    p.add_argument("--fresh", action="store_true", help="discard the runs file's runs and start over")
    p.add_argument(
        "--step_times",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="only time a training step of each arm (bench.py's method, median of ROUNDS) and exit",
    )
    p.add_argument("--amp", action="store_true", help="--step_times: bf16 autocast, as train.py on CPU")
    p.add_argument("--threads", type=int, default=1, help="--step_times: torch threads (default 1)")
    p.add_argument("--vocab_size", type=int, default=1024, help="--step_times: vocabulary (default 1024)")
    args = p.parse_args(argv)
    for key, value in {**DEFAULTS, **SCALES[args.scale]}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.work_dir is None:
        args.work_dir = f"/tmp/hilt_ablation/{args.scale}"
    if args.smoke:
        args.budget, args.seeds, args.evals, args.val_tokens = 1e11, 2, 2, 1024
        args.out_dir = str(Path(args.work_dir) / "smoke")
    stem = "ablation" if args.scale == "reduced" else f"ablation_{args.scale}"
    if args.step_times:  # no data needed: one random batch
        return print_step_times(args, p, stem)

    work, out = Path(args.work_dir), Path(args.out_dir)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    started, load_start = time.time(), os.getloadavg()

    # data: one tokenisation, shared by every run through .npy files
    if not Path(args.text_file).is_file():
        p.error(f"--text_file {args.text_file} is not a file")
    text = unpacked_text(Path(args.text_file), work)
    args.text_sha256 = sha256_of(text)  # what --resume matches, wherever the text lies
    val_fraction = 0.1
    if args.tokenizer == "gpt2":
        tok_dir = None
    elif args.tokenizer.startswith("bpe") and args.tokenizer[3:].isdigit():
        tok_dir = train_bpe(text, work, int(args.tokenizer[3:]), val_fraction)
    else:
        p.error(f"--tokenizer must be gpt2 or bpeN, got {args.tokenizer!r}")
    tokenizer = Tokenizer.load(tok_dir)
    train_tokens, val_tokens = train_val_tokens(
        text,
        tokenizer,
        seq_len=args.seq_len,
        val_fraction=val_fraction,
        tokenizer_dir=tok_dir,
        cache_dir=work / "cache",
    )
    if args.val_tokens:
        val_tokens = val_tokens[: args.val_tokens]
    for name, tokens in (("train", train_tokens), ("val", val_tokens)):
        # written aside and renamed: another invocation on this work_dir may be reading the current file
        np.save(work / f"{name}.tmp.npy", np.asarray(tokens))
        os.replace(work / f"{name}.tmp.npy", work / f"{name}.npy")

    # arms and their cost
    base = dict(
        vocab_size=tokenizer.vocab_size,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        ilt_dim=args.ilt_dim,
        ilt_rank=args.ilt_rank,
        max_seq_len=args.seq_len,
    )
    wanted = args.arms.split(",")
    unknown = set(wanted) - {a.name for a in VARIANTS}
    if unknown:
        p.error(f"unknown arms: {', '.join(sorted(unknown))}")
    arms = [
        Arm(a.name, a.what, matched_plain(base, args.seq_len)) if a.name == "plain+" else a
        for a in VARIANTS
        if a.name in wanted
    ]
    costs = {"vocab_size": tokenizer.vocab_size}
    for arm in arms:
        config = model_config(base, arm.overrides)
        c = cost(config, args.seq_len)
        c["flop_count_check"] = counted_forward_flops(config, args.seq_len) / c["forward_flops_per_token"]
        c["steps"] = max(
            args.evals, round(args.budget / (c["train_flops_per_token"] * args.batch_size * args.seq_len))
        )
        c["steps"] -= c["steps"] % args.evals
        costs[arm.name] = c
        print(
            f"{arm.name:10s} {arm.overrides} | {c['params'] / 1e6:.3f}M params | "
            f"{c['train_flops_per_token'] / 1e6:.2f}M train FLOPs/token (torch's count / ours: "
            f"{c['flop_count_check']:.3f}) | {c['steps']} steps"
        )
    # the trap this guards against: an epoch (the stretch between two validations) holds at most one pass over
    # the training tokens, so a budget needing more steps than `evals` passes would silently train less
    per_pass = len(TokenBatches(np.asarray(train_tokens), args.seq_len, args.batch_size))
    problem = too_few_evals(max(costs[a.name]["steps"] for a in arms), args.evals, per_pass)
    if problem:
        p.error(problem)
    print(
        f"{len(train_tokens):,} train / {len(val_tokens):,} val tokens ({tokenizer.name}) | budget {args.budget:.2e} "
        f"FLOPs per run | {len(arms)} arms x {args.seeds} seeds on {args.workers} workers",
        flush=True,
    )

    tasks = [
        {
            "arm": arm.name,
            "overrides": arm.overrides,
            "seed": seed,
            "steps": costs[arm.name]["steps"],
            "cost": costs[arm.name],
            "base": base,
            "work": str(work),
            "text_file": str(text),
            "tokenizer": str(tok_dir) if tok_dir else None,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "lr": args.lr,
            "evals": args.evals,
        }
        for seed in range(args.seeds)
        for arm in arms
    ]
    # every finished run is appended to the runs file at once; --resume reuses those made with the same settings
    done_file = out / f"{stem}_runs.jsonl"
    settings = {k: v for k, v in vars(args).items() if k not in NOT_RUN_SETTINGS}
    results = []
    if args.resume and done_file.exists():
        results = [
            r
            for r in map(json.loads, done_file.read_text().splitlines())
            if {k: v for k, v in r["settings"].items() if k not in NOT_RUN_SETTINGS} == settings
        ]
        print(f"--resume: {len(results)} runs already done")
    elif done_file.exists() and done_file.stat().st_size and not args.fresh:
        p.error(f"{done_file} holds finished runs: --resume continues them, --fresh discards them")
    else:
        done_file.unlink(missing_ok=True)
    done = {(r["arm"], r["seed"]) for r in results}
    tasks = [t for t in tasks if (t["arm"], t["seed"]) not in done]
    # --arms and --seeds choose what runs now; the table reports every finished run of the chosen arms
    results = [r for r in results if r["arm"] in wanted]
    with mp.get_context("spawn").Pool(
        args.workers, initializer=die_with_parent, initargs=(os.getpid(),)
    ) as pool:
        for r in pool.imap_unordered(run_one, tasks):
            r["settings"] = settings
            results.append(r)
            with done_file.open("a") as f:
                f.write(json.dumps(r) + "\n")
            print(
                f"[{time.time() - started:6.0f}s] {r['arm']:10s} seed {r['seed']}: val loss {r['val_loss']:.4f} after "
                f"{r['steps']} steps, {r['train_seconds']:.0f} s",
                flush=True,
            )

    rows = summarise(results, arms, costs, step_costs_for(out, stem, args, tokenizer.vocab_size))
    meta = {
        "command": "python benchmarks/ablation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "wall_seconds": time.time() - started,
        "settings": vars(args),
        "base_config": base,
        "tokens": {"train": len(train_tokens), "val": len(val_tokens), "tokenizer": tokenizer.name},
    }
    table = markdown(rows, meta)
    (out / f"{stem}.md").write_text(table)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": results}, indent=1))
    plot(results, arms, out / f"{stem}.png")
    print("\n" + table)
    print(
        f"{meta['machine']} | {meta['wall_seconds'] / 60:.1f} min | load average {load_start} -> {meta['load_average_end']}"
    )
    print(f"Wrote {out / stem}.md, .json, .png and {done_file.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
