"""`hilt serve` without --threads against each --threads value, on idle cores and on busy ones, in one table.

    flock /tmp/hilt-timing.lock .venv/bin/python benchmarks/threads_bench.py    # about 4 minutes on 2 cores

For each condition (idle; busy: one busy-loop process per core, from after the server's warm-up to the end of its
measurements) and each setting (no --threads, the default, then --threads 1, 2, 4, ... up to the cores), a fresh
`python -m hilt serve` on 127.0.0.1 (make demo's shape with random weights, as serve_bench.py, unless
--model_path) is measured:

- one streamed request for --single_tokens greedy tokens, alone: its latency, the median of --single_runs (fewer
  when they take long);
- --streams clients, each streaming requests of --stream_tokens tokens back to back for --window seconds:
  generated tokens/s (text events received in the window, one per token but where a character spans two tokens,
  over the window) and the first-token p50 over the requests sent in it (a request still waiting at the end counts
  with its wait so far, and the cell then reads ">");
- the count the decode thread runs on at the end (/metrics' hilt_decode_threads: what the default picked).

A request that passes --timeout is abandoned and its cell reads ">". Each condition ends with default / best per
column, best being the fastest setting in that column, the default included: the target is at most 1.3x. With
--rounds, every setting runs that many times (every other round in reverse order) and each column keeps its best. The
clients run in this process, beside the server, on the same cores; the 1-minute load average before each
measurement says what else ran ("idle" means no busy loops of ours, not an idle machine). The table goes to
benchmarks/results/threads_bench.md (--out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import cpu_kind
from serve_bench import Server, body_chunks, demo_shaped_checkpoint, post, wait_ready

REPO = Path(__file__).resolve().parents[1]
PROMPT = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun."


# --- one streamed request, with a deadline ---------------------------------------------------------------------


async def stream(port: int, max_tokens: int, until: float) -> dict:
    """A greedy streamed completion read until [DONE] or the ``until`` clock time: when it was sent, when its first
    text came, how many text events came, and whether it finished."""
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    result = {"sent": time.perf_counter(), "first": None, "tokens": 0, "done": False, "end": None}

    async def read() -> None:
        status, headers, reader, writer = await post(port, "/v1/completions", body)
        try:
            if status != 200:
                raise SystemExit(f"the server answered {status}")
            buffer = b""
            async for chunk in body_chunks(reader, headers):
                buffer += chunk
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    data = event.decode().removeprefix("data: ")
                    if data == "[DONE]":
                        result["done"] = True
                        continue
                    choices = json.loads(data).get("choices") or []
                    if choices and choices[0]["text"]:
                        result["tokens"] += 1
                        result["first"] = result["first"] or time.perf_counter()
        finally:
            writer.close()  # a request cut off at the deadline is cancelled by the server when its client leaves

    try:
        await asyncio.wait_for(read(), timeout=max(0.0, until - time.perf_counter()))
    except asyncio.TimeoutError:
        pass
    result["end"] = time.perf_counter()
    return result


async def metrics_threads(port: int) -> int | None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    text = (await reader.read()).decode()
    writer.close()
    match = re.search(r"^hilt_decode_threads (\S+)$", text, re.M)
    return int(float(match.group(1))) if match else None


# --- one setting under one condition -------------------------------------------------------------------------


class BusyCores:
    """One busy-loop process per core while the block runs."""

    def __init__(self, busy: bool):
        self.busy = busy
        self.procs: list[subprocess.Popen] = []

    def __enter__(self):
        if self.busy:
            # bounded, so that a benchmark killed before its cleanup leaves nothing spinning for long
            loop = "import time\nend = time.monotonic() + 600\nwhile time.monotonic() < end: pass"
            self.procs = [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(os.cpu_count() or 1)]
            time.sleep(0.5)  # let the scheduler spread them
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            p.kill()
            p.wait()


async def measure(port: int, args) -> dict:
    singles, spent = [], 0.0
    while len(singles) < args.single_runs and (not singles or spent < args.single_budget):
        r = await stream(port, args.single_tokens, time.perf_counter() + args.timeout)
        singles.append(r["end"] - r["sent"] if r["done"] else None)
        spent += r["end"] - r["sent"]
        if not r["done"]:
            break  # past --timeout once: another would only repeat it
    end = time.perf_counter() + args.window
    requests: list[dict] = []

    async def client() -> None:
        while time.perf_counter() < end:
            requests.append(await stream(port, args.stream_tokens, end))

    await asyncio.gather(*(client() for _ in range(args.streams)))
    waits = [(r["first"] or r["end"]) - r["sent"] for r in requests]
    censored = sum(r["first"] is None for r in requests)
    return {
        "single_s": statistics.median([s for s in singles if s is not None]) if all(singles) else None,
        "single_bound_s": max(r for r in [s or args.timeout for s in singles]),
        "tokens_per_s": sum(r["tokens"] for r in requests) / args.window,
        "ttft_p50_s": statistics.median(waits) if waits else None,
        # the median is only a bound when the requests still waiting at the end reach it
        "ttft_is_bound": censored >= (len(waits) + 1) // 2,
        "requests": len(requests),
        "threads_at_end": await metrics_threads(port),
    }


async def one_setting(model_path: str, threads: int | None, busy: bool, args) -> dict:
    flags = ["--max_batch", str(args.max_batch)] + ([] if threads is None else ["--threads", str(threads)])
    server = Server(model_path, flags)
    try:
        await wait_ready(server.port)
        # warm-up on idle cores: the first requests pay for lazy initialisation (oneDNN kernels, allocator growth)
        await stream(server.port, 16, time.perf_counter() + 120)
        load = os.getloadavg()[0]  # what else ran on the machine: "idle" means no busy loops of ours
        with BusyCores(busy):
            result = await measure(server.port, args)
        result["load_before"] = load
    finally:
        server.stop()
    return result


def best_of(runs: list[dict]) -> dict:
    """Each column's best over the rounds: other work on the machine only ever slows a run down."""
    singles = [r for r in runs if r["single_s"] is not None]
    best = dict(
        min(singles, key=lambda r: r["single_s"]) if singles else min(runs, key=lambda r: r["single_bound_s"])
    )
    fastest = max(runs, key=lambda r: r["tokens_per_s"])
    first = min(runs, key=lambda r: (r["ttft_is_bound"], r["ttft_p50_s"] or 0))
    best.update(
        tokens_per_s=fastest["tokens_per_s"],
        ttft_p50_s=first["ttft_p50_s"],
        ttft_is_bound=first["ttft_is_bound"],
    )
    best["threads_at_end"] = ", ".join(sorted({str(r["threads_at_end"]) for r in runs}))
    best["load_before"] = ", ".join(f"{r['load_before']:.1f}" for r in runs)
    return best


