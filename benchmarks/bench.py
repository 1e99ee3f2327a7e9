"""HILT against Hugging Face GPT-2 of the same shape, measured side by side in one process.

    .venv/bin/python benchmarks/bench.py                       # the tables of docs/performance.md (~8 min, 2 cores)
    .venv/bin/python benchmarks/bench.py --quality_steps 100   # also: does bf16 train as well as fp32? (~6 more)
    .venv/bin/python benchmarks/bench.py --assume_no_native_bf16   # the path of a CPU without native bf16
    .venv/bin/python benchmarks/bench.py --avx2_kernels        # ... with torch/oneDNN/MKL limited to AVX2 kernels

Everything runs on the CPU. The first line names it and whether its bf16 is native (AVX-512 BF16 or AMX). Where it
is (and torch may use it: hilt.device.cpu_has_native_bf16, what train.py asks), HILT trains in bf16 (as train.py
does there) and fp32, against HF in fp32 and bf16 autocast. Where it is not, bf16 is emulated, several times slower than fp32: every contestant then runs in fp32, fp32 HILT is compared
with fp32 HF, and the bf16 rows are left out (so the run stays within ~10 minutes on such CPUs).

Training contestants take turns step by step (so drifts in machine speed hit all of them alike); each figure is the
median over --steps timed steps after --warmup untimed ones. Training is measured twice, each time with one allocator
setting for all: glibc's defaults (how a plain script, HF's included, runs) and freed memory kept (how train.py runs
its steps, hilt.memory); HF gains far more from the second (its full fp32 logits are 412 MB a step). FLOPs come
from hilt.model.flops (PaLM's convention), and MFU divides achieved FLOP/s by the measured peak of a large matmul in the
same dtype on the same threads (the faster of torch's and oneDNN's).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import VOCAB, Contestant, cpu_kind, take_turns

from hilt.device import cpu_has_native_bf16
from hilt.generation.decoding import onednn_disabled
from hilt.generation.generate import generate
from hilt.memory import freed_memory_kept
from hilt.model import HierarchicalTransformer, ModelConfig
from hilt.model.flops import training_flops_per_token
from hilt.model.linear import onednn_linear
from hilt.training.loss import LanguageModelLoss

REPO = Path(__file__).resolve().parents[1]


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a large square matmul, the faster of torch's and oneDNN's: the practical ceiling for MFU. (In fp32
    torch's is MKL's, which runs AVX2 code on AMD CPUs; HILT's fp32 layers use oneDNN's, hilt.model.linear.OneDNNLinear.)"""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    products = [lambda: a @ b]
    if torch.backends.mkldnn.is_available():
        products.append(lambda: onednn_linear(a, b))
    best = 0.0
    for product in products:
        for _ in range(3):
            product()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            product()
            times.append(time.perf_counter() - t0)
        best = max(best, 2 * n**3 / statistics.median(times))
    return best


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


def training_specs(
    native: bool, ilt_kinds: tuple[str, ...] = ()
) -> list[tuple[str, dict, torch.dtype | None]]:
    """(name, model settings, autocast dtype) of each training contestant; model settings None = HF GPT-2. With
    native bf16: HILT in bf16 (what train.py uses there) and fp32, HF in fp32 and bf16. Without it bf16 is emulated
    (several times slower than fp32, and not what anyone would train with), so every contestant runs fp32 and
    fp32 HILT is compared with fp32 HF."""
    precisions = (torch.bfloat16, None) if native else (None,)
    specs = []
    for dtype in precisions:
        label = "bf16" if dtype else "fp32"
        specs.append((f"HILT ({label}, ILTs on)", {}, dtype))
        specs.append((f"HILT ({label}, n_layers_ilt=0)", {"n_layers_ilt": 0}, dtype))
    specs += [(f"HILT (fp32, ilt_kind {kind})", {"ilt_kind": kind}, None) for kind in ilt_kinds]
    specs += [("HF GPT-2 (fp32)", None, None)]
    specs += [("HF GPT-2 (bf16 autocast)", None, torch.bfloat16)] if native else []
    return specs


