"""HILT against Hugging Face GPT-2 of the same shape, measured side by side in one process.

    .venv/bin/python benchmarks/bench.py                       # the README tables (~8 min on 2 CPU cores)
    .venv/bin/python benchmarks/bench.py --quality_steps 100   # also: does bf16 train as well as fp32? (~6 more)

Training contestants take turns step by step (so drifts in machine speed hit all of them alike); each figure is the
median over --steps timed steps after --warmup untimed ones. Training is measured twice, each time with one allocator
setting for all: glibc's defaults (how a plain script, HF's included, runs) and freed memory kept (how train.py runs
its steps, hilt.memory); HF gains far more from the second (its full fp32 logits are 412 MB a step). FLOPs come
from hilt.flops (PaLM's convention), and MFU divides achieved FLOP/s by the measured peak of a large matmul in the
same dtype on the same threads.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hilt.device import autocast_dtype
from hilt.flops import training_flops_per_token
from hilt.generate import generate, onednn_disabled
from hilt.loss import LanguageModelLoss
from hilt.memory import freed_memory_kept
from hilt.model import HierarchicalTransformer, ModelConfig
from hilt.train import TrainConfig, build_optimizer

REPO = Path(__file__).resolve().parents[1]
VOCAB = 50260


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a large square matmul: the practical ceiling for MFU."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


class Contestant:
    """One model + optimizer + precision; ``step()`` is one forward + backward + optimizer step."""

    def __init__(self, name, model, amp_dtype, flops_per_token, loss_fn):
        self.name, self.model, self.amp_dtype = name, model, amp_dtype
        self.flops_per_token = flops_per_token
        self.loss_fn = loss_fn
        self.optimizer = build_optimizer(model, TrainConfig(text_file="-"))
        self.times: list[float] = []

    def step(self, x, y) -> None:
        t0 = time.perf_counter()
        ctx = torch.autocast("cpu", dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        with ctx:
            loss = self.loss_fn(self.model, x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.times.append(time.perf_counter() - t0)


def take_turns(
    contestants: list[Contestant], x, y, warmup: int, steps: int, shuffle: random.Random | None = None
) -> None:
    """warmup + steps rounds of one step per contestant, in turn (in a new order every round when ``shuffle`` is
    given); only the last ``steps`` are timed."""
    for i in range(warmup + steps):
        for c in shuffle.sample(contestants, len(contestants)) if shuffle else contestants:
            c.step(x, y)
            if i < warmup:
                c.times.clear()
        print(f"  training round {i + 1}/{warmup + steps}", file=sys.stderr, end="\r")


def hf_gpt2(d_model=256, n_layers=6, n_heads=8):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_positions=1024,
        n_embd=d_model,
        n_layer=n_layers,
        n_head=n_heads,
        tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(cfg)


def bench_training(args, keep_freed_memory: bool) -> list[dict]:
    """One table's rows, every contestant under the same allocator setting: glibc's defaults (how a plain training
    script runs) or freed memory kept (how train.py runs its steps, hilt.memory)."""
    hilt_dtype = autocast_dtype(torch.device("cpu"), use_amp=True)  # what train.py uses here by default
    torch.manual_seed(0)
    hilt_cfg = ModelConfig(vocab_size=VOCAB)
    plain_cfg = ModelConfig(vocab_size=VOCAB, n_layers_ilt=0)
    hilt_loss = lambda m, x, y: LanguageModelLoss(m)(x, y, 0.1)  # noqa: E731  # what train.py's step calls
    hf_loss = lambda m, x, y: F.cross_entropy(  # noqa: E731  # as HF's own loss: fp32 logits
        m(input_ids=x, use_cache=False).logits.flatten(0, 1).float(), y.flatten()
    )
    hf_flops = training_flops_per_token(plain_cfg, args.seq_len)  # same matmul shapes as the plain HILT
    label = str(hilt_dtype).replace("torch.", "") if hilt_dtype else "fp32"
    contestants = [
        Contestant(
            f"HILT ({label}, ILTs on)",
            HierarchicalTransformer(hilt_cfg),
            hilt_dtype,
            training_flops_per_token(hilt_cfg, args.seq_len),
            hilt_loss,
        ),
        Contestant(
            f"HILT ({label}, n_layers_ilt=0)",
            HierarchicalTransformer(plain_cfg),
            hilt_dtype,
            training_flops_per_token(plain_cfg, args.seq_len),
            hilt_loss,
        ),
        Contestant("HF GPT-2 (fp32)", hf_gpt2(), None, hf_flops, hf_loss),
        Contestant("HF GPT-2 (bf16 autocast)", hf_gpt2(), torch.bfloat16, hf_flops, hf_loss),
    ]
    if hilt_dtype is not None:
        contestants.insert(
            1,
            Contestant(
                "HILT (fp32, ILTs on)",
                HierarchicalTransformer(hilt_cfg),
                None,
                training_flops_per_token(hilt_cfg, args.seq_len),
                hilt_loss,
            ),
        )
    for c in contestants:
        c.model.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (args.batch_size, args.seq_len + 1), generator=g)
    x, y = x[:, :-1], x[:, 1:]
    allocator = freed_memory_kept() if keep_freed_memory else contextlib.nullcontext()
    with allocator:
        take_turns(contestants, x, y, args.warmup, args.steps)
        # Each contestant's speed depends on who ran before it (allocator and cache state): HF fp32 measured
        # 715-985 tokens/s depending on the company. So the default-precision models are also timed alone, and
        # every ratio to HF is taken against the faster of its two figures.
        for c in [c for c in contestants if c.name.startswith("HF") or c.amp_dtype == hilt_dtype]:
            alone = Contestant(f"{c.name}, alone", c.model, c.amp_dtype, c.flops_per_token, c.loss_fn)
            take_turns([alone], x, y, args.warmup, args.steps)
            contestants.append(alone)
    peaks = {None: matmul_peak(torch.float32), torch.bfloat16: matmul_peak(torch.bfloat16)}
    tokens = args.batch_size * args.seq_len
    rows = []
    for c in contestants:
        t = statistics.median(c.times)
        rows.append(
            {
                "name": c.name,
                "step_s": t,
                "tok_s": tokens / t,
                "mfu": c.flops_per_token * tokens / t / peaks[c.amp_dtype],
                "dtype": c.amp_dtype,
            }
        )
    return rows, peaks


def bench_generation(args) -> list[dict]:
    """Batch-1 greedy decoding with the cache; rows in the order printed."""
    # what `hilt generate` uses here by default
    compute_dtype = autocast_dtype(torch.device("cpu"), use_amp=True)
    label = str(compute_dtype).replace("torch.", "") if compute_dtype else "fp32"
    torch.manual_seed(0)
    hilt = HierarchicalTransformer(ModelConfig(vocab_size=VOCAB)).eval()
    plain = HierarchicalTransformer(ModelConfig(vocab_size=VOCAB, n_layers_ilt=0)).eval()
    hf = hf_gpt2().eval()
    hf_bf16 = hf_gpt2().to(torch.bfloat16).eval()
    prompt = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(1))
    n = args.new_tokens

    def hilt_run(model, dtype):
        return lambda: generate(model, prompt, n, temperature=0, use_cache=True, compute_dtype=dtype)

    def hf_run(model, onednn=True):
        def run():
            with contextlib.nullcontext() if onednn else onednn_disabled():
                model.generate(
                    prompt,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    use_cache=True,
                    eos_token_id=None,
                    pad_token_id=0,
                    attention_mask=torch.ones_like(prompt),
                )

        return run

    contestants = {
        f"HILT generate (ILTs on, {label}: the default)": hilt_run(hilt, compute_dtype),
        "HILT generate (ILTs on, fp32: --no_amp)": hilt_run(hilt, None),
        f"HILT generate (n_layers_ilt=0, {label})": hilt_run(plain, compute_dtype),
        "HF GPT2LMHeadModel.generate (fp32)": hf_run(hf),
        "HF GPT2LMHeadModel.generate (bf16 weights)": hf_run(hf_bf16),
        # not a reference, for transparency: HF bf16 given HILT's single-row switch away from oneDNN
        "HF GPT2LMHeadModel.generate (bf16 weights, oneDNN off)": hf_run(hf_bf16, onednn=False),
    }
    times = {k: [] for k in contestants}
    with torch.inference_mode():
        for i in range(args.gen_rounds + 1):
            for name, fn in contestants.items():
                t0 = time.perf_counter()
                fn()
                if i:  # round 0 warms up
                    times[name].append(time.perf_counter() - t0)
    return [{"name": k, "tok_s": n / statistics.median(v)} for k, v in times.items()]


def train_py(out_dir: str, *flags: str) -> list[str]:
    """The command line of a one-epoch train.py run on data.txt, writing into out_dir."""
    return [sys.executable, str(REPO / "train.py"), "--text_file", str(REPO / "data.txt"), "--epochs", "1",
            "--out_dir", out_dir, *flags]  # fmt: skip


# Runs a command and prints its peak RSS in KB. A child's ru_maxrss starts from the high-water mark of the process
# that spawned it (Linux carries it over exec), so this tiny launcher stands between the benchmark's large process
# and the measured run.
_RSS_LAUNCHER = (
    "import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, "
    "stderr=subprocess.DEVNULL); _, status, usage = os.wait4(p.pid, 0); print(usage.ru_maxrss); "
    "sys.exit(os.waitstatus_to_exitcode(status))"
)


def peak_rss_of_default_training() -> float:
    """Peak RSS (GB) of train.py at its defaults (batch 32 x 128, d_model 256, 6 layers, ILTs on) for 5 steps."""
    with tempfile.TemporaryDirectory() as out:
        cmd = train_py(out, "--epoch_tokens", str(5 * 32 * 128))
        proc = subprocess.run([sys.executable, "-c", _RSS_LAUNCHER, *cmd], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed with status {proc.returncode}")
    return int(proc.stdout) / 1024**2


def quality(args) -> dict:
    """Validation loss after the same steps on data.txt in bf16 autocast and in fp32 (train.py, default model)."""
    losses = {}
    for flag in ([], ["--no_amp"]):
        with tempfile.TemporaryDirectory() as out:
            budget = str(args.quality_steps * 16 * 128)
            cmd = train_py(out, "--max_tokens", "0", "--batch_size", "16", "--epoch_tokens", budget, *flag)
            subprocess.run(cmd, check=True, capture_output=True)
            losses["fp32" if flag else "bf16"] = torch.load(Path(out) / "last_model.pt", weights_only=True)[
                "val_loss"
            ]
    return losses


def print_training(rows: list[dict], peaks: dict) -> None:
    hf32 = max(r["tok_s"] for r in rows if r["name"].startswith("HF GPT-2 (fp32)"))
    hf16 = max(r["tok_s"] for r in rows if r["name"].startswith("HF GPT-2 (bf16 autocast)"))
    print(
        f"\nmatmul peak: fp32 {peaks[None] / 1e9:.0f} GFLOP/s, bf16 {peaks[torch.bfloat16] / 1e9:.0f} GFLOP/s"
    )
    print(
        "\n| training (fwd+bwd+AdamW) | step (s) | tokens/s | vs HF fp32 (faster figure) | vs HF bf16 (faster figure) | MFU |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['name']} | {r['step_s']:.3f} | {r['tok_s']:,.0f} | {r['tok_s'] / hf32:.2f}x | "
            f"{r['tok_s'] / hf16:.2f}x | {r['mfu']:.0%} |"
        )
    for suffix in ("", ", alone"):
        ilt = next(r for r in rows if "ILTs on" in r["name"] and r["name"].endswith(suffix))
        plain = next(r for r in rows if "n_layers_ilt=0" in r["name"] and r["name"].endswith(suffix))
        print(
            f"ILT cost{suffix or ' (taking turns)'}: HILT with ILTs takes {plain['tok_s'] / ilt['tok_s']:.2f}x "
            "the time of n_layers_ilt=0"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--new_tokens", type=int, default=200)
    p.add_argument("--gen_rounds", type=int, default=5)
    p.add_argument(
        "--quality_steps", type=int, default=0, help="also compare bf16 and fp32 val loss (0 = skip)"
    )
    args = p.parse_args()

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size} x {args.seq_len}"
    )
    for keep, title in (
        (
            False,
            "glibc's default allocator: how a plain training script runs (HF's figures as users see them)",
        ),
        (True, "freed memory kept (hilt.memory): how train.py runs its steps; the same setting for HF"),
    ):
        print(f"\n### Training, {title}")
        print_training(*bench_training(args, keep))

    gen = bench_generation(args)
    hf_gen32 = next(r for r in gen if r["name"].endswith("(fp32)"))["tok_s"]
    hf_gen16 = next(r for r in gen if r["name"].endswith("(bf16 weights)"))["tok_s"]
    print(f"\n| generation, batch 1, 8-token prompt, {args.new_tokens} new tokens, greedy, cache | tokens/s | vs HF fp32 "
          "| vs HF bf16 |")  # fmt: skip
    print("| --- | --- | --- | --- |")
    for r in gen:
        print(
            f"| {r['name']} | {r['tok_s']:,.1f} | {r['tok_s'] / hf_gen32:.2f}x | {r['tok_s'] / hf_gen16:.2f}x |"
        )
    print(f"\nGeneration: HILT {gen[0]['tok_s'] / hf_gen32:.2f}x the tokens/s of HF generate (fp32)")

    print(
        f"\nPeak RSS of a default train.py run (batch 32 x 128, 5 steps): {peak_rss_of_default_training():.2f} GB"
    )
    if args.quality_steps:
        q = quality(args)
        print(
            f"\nVal loss after {args.quality_steps} steps on data.txt: bf16 {q['bf16']:.5f}, fp32 {q['fp32']:.5f} "
            f"({(q['bf16'] - q['fp32']) / q['fp32']:+.3%})"
        )


if __name__ == "__main__":
    main()
