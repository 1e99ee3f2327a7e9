"""The engine's batched decoding attention: torch's SDPA against hilt.kernels.decode_attention, taking turns.

    .venv/bin/python benchmarks/decode_attention_bench.py --threads 1

One query per row over a cache (views of a 1024-position buffer, as the engine's SlotCache gives them), each row
seeing its own number of keys through a (B, 1, 1, S) mask; the default model's heads (H 8, D 32). Prints the
median milliseconds of each path and its largest difference from fp64 SDPA on the same inputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hilt.kernels import decode_attention  # noqa: E402


def inputs(B: int, S: int, dtype: torch.dtype, H: int = 8, D: int = 32, max_len: int = 1024):
    k, v = (torch.randn(B, H, max_len, D).to(dtype)[:, :, :S] for _ in range(2))
    q = torch.randn(B, H, 1, D).to(dtype)
    seen = torch.randint(S // 3, S + 1, (B,))
    seen[0] = S
    return q, k, v, (torch.arange(S) < seen[:, None])[:, None, None, :]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls of each path per shape (default 20)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = {"SDPA": F.scaled_dot_product_attention, "decode_attention": decode_attention}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median ms (max |error| vs fp64)")
    print("| dtype | rows x keys | SDPA | decode_attention |")
    print("| --- | --- | --- | --- |")
    torch.manual_seed(0)
    with torch.inference_mode():
        for dtype in (torch.bfloat16, torch.float32):
            for B, S in ((4, 300), (16, 400), (64, 300)):
                q, k, v, mask = inputs(B, S, dtype)
                exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), mask)
                times = {name: [] for name in paths}
                for i in range(args.repeats + 1):
                    for name, fn in paths.items():  # taking turns: a load change hits both
                        t0 = time.perf_counter()
                        fn(q, k, v, mask)
                        if i:
                            times[name].append(time.perf_counter() - t0)
                cells = [
                    f"{statistics.median(times[n]) * 1e3:.2f} ({(fn(q, k, v, mask).double() - exact).abs().max():.0e})"
                    for n, fn in paths.items()
                ]
                print(f"| {str(dtype).removeprefix('torch.')} | {B} x {S} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