def bench_training(args, keep_freed_memory: bool, native: bool) -> list[dict]:
    """One table's rows, every contestant under the same allocator setting: glibc's defaults (how a plain training
    script runs) or freed memory kept (how train.py runs its steps, hilt.memory)."""
    hilt_loss = lambda m, x, y: LanguageModelLoss(m)(x, y, 0.1)  # noqa: E731  # what train.py's step calls
    hf_loss = lambda m, x, y: F.cross_entropy(  # noqa: E731  # as HF's own loss: fp32 logits
        m(input_ids=x, use_cache=False).logits.flatten(0, 1).float(), y.flatten()
    )
    # same matmul shapes as the plain HILT
    hf_flops = training_flops_per_token(ModelConfig(vocab_size=VOCAB, n_layers_ilt=0), args.seq_len)
    contestants = []
    for name, settings, dtype in training_specs(native, args.ilt_kind):
        torch.manual_seed(0)
        if settings is None:
            contestants.append(Contestant(name, hf_gpt2(), dtype, hf_flops, hf_loss))
        else:
            cfg = ModelConfig(vocab_size=VOCAB, **settings)
            flops = training_flops_per_token(cfg, args.seq_len)
            contestants.append(Contestant(name, HierarchicalTransformer(cfg), dtype, flops, hilt_loss))
    for c in contestants:
        c.model.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, VOCAB, (args.batch_size, args.seq_len + 1), generator=g)
    x, y = x[:, :-1], x[:, 1:]
    allocator = freed_memory_kept() if keep_freed_memory else contextlib.nullcontext()
    default_dtype = torch.bfloat16 if native else None  # what train.py trains with here
    with allocator:
        take_turns(contestants, x, y, args.warmup, args.steps)
        # Each contestant's speed depends on who ran before it (allocator and cache state): HF fp32 measured
        # 715-985 tokens/s depending on the company. So HF and the default-precision design HILTs are also timed
        # alone, and every ratio to HF is taken against the faster of its two figures. (Without native bf16 only
        # HF: the run must stay short on the slower machines that lack it.)
        alone = [
            c
            for c in contestants
            if c.name.startswith("HF")
            or (native and c.amp_dtype == default_dtype and "ilt_kind" not in c.name)
        ]
        for c in alone:
            solo = Contestant(f"{c.name}, alone", c.model, c.amp_dtype, c.flops_per_token, c.loss_fn)
            take_turns([solo], x, y, args.warmup, args.steps)
            contestants.append(solo)
    peaks = {None: matmul_peak(torch.float32)}
    if native:  # an emulated bf16 matmul has no peak worth dividing by
        peaks[torch.bfloat16] = matmul_peak(torch.bfloat16)
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


def bench_generation(args, native: bool) -> list[dict]:
    """Batch-1 greedy decoding with the cache; rows in the order printed. Without native bf16 only fp32."""
    # what `hilt generate` uses here by default
    compute_dtype = torch.bfloat16 if native else None
    label = "bf16" if native else "fp32"
    torch.manual_seed(0)
    hilt = HierarchicalTransformer(ModelConfig(vocab_size=VOCAB)).eval()
    plain = HierarchicalTransformer(ModelConfig(vocab_size=VOCAB, n_layers_ilt=0)).eval()
    hf = hf_gpt2().eval()
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

    contestants = {f"HILT generate (ILTs on, {label}: the default)": hilt_run(hilt, compute_dtype)}
    if native:
        contestants["HILT generate (ILTs on, fp32: --no_amp)"] = hilt_run(hilt, None)
    contestants[f"HILT generate (n_layers_ilt=0, {label})"] = hilt_run(plain, compute_dtype)
    contestants["HF GPT2LMHeadModel.generate (fp32)"] = hf_run(hf)
    if native:
        hf_bf16 = hf_gpt2().to(torch.bfloat16).eval()
        contestants["HF GPT2LMHeadModel.generate (bf16 weights)"] = hf_run(hf_bf16)
        # not a reference, for transparency: HF bf16 given HILT's single-row switch away from oneDNN
        contestants["HF GPT2LMHeadModel.generate (bf16 weights, oneDNN off)"] = hf_run(hf_bf16, onednn=False)
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


def peak_rss_of_default_training(native: bool = True) -> float:
    """Peak RSS (GB) of train.py at its defaults (batch 32 x 128, d_model 256, 6 layers, ILTs on) for 5 steps."""
    with tempfile.TemporaryDirectory() as out:
        # without native bf16, fp32 as train.py picks there (its own check reads the hardware, not our flags)
        cmd = train_py(out, "--epoch_tokens", str(5 * 32 * 128), *([] if native else ["--no_amp"]))
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
    bf16_hf = [r["tok_s"] for r in rows if r["name"].startswith("HF GPT-2 (bf16 autocast)")]
    hf16 = max(bf16_hf) if bf16_hf else None
    peak_text = ", ".join(
        f"{'bf16' if dtype else 'fp32'} {peak / 1e9:.0f} GFLOP/s" for dtype, peak in peaks.items()
    )
    print(f"\nmatmul peak: {peak_text}")
    vs16 = " vs HF bf16 (faster figure) |" if hf16 else ""
    print(f"\n| training (fwd+bwd+AdamW) | step (s) | tokens/s | vs HF fp32 (faster figure) |{vs16} MFU |")
    print("| --- | --- | --- | --- |" + (" --- |" if hf16 else "") + " --- |")
    for r in rows:
        ratio16 = f" {r['tok_s'] / hf16:.2f}x |" if hf16 else ""
        print(
            f"| {r['name']} | {r['step_s']:.3f} | {r['tok_s']:,.0f} | {r['tok_s'] / hf32:.2f}x |{ratio16} "
            f"{r['mfu']:.0%} |"
        )
    for kind in ("ILTs on", "n_layers_ilt=0", "ilt_kind"):
        for r in rows:
            if r["name"].startswith("HILT (fp32") and kind in r["name"] and not r["name"].endswith("alone"):
                print(
                    f"{r['name']} against HF GPT-2 (fp32), same allocator setting: {r['tok_s'] / hf32:.2f}x "
                    "(target >= 1.2x)"
                )
    for suffix in ("", ", alone"):
        ilt = [r for r in rows if "ILTs on" in r["name"] and r["name"].endswith(suffix)]
        plain = [r for r in rows if "n_layers_ilt=0" in r["name"] and r["name"].endswith(suffix)]
        if ilt and plain:
            print(
                f"ILT cost{suffix or ' (taking turns)'}: HILT with ILTs takes "
                f"{plain[0]['tok_s'] / ilt[0]['tok_s']:.2f}x the time of n_layers_ilt=0"
            )