# --- the table -------------------------------------------------------------------------------------------------


def cell(value: float | None, bound: float | None, fmt: str) -> str:
    return format(value, fmt) if value is not None else f">{format(bound, fmt)}"


def table(args, rows: list[tuple[str, str, dict]]) -> str:
    command = " ".join(["benchmarks/threads_bench.py", *sys.argv[1:]])
    lines = [
        f"# `hilt serve`'s default thread choice against each --threads ({time.strftime('%Y-%m-%d')})",
        "",
        f"`{command}` on {cpu_kind()}. Busy: {os.cpu_count()} busy-loop processes (one per core) beside the "
        f"server and its clients. Single request: {args.single_tokens} greedy tokens, streamed, alone (median of "
        f"up to {args.single_runs}). Streams: {args.streams} clients streaming {args.stream_tokens}-token requests "
        f"back to back for {args.window:g} s (--max_batch {args.max_batch}). '>' marks a lower bound (a request "
        f"past {args.timeout:g} s, or first tokens still awaited at the end).",
        "",
        f"| cores | --threads | {args.single_tokens}-token request | {args.streams} streams: tokens/s | "
        "first token p50 | decode threads at the end | load average before |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for condition in dict.fromkeys(c for c, _, _ in rows):
        mine = [(s, r) for c, s, r in rows if c == condition]
        for setting, r in mine:
            lines.append(
                f"| {condition} | {setting} | {cell(r['single_s'], r['single_bound_s'], '.2f')} s | "
                f"{r['tokens_per_s']:.0f} | {'>' if r['ttft_is_bound'] else ''}{1000 * (r['ttft_p50_s'] or 0):.0f} ms | "
                f"{r['threads_at_end']} | {r['load_before']} |"
            )
        single = [r["single_s"] or r["single_bound_s"] for _, r in mine]
        speed = [r["tokens_per_s"] for _, r in mine]
        ttft = [r["ttft_p50_s"] or 0 for _, r in mine]
        lines.append(
            f"| {condition} | **default / best** | **{single[0] / min(single):.2f}x** | "
            f"**{max(speed) / max(speed[0], 1e-9):.2f}x** | **{ttft[0] / max(min(ttft), 1e-9):.2f}x** | | |"
        )
    return "\n".join(lines) + "\n"


async def main_async(args) -> int:
    cores = os.cpu_count() or 1
    values = (
        [int(v) for v in args.threads.split(",")]
        if args.threads
        else sorted({1, 2, 4, 8, 16, cores} & set(range(1, cores + 1)))
    )
    conditions = args.conditions.split(",")
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model_path or demo_shaped_checkpoint(Path(tmp))
        for condition in conditions:
            settings = [None, *values]
            for round_ in range(args.rounds):
                # every other round backwards, so that no setting always runs first on a machine that drifts
                for threads in settings if round_ % 2 == 0 else settings[::-1]:
                    started = time.perf_counter()
                    r = await one_setting(model_path, threads, condition == "busy", args)
                    setting = "default" if threads is None else str(threads)
                    runs.setdefault((condition, setting), []).append(r)
                    print(
                        f"{condition:4s} --threads {setting:7s}: single "
                        f"{cell(r['single_s'], r['single_bound_s'], '.2f')} s, {r['tokens_per_s']:.0f} tokens/s, "
                        f"first token p50 {1000 * (r['ttft_p50_s'] or 0):.0f} ms{' (bound)' if r['ttft_is_bound'] else ''}, "
                        f"{r['requests']} requests, decode threads {r['threads_at_end']} "
                        f"({time.perf_counter() - started:.0f} s)",
                        flush=True,
                    )
    rows = [(condition, setting, best_of(rs)) for (condition, setting), rs in runs.items()]
    text = table(args, rows)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", default=None, help="checkpoint to serve (default: make demo's shape)")
    parser.add_argument(
        "--threads",
        default=None,
        help="comma-separated --threads values (default: 1, 2, 4, ... and the cores)",
    )
    parser.add_argument("--conditions", default="idle,busy", help="idle, busy or both (default idle,busy)")
    parser.add_argument(
        "--single_tokens", type=int, default=100, help="tokens of the lone request (default 100)"
    )
    parser.add_argument("--single_runs", type=int, default=3, help="lone requests, at most (default 3)")
    parser.add_argument(
        "--single_budget",
        type=float,
        default=20,
        help="seconds after which no further lone request starts (default 20)",
    )
    parser.add_argument("--streams", type=int, default=16, help="concurrent streaming clients (default 16)")
    parser.add_argument(
        "--stream_tokens", type=int, default=64, help="tokens per streamed request (default 64)"
    )
    parser.add_argument("--window", type=float, default=15, help="seconds the streams run (default 15)")
    parser.add_argument("--max_batch", type=int, default=16, help="the server's --max_batch (default 16)")
    parser.add_argument(
        "--timeout", type=float, default=30, help="seconds a lone request may take (default 30)"
    )
    parser.add_argument(
        "--rounds", type=int, default=1, help="runs of every setting, each column's best kept (default 1)"
    )
    parser.add_argument(
        "--out",
        default=str(REPO / "benchmarks" / "results" / "threads_bench.md"),
        help="where the table goes",
    )
    return asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
