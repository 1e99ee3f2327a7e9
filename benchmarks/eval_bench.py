"""Evaluation against training on one model and batch, side by side in one process: `hilt eval`'s scoring
(``evaluate_tokens``), training's validation (``Trainer.evaluate``), training steps (``Trainer.train_step``, inside
``hilt.memory.freed_memory_kept`` as ``Trainer.fit`` runs them) and, for comparison, what the two evaluations did
before they shared ``hilt.training.loss.HeadLoss``: training's validation through the chunked training loss's no-grad
branch (fresh buffers per batch), `hilt eval` through the model's full (B, T, V) logits and an fp32 cross-entropy.

    .venv/bin/python benchmarks/eval_bench.py                                  # the 128-wide demo model, fp32
    .venv/bin/python benchmarks/eval_bench.py --d_model 64 --n_layers 2        # a 64-wide 2-layer model
    .venv/bin/python benchmarks/eval_bench.py --amp                            # bf16 autocast where native

The phases take turns for --rounds rounds (so drifts in machine speed hit all of them alike); each round times
--batches batches of each. Per phase: the median tokens/s over the rounds, the kernel (sys) CPU time of the
whole process as a share of the phase's wall time and its minor page faults per batch (getrusage, all threads: a
fresh vocabulary-sized buffer shows up in both). Weights are random: the speed does not depend on them.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from common import VOCAB, cpu_kind

from hilt import memory
from hilt.data.batches import TokenBatches
from hilt.device import autocast_dtype
from hilt.evaluation.evaluate import evaluate_tokens
from hilt.model import HierarchicalTransformer, ModelConfig
from hilt.training.loss import CHUNK_ELEMENTS
from hilt.training.run import TrainConfig, Trainer


class Meter:
    """Wall and kernel CPU seconds and minor page faults of the timed blocks of one phase."""

    def __init__(self):
        self.rates: list[float] = []
        self.wall = self.sys = 0.0
        self.faults = 0

    @contextlib.contextmanager
    def time(self, tokens: int):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        yield
        wall = time.perf_counter() - t0
        self.wall += wall
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        self.sys += r1.ru_stime - r0.ru_stime
        self.faults += r1.ru_minflt - r0.ru_minflt
        self.rates.append(tokens / wall)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d_model", type=int, default=128)
    p.add_argument("--n_layers", type=int, default=4)
    p.add_argument("--n_heads", type=int, default=4)
    p.add_argument("--ilt_dim", type=int, default=64)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--batches", type=int, default=8, help="batches per phase and round (default 8)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of turns (default 3; one more warms up)")
    p.add_argument("--amp", action="store_true", help="autocast as train/eval do by default (bf16 if native)")
    args = p.parse_args()

    device = torch.device("cpu")
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=VOCAB,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        ilt_dim=args.ilt_dim,
        max_seq_len=max(args.seq_len, 64),
    )
    model = HierarchicalTransformer(config)
    n = args.batches * args.batch_size * args.seq_len + 1  # exactly `batches` batches of windows
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=n).astype(np.uint16)
    cfg = TrainConfig(
        text_file="-", batch_size=args.batch_size, seq_len=args.seq_len, amp=args.amp, out_dir="/nonexistent"
    )
    train_data = TokenBatches(tokens, args.seq_len, args.batch_size, seed=0)
    val_data = TokenBatches(tokens, args.seq_len, args.batch_size, shuffle=False)
    trainer = Trainer(model, cfg, train_data, val_data, device=device, is_main=False)
    amp_dtype = autocast_dtype(device, args.amp)
    batch_tokens = args.batch_size * args.seq_len
    phase_tokens = args.batches * batch_tokens

    def train() -> None:
        order = train_data.window_order(0)
        with memory.freed_memory_kept():
            for i in range(args.batches):
                trainer.batch_in_epoch = i % len(train_data)
                trainer.train_step(order)

    def hilt_eval() -> None:
        r = evaluate_tokens(
            model, tokens, seq_len=args.seq_len, batch_size=args.batch_size, amp_dtype=amp_dtype
        )
        assert r.tokens == phase_tokens, (r.tokens, phase_tokens)

    @torch.no_grad()
    def full_logits() -> None:
        # what hilt eval did before HeadLoss: the model's (B, T, V) logits, then an fp32 cross-entropy per token
        model.eval()
        for x, y in val_data.eval_batches():
            with torch.autocast("cpu", dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
                logits = model(x)  # (B, T, V)
            F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none").double().sum()
        model.train()

    @torch.no_grad()
    def old_validation() -> None:
        # what Trainer.evaluate did before it shared HeadLoss (hilt.training.loss at d41804c^): per batch a fresh logits
        # buffer of 512 rows or fewer, and per chunk torch.logsumexp's chunk-sized temporary
        model.eval()
        for x, y in val_data.eval_batches():
            with torch.autocast("cpu", dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
                hidden = model.features(x).flatten(0, 1)  # (N, C)
            dtype = amp_dtype or hidden.dtype
            h, w, targets = hidden.to(dtype), model.head.weight.to(dtype), y.flatten()
            n_chunks = -(-h.size(0) * w.size(0) // CHUNK_ELEMENTS)  # ceil
            chunk = -(-h.size(0) // n_chunks)
            buffer = h.new_empty(min(chunk, h.size(0)), w.size(0))
            for start in range(0, h.size(0), chunk):
                t_c = targets[start : start + chunk]
                logits = torch.mm(h[start : start + chunk], w.T, out=buffer[: len(t_c)])
                target_logits = logits.gather(1, t_c[:, None]).squeeze(1).float()
                (torch.logsumexp(logits.float(), dim=-1) - target_logits).sum().double()
        model.train()

    phases = {
        "training step (fwd+bwd+AdamW)": train,
        "hilt eval (evaluate_tokens)": hilt_eval,
        "training's validation (Trainer.evaluate)": trainer.evaluate,
        "training's validation before HeadLoss": old_validation,
        "full logits + cross_entropy (hilt eval before HeadLoss)": full_logits,
    }
    meters = {name: Meter() for name in phases}
    for r in range(args.rounds + 1):
        for name, run in phases.items():
            if r == 0:
                run()  # warm-up round: first-touch allocations, oneDNN primitive caches
                continue
            with meters[name].time(phase_tokens):
                run()

    precision = str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32"
    print(
        f"{cpu_kind()}; torch {torch.__version__}, {torch.get_num_threads()} threads; model d_model "
        f"{args.d_model}, {args.n_layers} layers, ILTs {'on' if model.ilts else 'off'}; batch {args.batch_size} "
        f"x {args.seq_len}; {precision}; {args.rounds} rounds of {args.batches} batches per phase\n"
    )
    print("| phase | tokens/s (median) | vs training | sys time / wall | minor faults / batch |")
    print("| --- | --- | --- | --- | --- |")
    train_rate = statistics.median(meters["training step (fwd+bwd+AdamW)"].rates)
    for name, m in meters.items():
        rate = statistics.median(m.rates)
        faults = m.faults / (args.rounds * args.batches)
        print(f"| {name} | {rate:,.0f} | {rate / train_rate:.2f}x | {m.sys / m.wall:.0%} | {faults:,.0f} |")


if __name__ == "__main__":
    main()
