"""Where the engine's time goes: engine_bench's workload at one concurrency, with a clock around each part of the
decoding copy (main layers, their attention with its kernel, the ILTs, the LM head, sampling), summed over the run.

    .venv/bin/python benchmarks/engine_step_split.py --concurrency 16
    .venv/bin/python benchmarks/engine_step_split.py --concurrency 1

The clocks cost a few microseconds per call, so the total runs a little slower than engine_bench's; the parts
nest (the kernel is inside the attention, which is inside a decoding call), so they do not add up to the wall time.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_bench import VOCAB, run_concurrent, workload  # noqa: E402

import hilt.engine as engine_module  # noqa: E402
import hilt.kernels as kernels  # noqa: E402
from hilt.device import autocast_dtype  # noqa: E402
from hilt.model import HierarchicalTransformer, ModelConfig  # noqa: E402

seconds: dict[str, float] = collections.defaultdict(float)
calls: collections.Counter = collections.Counter()
timing = False


def clocked(fn, part: str):
    def timed(*args, **kwargs):
        if not timing:
            return fn(*args, **kwargs)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds[part] += time.perf_counter() - t0
            calls[part] += 1

    return timed


def main() -> None:
    global timing
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    p.add_argument("--requests", type=int, default=64, help="requests in the workload (default 64)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = HierarchicalTransformer(ModelConfig(vocab_size=VOCAB)).eval()
    bf16 = autocast_dtype(torch.device("cpu"), use_amp=True)
    # the kernel is looked up per call, so the clock goes on the lookup's answer
    pick = kernels.decode_attention_kernel
    clocked_kernel = clocked(kernels.decode_attention, "decode_attention kernel")
    kernels.decode_attention_kernel = lambda q, mask: clocked_kernel if pick(q, mask) is not None else None
    engine = engine_module.Engine(model, max_slots=max(64, args.concurrency), compute_dtype=bf16).start()
    decoder = engine.decoder
    for layer in decoder.layers:
        layer.forward = clocked(layer.forward, "main layer (norms, projections, attention, feed-forward)")
        layer.attn.attend = clocked(layer.attn.attend, "main attend (cache + kernel)")
    for ilt in decoder.ilts:
        ilt.forward = clocked(ilt.forward, "ILT")
    for name, part in (
        ("_decode", "decoding calls"),
        ("_prefill", "prefill calls"),
        ("_head", "LM head"),
        ("_sample_and_emit", "sampling + emitting"),
    ):
        setattr(engine, name, clocked(getattr(engine, name), part))
    requests = workload(args.requests, 0)
    run_concurrent(engine, [(q, 16) for q, _ in requests[:8]], 8)  # warm-up
    work = requests[:16] if args.concurrency == 1 else requests
    before = engine.stats()
    timing = True
    t0 = time.perf_counter()
    tok_s = run_concurrent(engine, work, args.concurrency)
    wall = time.perf_counter() - t0
    timing = False
    after = engine.stats()
    engine.shutdown()
    rows = (after["decode_rows"] - before["decode_rows"]) / (after["decode_calls"] - before["decode_calls"])
    print(
        f"concurrency {args.concurrency}, {torch.get_num_threads()} threads: {tok_s:.1f} tokens/s, {wall:.2f} s, "
        f"{rows:.1f} rows per decoding call on average\n"
    )
    print("| part | seconds | calls | ms per call |\n| --- | --- | --- | --- |")
    for part in sorted(seconds, key=lambda k: -seconds[k]):
        print(f"| {part} | {seconds[part]:.3f} | {calls[part]} | {seconds[part] / calls[part] * 1e3:.3f} |")


if __name__ == "__main__":
    main()
