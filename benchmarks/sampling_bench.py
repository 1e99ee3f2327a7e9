"""Sampling one token from GPT-2's 50,260 ids: hilt's sampler against the usual torch way, taking turns.

    .venv/bin/python benchmarks/sampling_bench.py --threads 1

"torch way" is what hilt.generate did before: torch.multinomial for the draw and a full descending sort for
top-p. Rows are sampled one at a time with their own torch.Generator, as the engine samples every row of a
decoding step. Prints the median microseconds per row of each, for each setting, and the speed-up.

With --engine it then runs whole requests through hilt.engine with each sampler in turn (the default
architecture, untrained, bf16 matmuls, 1 or 16 requests of 100 prompt tokens and 64 new ones at once) and prints
the process CPU time per generated token, prefill included: what sampling costs a server. An untrained model's
distribution is flat, so its top-p nucleus spans thousands of tokens.

It also times greedy decoding's choice for 1, 16 and 64 rows at once: torch's argmax against
hilt.kernels.greedy_tokens.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import hilt.engine  # noqa: E402
from hilt.generate import sample_next_token, top_k_filter  # noqa: E402
from hilt.kernels import greedy_tokens  # noqa: E402
from hilt.model import HierarchicalTransformer, ModelConfig  # noqa: E402

SETTINGS = {
    "temperature 1": {},
    "top_k 40": {"top_k": 40},
    "top_p 0.9": {"top_p": 0.9},
    "top_k 40, top_p 0.9": {"top_k": 40, "top_p": 0.9},
}


def full_sort_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= p
    drop[..., 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def torch_way(logits, *, temperature=1.0, top_k=None, top_p=None, generator=None):
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = full_sort_top_p(logits, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def engine_runs(rounds: int) -> None:
    model = HierarchicalTransformer(ModelConfig(vocab_size=50260)).eval()
    samplers = {"torch way": torch_way, "hilt": sample_next_token}
    print("\n| requests at once | setting | torch way: CPU ms per token | sample_next_token | speed-up |")
    print("| --- | --- | --- | --- | --- |")
    for rows, kwargs in itertools.product(
        (1, 16), ({"temperature": 1.0}, {"temperature": 0.8, "top_p": 0.95})
    ):
        params = [
            hilt.engine.SamplingParams(max_new_tokens=64, ignore_eos=True, seed=i, **kwargs)
            for i in range(rows)
        ]
        work = [(torch.randint(50260, (100,)).tolist(), p) for p in params]
        times = {s: [] for s in samplers}
        for i in range(rounds + 1):
            for name, sampler in samplers.items():  # taking turns
                hilt.engine.sample_next_token = sampler
                t0 = time.process_time()  # every thread's CPU time: the engine decodes on its own thread
                with hilt.engine.Engine(model, max_slots=rows, compute_dtype=torch.bfloat16) as engine:
                    engine.generate(work)
                if i:  # the first round builds the decoding copy
                    times[name].append((time.process_time() - t0) / (64 * rows))
        old, new = (statistics.median(times[s]) * 1e3 for s in samplers)
        setting = ", ".join(f"{k} {v}" for k, v in kwargs.items())
        print(f"| {rows} | {setting} | {old:.2f} | {new:.2f} | {old / new:.2f}x |")
    hilt.engine.sample_next_token = sample_next_token


def greedy_rows(repeats: int) -> None:
    """Greedy decoding's choice for a whole decoding step at once: torch's argmax against hilt's chunked one."""
    print("\n| rows | logits.argmax: us | hilt.kernels.greedy_tokens | speed-up |")
    print("| --- | --- | --- | --- |")
    for rows in (1, 16, 64):
        logits = torch.randn(rows, 50260)
        times = {"argmax": [], "greedy_tokens": []}
        for i in range(repeats + 3):
            for name, fn in (("argmax", lambda x: x.argmax(dim=-1)), ("greedy_tokens", greedy_tokens)):
                t0 = time.thread_time()
                fn(logits)
                if i >= 3:
                    times[name].append(time.thread_time() - t0)
        old, new = (statistics.median(t) * 1e6 for t in times.values())
        print(f"| {rows} | {old:.0f} | {new:.0f} | {old / new:.1f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--repeats", type=int, default=50, help="timed rows of each sampler per setting (default 50)"
    )
    p.add_argument("--engine", action="store_true", help="also time whole requests through the engine")
    p.add_argument("--rounds", type=int, default=3, help="engine rounds per sampler (default 3)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    V = 50260
    rank = torch.randperm(V).double() + 1
    rows = {
        # a confident model: Zipf's law, p ~ rank^-1.5 (the top 64 tokens hold 91%, so top-p 0.9 ranks 64 only)
        "peaked": (-1.5 * rank.log()).float()[None],
        # an unsure one: the nucleus at 0.9 spans thousands of tokens, so top-p must rank them all
        "flat": torch.randn(1, V) * 2.5,
    }
    samplers = {"torch way": torch_way, "hilt": sample_next_token}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; median us per row, {args.repeats} rows"
    )
    print(
        "| logits | setting | torch.multinomial (+ full sort for top-p) | hilt.generate.sample_next_token | speed-up |"
    )
    print("| --- | --- | --- | --- | --- |")
    for (row, logits), (name, kwargs) in itertools.product(rows.items(), SETTINGS.items()):
        if row == "flat" and "top_p" not in kwargs:
            continue  # only top-p depends on the shape of the distribution
        times = {s: [] for s in samplers}
        generators = {s: torch.Generator().manual_seed(1) for s in samplers}
        for i in range(args.repeats + 3):
            for s, fn in samplers.items():  # taking turns: a change of load hits both
                t0 = time.thread_time()
                fn(logits, generator=generators[s], **kwargs)
                if i >= 3:
                    times[s].append(time.thread_time() - t0)
        old, new = (statistics.median(times[s]) * 1e6 for s in samplers)
        print(f"| {row} | {name} | {old:.0f} | {new:.0f} | {old / new:.1f}x |")
    greedy_rows(args.repeats)
    if args.engine:
        engine_runs(args.rounds)


if __name__ == "__main__":
    main()