# ISA limits that make torch, oneDNN and MKL run the kernels an AVX2 CPU would (read once, at import)
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


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
    p.add_argument(
        "--assume_no_native_bf16",
        action="store_true",
        help="take the path of a CPU without native bf16 (fp32 only) even where bf16 is native",
    )
    p.add_argument(
        "--avx2_kernels",
        action="store_true",
        help="also limit torch, oneDNN and MKL to AVX2 kernels, as on an AVX2 CPU (implies "
        "--assume_no_native_bf16; restarts the process with ATEN_CPU_CAPABILITY etc. set)",
    )
    p.add_argument(
        "--ilt_kind",
        type=lambda v: tuple(k for k in v.split(",") if k),
        default=(),
        help="comma-separated ILT kinds to train in fp32 as well, beside the design ILT (default: none)",
    )
    args = p.parse_args()
    if args.avx2_kernels and any(os.environ.get(k) != v for k, v in AVX2_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **AVX2_ENV})
    # what train.py asks (hilt.device): bf16 autocast only where bf16 is native and torch may use it
    native = not (args.assume_no_native_bf16 or args.avx2_kernels) and cpu_has_native_bf16()

    print(cpu_kind(assume_no_native_bf16=args.assume_no_native_bf16 or args.avx2_kernels))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size} x {args.seq_len}; "
        + ("bf16 native: bf16 and fp32 contestants" if native else "no native bf16: every contestant in fp32")
    )
    for keep, title in (
        (
            False,
            "glibc's default allocator: how a plain training script runs (HF's figures as users see them)",
        ),
        (True, "freed memory kept (hilt.memory): how train.py runs its steps; the same setting for HF"),
    ):
        print(f"\n### Training, {title}")
        print_training(*bench_training(args, keep, native))

    gen = bench_generation(args, native)
    hf_gen32 = next(r for r in gen if r["name"].endswith("(fp32)"))["tok_s"]
    hf_gen16 = next((r["tok_s"] for r in gen if r["name"].endswith("(bf16 weights)")), None)
    vs16 = " vs HF bf16 |" if hf_gen16 else ""
    print(f"\n| generation, batch 1, 8-token prompt, {args.new_tokens} new tokens, greedy, cache | tokens/s | vs HF fp32 "
          f"|{vs16}")  # fmt: skip
    print("| --- | --- | --- |" + (" --- |" if hf_gen16 else ""))
    for r in gen:
        ratio16 = f" {r['tok_s'] / hf_gen16:.2f}x |" if hf_gen16 else ""
        print(f"| {r['name']} | {r['tok_s']:,.1f} | {r['tok_s'] / hf_gen32:.2f}x |{ratio16}")
    print(f"\nGeneration: HILT {gen[0]['tok_s'] / hf_gen32:.2f}x the tokens/s of HF generate (fp32)")

    print(
        f"\nPeak RSS of a default train.py run (batch 32 x 128, 5 steps): {peak_rss_of_default_training(native):.2f} GB"
    )
    if args.quality_steps and not native:
        print(
            "\nbf16 against fp32 quality: skipped, bf16 is emulated on this CPU (train.py trains in fp32 here)"
        )
    elif args.quality_steps:
        q = quality(args)
        print(
            f"\nVal loss after {args.quality_steps} steps on data.txt: bf16 {q['bf16']:.5f}, fp32 {q['fp32']:.5f} "
            f"({(q['bf16'] - q['fp32']) / q['fp32']:+.3%})"
        )


if __name__ == "__main__":
    main()
