"""bf16 linear layers three ways, taking turns: torch's matmul through oneDNN (the plain weight re-laid out at
every call), torch's own GEMV without oneDNN (what single-row decoding steps used), and oneDNN with the weight
packed once (hilt.kernels.MixedDtypeLinear.pack).

    .venv/bin/python benchmarks/packed_linear_bench.py --threads 1

The default model's shapes: its main layers' matrices, an ILT's, and the LM head at GPT-2's vocabulary. Prints
median microseconds per call and whether the packed result has the same bits as oneDNN's plain one.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hilt.kernels import onednn_linear, onednn_packed  # noqa: E402

SHAPES = [(256, 768), (256, 1024), (1024, 256), (128, 512), (256, 50260)]  # (in, out)


def timed(fn, repeats: int, onednn: bool = True) -> float:
    torch.backends.mkldnn.enabled = onednn
    try:
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - t0) / repeats
    finally:
        torch.backends.mkldnn.enabled = True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds per shape and row count (default 7)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median us per call")
    print("| in x out | rows | oneDNN | no oneDNN | packed | packed = oneDNN bits |")
    print("| --- | --- | --- | --- | --- | --- |")
    torch.manual_seed(0)
    with torch.inference_mode():
        for n_in, n_out in SHAPES:
            weight = torch.randn(n_out, n_in).bfloat16()
            bias = None if n_out > 4096 else torch.randn(n_out).bfloat16()
            packed = onednn_packed(weight)
            if packed is None:
                sys.exit("no packed oneDNN path on this machine (torch without oneDNN, or no bf16 support)")
            repeats = 3 if n_out > 4096 else 30
            for rows in (1, 4, 16, 64):
                x = torch.randn(rows, n_in).bfloat16()
                plain = functools.partial(F.linear, x, weight, bias)
                fast = functools.partial(onednn_linear, x, packed, bias)
                times = {"onednn": [], "none": [], "packed": []}
                for _ in range(args.rounds):
                    times["onednn"].append(timed(plain, repeats))
                    times["none"].append(timed(plain, repeats, onednn=False))
                    times["packed"].append(timed(fast, repeats))
                us = {k: f"{statistics.median(v) * 1e6:.0f}" for k, v in times.items()}
                same = torch.equal(fast(), plain())
                print(
                    f"| {n_in} x {n_out} | {rows} | {us['onednn']} | {us['none']} | {us['packed']} | {same} |"
                )


if __name__ == "__main__":
    main()
