"""The batched engine measured side by side in one run: aggregate tokens/s against concurrency, Hugging Face's
batched `generate` on the same requests, time to first token under load, batch-1 speed against `hilt.generation.generate`,
and peak memory.

    .venv/bin/python benchmarks/engine_bench.py                 # default architecture, bf16 where training uses it
    .venv/bin/python benchmarks/engine_bench.py --requests 64   # a shorter run

The workload is fixed by --seed: --requests prompts of 8-200 random tokens, each asking for 16-256 new tokens
(uniform), <EOS> ignored so every request produces exactly its own count. Concurrency c means a client keeps c
requests in flight (one engine with 64 slots; a finished request is replaced at once). c = 1 runs the first 16
requests one after another, c = 4, 16 and 64 all of them; tokens/s is generated tokens over wall time, prefill
included. When the last requests drain, fewer than c rows are left, so the table also gives the mean number of
rows each decoding step carried: with 64 requests a 16-request client's steps carried 12.9 rows on average, with
the default 256, 15.1 (the drain is a smaller part of the run, which is closer to a server's steady state).

Hugging Face runs the same 16 requests as one left-padded batch of 16 (its `generate` needs one length for the
whole batch, so every row runs to the longest max_new_tokens); its tokens/s counts only the tokens the requests
asked for, and the padding waste is reported. The HF model is the same HILT model through `hilt.hf`
(HiltForCausalLM, the same weights) when that package is present; GPT2LMHeadModel of the same main shape follows
as a second row (HF's speed on a plain model of its own), or stands alone when `hilt.hf` is missing.

Time to first token: a short request (8 prompt tokens, 16 new) submitted while 15 long ones (200-token prompts,
256 new) are decoding, against the same request on an idle engine; median of --ttft_runs. The loaded request
arrives at a uniformly random moment of a decoding step, so its wait for that step to end varies from none to a
whole step: 5-sample medians ranged from 2.6x to 3.6x in one morning on this machine, hence 15 by default.

Batch 1: one 8-token prompt, --new_tokens greedy tokens, the engine against `hilt.generation.generate` (cached), in bf16 and in
fp32, and fp32 without ILTs (n_layers_ilt=0) to show what the ILTs cost per token; plus the number of torch
operators one decoding step runs, with and without ILTs.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import time

import torch
from common import VOCAB, cpu_name

from hilt.device import autocast_dtype
from hilt.generation.engine import Engine, SamplingParams
from hilt.generation.generate import generate
from hilt.model import HierarchicalTransformer, ModelConfig


def workload(n: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [
        ([rng.randrange(VOCAB) for _ in range(rng.randint(8, 200))], rng.randint(16, 256)) for _ in range(n)
    ]


def params(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True)


def run_concurrent(engine: Engine, requests, concurrency: int) -> float:
    """Generated tokens/s with ``concurrency`` requests in flight."""
    t0 = time.perf_counter()
    tokens = sum(
        len(r.token_ids)
        for _, r in engine.generate_iter(((p, params(n)) for p, n in requests), in_flight=concurrency)
    )
    return tokens / (time.perf_counter() - t0)


def hf_model(model: HierarchicalTransformer, dtype, gpt2: bool = False):
    """The same model for transformers: HILT's own export wrapper if present (and not ``gpt2``), else GPT-2 of
    the same main shape."""
    c = model.config
    try:
        if gpt2:
            raise ImportError
        from hilt.hf.configuration_hilt import HiltConfig
        from hilt.hf.modeling_hilt import HiltForCausalLM

        hf = HiltForCausalLM(HiltConfig(**c.to_dict()))
        hf.model.load_state_dict(model.state_dict())
        name = "HiltForCausalLM (hilt.hf: this HILT model, same weights)"
    except ImportError:
        from transformers import GPT2Config, GPT2LMHeadModel

        hf = GPT2LMHeadModel(
            GPT2Config(
                vocab_size=c.vocab_size,
                n_positions=c.max_seq_len,
                n_embd=c.d_model,
                n_layer=c.n_layers,
                n_head=c.n_heads,
                tie_word_embeddings=c.tie_weights,
            )
        )
        name = "GPT2LMHeadModel (same main shape, no ILTs)"
    hf = hf.eval()
    if dtype is not None:
        hf = hf.to(dtype)
    return hf, name


def run_hf(hf, requests) -> dict:
    B = len(requests)
    longest_prompt = max(len(p) for p, _ in requests)
    longest_new = max(n for _, n in requests)
    ids = torch.zeros(B, longest_prompt, dtype=torch.long)
    mask = torch.zeros(B, longest_prompt, dtype=torch.long)
    for i, (p, _) in enumerate(requests):  # left padding
        ids[i, longest_prompt - len(p) :] = torch.tensor(p)
        mask[i, longest_prompt - len(p) :] = 1
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=longest_new,
            min_new_tokens=longest_new,
            do_sample=False,
            use_cache=True,
            eos_token_id=None,
            pad_token_id=0,
        )
    seconds = time.perf_counter() - t0
    assert out.shape == (B, longest_prompt + longest_new)
    wanted = sum(n for _, n in requests)
    prompt_tokens = sum(len(p) for p, _ in requests)
    return {
        "tok_s": wanted / seconds,
        "decode_waste": 1 - wanted / (B * longest_new),
        "prompt_waste": 1 - prompt_tokens / (B * longest_prompt),
        "seconds": seconds,
    }


def time_to_first_token(engine: Engine, prompt: list[int]) -> float:
    request = engine.submit(prompt, params(16))
    next(iter(request))
    ttft = time.perf_counter() - request.submitted_at
    request.result()
    return ttft


def ttft_under_load(engine: Engine, args) -> tuple[float, float]:
    rng = random.Random(args.seed + 1)
    short = [rng.randrange(VOCAB) for _ in range(8)]
    for _ in range(2):  # warm-up
        time_to_first_token(engine, short)
    idle = statistics.median(time_to_first_token(engine, short) for _ in range(args.ttft_runs))
    loaded = []
    for _ in range(args.ttft_runs):
        long = [engine.submit([rng.randrange(VOCAB) for _ in range(200)], params(256)) for _ in range(15)]
        for request in long:  # every long request is decoding
            next(iter(request))
        # arrive at a random moment of a decoding step, as a real request would (not always just after one)
        steps = iter(long[-1])
        next(steps)
        t0 = time.perf_counter()
        for _ in range(4):
            next(steps)
        time.sleep(rng.uniform(0, (time.perf_counter() - t0) / 4))
        loaded.append(time_to_first_token(engine, short))
        for request in long:
            request.cancel()
    return idle, statistics.median(loaded)


def batch_one(args, model, plain, bf16) -> list[tuple[str, float]]:
    """Batch-1 greedy tokens/s, the contestants taking turns; median of --rounds rounds after a warm-up."""
    prompt = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(args.seed))
    n = args.new_tokens
    engines = {
        dtype: Engine(m, max_slots=1, compute_dtype=dtype).start()
        for m, dtype in ((model, bf16), (model, None))
    }
    plain_engine = Engine(plain, max_slots=1).start()

    def via_engine(engine):
        return lambda: engine.submit(prompt[0].tolist(), params(n)).result()

    def via_generate(m, dtype):
        return lambda: generate(m, prompt, n, temperature=0, use_cache=True, compute_dtype=dtype)

    label = "bf16" if bf16 is not None else "fp32"
    contestants = {
        f"engine, {label}": via_engine(engines[bf16]),
        f"hilt.generation.generate, {label}": via_generate(model, bf16),
        "engine, fp32": via_engine(engines[None]),
        "hilt.generation.generate, fp32": via_generate(model, None),
        "engine, fp32, n_layers_ilt=0": via_engine(plain_engine),
        "hilt.generation.generate, fp32, n_layers_ilt=0": via_generate(plain, None),
    }
    times = {k: [] for k in contestants}
    for i in range(args.rounds + 1):
        for name, fn in contestants.items():
            t0 = time.perf_counter()
            fn()
            if i:
                times[name].append(time.perf_counter() - t0)
    for engine in (*engines.values(), plain_engine):
        engine.shutdown()
    return [(k, n / statistics.median(v)) for k, v in times.items()]


def operators_per_step(model: HierarchicalTransformer) -> int:
    """torch operators one single-row decoding step runs (fp32), counted below Python."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    engine = Engine(model, max_slots=1)
    engine.start()
    engine.shutdown()  # only the weights and the cache are needed; the step runs here, on this thread
    cache = engine.cache
    with torch.inference_mode():
        cache.bind([0], [3], fresh=True)
        engine.decoder.features(torch.tensor([[1, 2, 3]]), cache=cache)
        cache.bind([0], [1], fresh=False)
        with Count():
            hidden = engine.decoder.features(torch.tensor([[4]]), cache=cache)
            engine._head(hidden[:, -1]).argmax(-1)
    return Count.n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d_model", type=int, default=None, help="model width (default: ModelConfig's, 256)")
    p.add_argument("--n_layers", type=int, default=None, help="main layers (default: ModelConfig's, 6)")
    p.add_argument("--requests", type=int, default=256, help="requests in the workload (default 256)")
    p.add_argument("--new_tokens", type=int, default=100, help="batch-1 new tokens (default 100)")
    p.add_argument("--rounds", type=int, default=3, help="batch-1 timed rounds (default 3)")
    p.add_argument("--ttft_runs", type=int, default=15, help="time-to-first-token repeats (default 15)")
    p.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no_hf", action="store_true", help="skip the Hugging Face rows")
    p.add_argument(
        "--batch1_only",
        action="store_true",
        help="only the batch-1 table and the operator count (e.g. under ATEN_CPU_CAPABILITY=avx2 "
        "ONEDNN_MAX_CPU_ISA=AVX2, which caps torch and oneDNN at AVX2 as on a CPU without native bf16)",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = {k: v for k, v in (("d_model", args.d_model), ("n_layers", args.n_layers)) if v is not None}
    torch.manual_seed(0)
    model = HierarchicalTransformer(ModelConfig(vocab_size=VOCAB, **shape)).eval()
    plain = HierarchicalTransformer(ModelConfig(vocab_size=VOCAB, n_layers_ilt=0, **shape)).eval()
    bf16 = autocast_dtype(torch.device("cpu"), use_amp=True)
    label = "bf16" if bf16 is not None else "fp32"
    c = model.config
    print(
        f"model: d_model {c.d_model}, {c.n_layers} layers, n_layers_ilt {c.n_layers_ilt}, "
        f"{model.num_parameters() / 1e6:.1f}M parameters, {label} matmuls | CPU: {cpu_name()}, "
        f"native bf16: {bf16 is not None}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
        + "".join(
            f", {k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ
        )
    )
    requests = workload(args.requests, args.seed)
    first16 = requests[:16]
    print(
        f"workload: {len(requests)} requests, prompts {min(len(q) for q, _ in requests)}-"
        f"{max(len(q) for q, _ in requests)} tokens, max_new_tokens {min(n for _, n in requests)}-"
        f"{max(n for _, n in requests)}; the first 16: {sum(n for _, n in first16)} new tokens"
    )

    if args.batch1_only:
        print_batch_one(args, model, plain, bf16)
        return
    engine = Engine(model, max_slots=64, compute_dtype=bf16).start()  # the highest concurrency measured
    run_concurrent(engine, [(q, 16) for q, _ in requests[:8]], 8)  # warm-up
    rows = []
    for concurrency in (1, 4, 16, 64):
        work = first16 if concurrency == 1 else requests
        before = engine.stats()
        t0 = time.perf_counter()
        tok_s = run_concurrent(engine, work, concurrency)
        wall = time.perf_counter() - t0
        after = engine.stats()
        occupancy = (after["decode_rows"] - before["decode_rows"]) / (
            after["decode_calls"] - before["decode_calls"]
        )
        rows.append((concurrency, len(work), tok_s, occupancy, wall))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(
        "\n| concurrent requests | requests | generated tokens/s | vs 1 | mean rows per decoding step | wall s |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    base = rows[0][2]
    for conc, n, tok_s, occupancy, wall in rows:
        print(f"| {conc} | {n} | {tok_s:.1f} | {tok_s / base:.2f}x | {occupancy:.1f} | {wall:.1f} |")
    print(
        f"\npeak RSS after 64 concurrent requests: {rss:.2f} GiB (process peak so far; the engine's cache: "
        f"{engine.cache_bytes / 2**20:.0f} MiB for {engine.n_slots} slots of {c.max_seq_len} positions)"
    )

    idle, loaded = ttft_under_load(engine, args)
    print(
        f"\ntime to first token (8-token prompt): idle engine {idle * 1e3:.1f} ms; while 15 long requests decode "
        f"{loaded * 1e3:.1f} ms ({loaded / idle:.2f}x)"
    )
    engine.shutdown()

    if not args.no_hf:
        engine = Engine(model, max_slots=16, compute_dtype=bf16).start()
        engine16 = run_concurrent(engine, first16, 16)  # the same 16 requests HF gets
        engine.shutdown()
        for gpt2 in (False, True):
            hf, name = hf_model(model, bf16, gpt2)
            run_hf(hf, [(q[:8], 4) for q, _ in first16])  # warm-up
            hf_row = run_hf(hf, first16)
            print(
                f"\nHugging Face generate, {name}, {label} weights, the first 16 requests as one left-padded "
                f"batch: {hf_row['tok_s']:.1f} requested tokens/s ({hf_row['seconds']:.1f} s); the engine on the "
                f"same 16 requests, all at once: {engine16:.1f} ({engine16 / hf_row['tok_s']:.2f}x). HF's padding waste: "
                f"{hf_row['decode_waste']:.0%} of its decoded rows and {hf_row['prompt_waste']:.0%} of its prompt "
                "rows are padding (continuous batching computes neither)"
            )
            del hf
            if "GPT2" in name:
                break

    print_batch_one(args, model, plain, bf16)


def print_batch_one(args, model, plain, bf16) -> None:
    print("\nbatch 1, 8-token prompt, greedy, median of the rounds:")
    print("| contestant | tokens/s |")
    print("| --- | --- |")
    for name, tok_s in batch_one(args, model, plain, bf16):
        print(f"| {name} | {tok_s:.1f} |")
    with_ilts, without = operators_per_step(model), operators_per_step(plain)
    print(
        f"\ntorch operators per single-row fp32 decoding step: {with_ilts} with the ILTs, {without} without "
        f"({with_ilts - without} from the {len(model.ilts)} ILTs)"
    )


if __name__ == "__main__":
    main()
