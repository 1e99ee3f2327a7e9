"""How much faster generation is with the KV cache: greedy decoding of --new_tokens tokens, batch 1, median wall
time of --runs runs with and without the cache (the same code path as `hilt generate --use_cache`).

    .venv/bin/python benchmarks/generation_cache.py                    # default architecture, random weights
    .venv/bin/python benchmarks/generation_cache.py --model_path runs/demo/best_model.pt --runs 5
    .venv/bin/python benchmarks/generation_cache.py --bf16             # bf16 matmuls, as hilt generate runs them

Weights do not change the speed; with no <EOS> every run produces exactly --new_tokens tokens. The two outputs
are also compared, since a fast cache that changes the text would be no use.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hilt.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from hilt.generate import generate  # noqa: E402
from hilt.model import HierarchicalTransformer, ModelConfig  # noqa: E402
from hilt.tokenizer import GPT2_VOCAB_SIZE  # noqa: E402


def time_generation(model, ids, new_tokens, use_cache, runs, bf16):
    times, out = [], None
    # bf16 as `hilt generate` runs it: the kept bf16 copy of the matrices (hilt.decoding.decoding_weights)
    dtype = torch.bfloat16 if bf16 else None
    for _ in range(runs):
        start = time.perf_counter()
        out = generate(model, ids, new_tokens, temperature=0.0, use_cache=use_cache, compute_dtype=dtype)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model_path", default=None, help="a checkpoint (default: the default architecture, random)"
    )
    p.add_argument("--new_tokens", type=int, default=200)
    p.add_argument("--prompt_tokens", type=int, default=8)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--bf16", action="store_true", help="run both ways with bf16 matmuls (as hilt generate)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    if args.model_path:
        model = model_from_checkpoint(load_checkpoint(args.model_path), args.model_path)
    else:
        model = HierarchicalTransformer(ModelConfig(vocab_size=GPT2_VOCAB_SIZE))
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt_tokens))
    # warm-up: first-call allocations, kernel selection and (with --bf16) the kept bf16 copy
    generate(model, ids, 4, temperature=0.0, compute_dtype=torch.bfloat16 if args.bf16 else None)

    c = model.config
    print(
        f"model: d_model {c.d_model}, {c.n_layers} layers, n_layers_ilt {c.n_layers_ilt}, "
        f"{model.num_parameters() / 1e6:.2f}M parameters | batch 1, prompt {args.prompt_tokens} tokens, "
        f"{args.new_tokens} new tokens, {'bf16 matmuls' if args.bf16 else 'fp32'}, "
        f"{torch.get_num_threads()} CPU threads, median of {args.runs} runs"
    )
    t_cache, out_cache = time_generation(model, ids, args.new_tokens, True, args.runs, args.bf16)
    t_plain, out_plain = time_generation(model, ids, args.new_tokens, False, args.runs, args.bf16)
    for name, t in (("with cache", t_cache), ("without cache", t_plain)):
        print(f"{name:>14}: {t:7.3f} s  ({args.new_tokens / t:7.1f} tokens/s)")
    print(f"speed-up: {t_plain / t_cache:.1f}x | identical output: {torch.equal(out_cache, out_plain)}")


if __name__ == "__main__":
    main()
