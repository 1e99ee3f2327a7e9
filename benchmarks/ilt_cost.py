"""Where the ILTs' training time goes: the default HILT step against its plain twin (n_layers_ilt=0), with the ILTs'
non-matmul work taken away piece by piece until only their matmuls are left.

    .venv/bin/python benchmarks/ilt_cost.py             # ~2 min on 2 CPU cores
    .venv/bin/python benchmarks/ilt_cost.py --compile   # every variant compiled as train.py --compile does

Each variant runs every matmul of the ILTs at the same shapes, so the last one is the floor for the ILTs as
designed, short of doing fewer FLOPs. Steps as in bench.py (forward + backward + AdamW, bf16 autocast where
train.py uses it), with freed memory kept as train.py runs its steps; the contestants take turns in a new random
order every round, median over --steps timed rounds.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import VOCAB, Contestant, take_turns  # noqa: E402

from hilt.device import autocast_dtype  # noqa: E402
from hilt.loss import LanguageModelLoss  # noqa: E402
from hilt.memory import freed_memory_kept  # noqa: E402
from hilt.model import HierarchicalTransformer, ModelConfig  # noqa: E402
from hilt.train import compile_layers  # noqa: E402


class _NoActivation(nn.Module):
    """A FeedForward's two matmuls without the GELU between them (its dropout is off already)."""

    def __init__(self, ff: nn.Module):
        super().__init__()
        self.fc, self.proj = ff.fc, ff.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.fc(x))


class _ValueOnly(nn.Module):
    """An attention's two matmuls (the fused q/k/v projection and the output projection) and nothing between
    them: each position's output is its own value."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.qkv, self.proj = attn.qkv, attn.proj

    def forward(self, x: torch.Tensor, cache=None, layer_idx: int = 0, attn_mask=None) -> torch.Tensor:
        B, T, C = x.shape
        return self.proj(self.qkv(x).view(B, T, 3, C)[:, :, 2])


def strip_ilts(model: HierarchicalTransformer, level: str) -> HierarchicalTransformer:
    """``model`` with its ILTs' work removed down to ``level``: "gelu" drops their GELUs, "matmuls" also their
    LayerNorms and the attention between the projections (their dropout is a config flag: ilt_dropout=0)."""
    for ilt in model.ilts:
        for layer in ilt.layers:
            layer.ff = _NoActivation(layer.ff)
            if level == "matmuls":
                layer.ln1, layer.ln2, layer.attn = nn.Identity(), nn.Identity(), _ValueOnly(layer.attn)
        if level == "matmuls":
            ilt.ln = nn.Identity()
    return model


def variants(base: dict) -> dict[str, HierarchicalTransformer]:
    """The ladder, each built from the same seed: plain, the default ILTs, then less and less besides matmuls."""

    def build(**overrides) -> HierarchicalTransformer:
        torch.manual_seed(0)
        return HierarchicalTransformer(ModelConfig(**{**base, **overrides})).train()

    return {
        "n_layers_ilt=0": build(n_layers_ilt=0),
        "ILTs (the defaults)": build(),
        "ILTs without dropout": build(ilt_dropout=0.0),
        "ILTs without dropout, GELU": strip_ilts(build(ilt_dropout=0.0), "gelu"),
        "ILTs' matmuls only": strip_ilts(build(ilt_dropout=0.0), "matmuls"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument(
        "--compile", action="store_true", help="torch.compile every layer and ILT, as train.py does"
    )
    args = p.parse_args()

    dtype = autocast_dtype(torch.device("cpu"), use_amp=True)
    loss = lambda m, x, y: LanguageModelLoss(m)(x, y, 0.1)  # noqa: E731  # what train.py's step calls
    models = variants({"vocab_size": VOCAB})
    if args.compile:
        for model in models.values():
            compile_layers(model)
    contestants = [Contestant(name, model, dtype, 0, loss) for name, model in models.items()]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (args.batch_size, args.seq_len + 1), generator=g)
    x, y = x[:, :-1], x[:, 1:]
    with freed_memory_kept():
        take_turns(contestants, x, y, args.warmup, args.steps, shuffle=random.Random(0))

    label = str(dtype).replace("torch.", "") if dtype else "fp32"
    n_ilts = len(models["ILTs (the defaults)"].ilts)
    plain = statistics.median(contestants[0].times)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {label}, batch {args.batch_size} x "
          f"{args.seq_len}, median of {args.steps} steps, freed memory kept{', compiled' if args.compile else ''}\n")  # fmt: skip
    print("| variant | step (s) | time vs n_layers_ilt=0 | ms per ILT (fwd + bwd) |")
    print("| --- | --- | --- | --- |")
    for c in contestants:
        t = statistics.median(c.times)
        print(f"| {c.name} | {t:.3f} | {t / plain:.3f}x | {(t - plain) / n_ilts * 1e3:.1f} |")


if __name__ == "__main__":
    main()
