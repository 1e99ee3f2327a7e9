"""Load test of `hilt serve`: many concurrent streaming clients against the real server, over HTTP.

    flock /tmp/hilt-timing.lock .venv/bin/python benchmarks/serve_bench.py            # a few minutes on 2 cores
    .venv/bin/python benchmarks/serve_bench.py --model_path runs/demo/best_model.pt   # a trained model instead

The server is `python -m hilt serve` in a subprocess on a free 127.0.0.1 port. The default model is `make demo`'s
shape with random weights (d_model 128, 4 layers, 4 heads, ILTs 2 x 64, context 1024, GPT-2 vocabulary, 7.6M
parameters): speed does not depend on what the weights learned, and no training run is needed.

The workload, fixed by --seed: prompts cut from data.txt with 8-300 tokens, each asking for 16, 64 or 128 new tokens
with <EOS> ignored (the `ignore_eos` extension), greedy unless --temperature, streamed with usage. At concurrency c,
c clients each send their requests one after another, --requests_per_client each (at least --min_requests per
level).

Checked, not just timed: every request answers 200, its stream ends with `data: [DONE]`, its usage says exactly the
max_tokens asked for, and its prompt_tokens match /tokenize. Reported per level: generated tokens/s (all tokens over
the level's wall time), requests/s, time to first token p50/p99 (request sent -> first text event), and the server's
peak resident memory. Then an overload burst: --burst requests at once against --max_batch slots and --max_queue
places; the ones beyond get 503 with Retry-After, and how fast those answers come back is reported (a hang would
show as seconds). The clients are plain asyncio sockets in this one process, which shares the machine's cores
with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import cpu_name

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


# --- a minimal HTTP/1.1 client: enough for JSON and server-sent events -----------------------------------------


async def post(
    port: int, path: str, body: dict
) -> tuple[int, dict, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode()
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
        + data
    )
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, reader, writer


async def body_chunks(reader: asyncio.StreamReader, headers: dict):
    """The body as it arrives (chunked transfer encoding, as uvicorn streams, or a fixed length)."""
    if headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readline()).strip() or b"0", 16)
            if size == 0:
                return
            yield await reader.readexactly(size)
            await reader.readexactly(2)
    else:
        yield await reader.readexactly(int(headers.get("content-length", 0)))


async def stream_completion(port: int, body: dict) -> dict:
    """One streamed request: status, time to first text, the usage, and whether it ended with [DONE]."""
    sent = time.perf_counter()
    status, headers, reader, writer = await post(port, "/v1/completions", body)
    result = {"status": status, "retry_after": headers.get("retry-after"), "ttft": None, "done": False}
    buffer = b""
    try:
        async for chunk in body_chunks(reader, headers):
            if status != 200:
                result["error"] = json.loads(chunk)["error"]
                break
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                data = event.decode().removeprefix("data: ")
                if data == "[DONE]":
                    result["done"] = True
                    continue
                payload = json.loads(data)
                if "error" in payload:
                    result["error"] = payload["error"]
                elif payload["choices"] and payload["choices"][0]["text"] and result["ttft"] is None:
                    result["ttft"] = time.perf_counter() - sent
                if payload.get("usage"):
                    result["usage"] = payload["usage"]
    finally:
        writer.close()
    result["latency"] = time.perf_counter() - sent
    return result


# --- the server ----------------------------------------------------------------------------------------------


def demo_shaped_checkpoint(folder: Path) -> str:
    """`make demo`'s architecture with random weights, saved as the trainer saves."""
    import torch

    from hilt.checkpoint.store import FORMAT_VERSION, atomic_save
    from hilt.data.tokenizer import Tokenizer
    from hilt.model import HierarchicalTransformer, ModelConfig

    torch.manual_seed(0)
    tok = Tokenizer.load()
    config = ModelConfig(
        vocab_size=tok.vocab_size, d_model=128, n_layers=4, n_heads=4, ilt_dim=64, max_seq_len=1024
    )
    model = HierarchicalTransformer(config)
    path = folder / "demo_shape.pt"
    atomic_save(
        {
            "format_version": FORMAT_VERSION,
            "config": config.to_dict(),
            "model_state_dict": model.state_dict(),
            "tokenizer": tok.name,
            "train_config": {"tokenizer": None},
        },
        path,
    )
    return str(path)


class Server:
    def __init__(self, model_path: str, flags: list[str]):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hilt", "serve", "--model_path", model_path, "--port", "0"]
            + ["--log_level", "warning", *flags],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        )
        line = self.proc.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not match:
            raise SystemExit(f"the server did not start: {line!r}")
        self.port = int(match.group(1))
        self.peak_rss = 0
        self._watching = True
        threading.Thread(target=self._watch_memory, daemon=True).start()

    def rss(self) -> int:
        """Resident memory of the server process, in bytes (Linux /proc)."""
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) * 1024

    def _watch_memory(self) -> None:
        while self._watching and self.proc.poll() is None:
            self.peak_rss = max(self.peak_rss, self.rss())
            time.sleep(0.05)

    def reset_peak(self) -> None:
        self.peak_rss = self.rss()

    def stop(self) -> int:
        self._watching = False
        self.proc.terminate()
        return self.proc.wait(timeout=60)


async def get_json(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data = json.dumps(body).encode() if body is not None else b""
    writer.write(
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        f"Connection: close\r\n\r\n".encode()
        + data
    )
    raw = await reader.read()
    writer.close()
    head, _, rest = raw.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    if b"transfer-encoding: chunked" in head.lower():
        size, _, rest = rest.partition(b"\r\n")
        rest = rest[: int(size, 16)]
    return status, json.loads(rest) if rest else {}


async def wait_ready(port: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if (await get_json(port, "GET", "/health"))[0] == 200:
                return
        except OSError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("the model did not load")


# --- the workload --------------------------------------------------------------------------------------------


def make_requests(n: int, text: str, seed: int, temperature: float) -> list[dict]:
    rng = random.Random(seed)
    words = text.split(" ")
    requests = []
    for _ in range(n):
        length = rng.choice([6, 40, 120, 220])  # words; about 8 to 300 tokens
        start = rng.randrange(len(words) - length)
        requests.append(
            {
                "prompt": " ".join(words[start : start + length]),
                "max_tokens": rng.choice([16, 64, 128]),
                "temperature": temperature,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
                **({"seed": rng.randrange(2**31)} if temperature > 0 else {}),
            }
        )
    return requests


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def run_level(server: Server, requests: list[dict], concurrency: int, prompt_tokens: dict) -> dict:
    queue = list(enumerate(requests))
    results: list[tuple[dict, dict]] = []

    async def client() -> None:
        while queue:
            _, body = queue.pop()
            results.append((body, await stream_completion(server.port, body)))

    server.reset_peak()
    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    problems = []
    for body, r in results:
        usage = r.get("usage") or {}
        if r["status"] != 200 or not r["done"] or "error" in r:
            problems.append(f"status {r['status']}, done {r['done']}, error {r.get('error')}")
        elif usage.get("completion_tokens") != body["max_tokens"]:
            problems.append(f"{usage.get('completion_tokens')} tokens, asked for {body['max_tokens']}")
        elif usage.get("prompt_tokens") != prompt_tokens[body["prompt"]]:
            problems.append(f"prompt_tokens {usage.get('prompt_tokens')} != {prompt_tokens[body['prompt']]}")
    tokens = sum(r.get("usage", {}).get("completion_tokens", 0) for _, r in results)
    ttfts = [r["ttft"] for _, r in results if r["ttft"] is not None]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "failed": len(problems),
        "problems": problems[:5],
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "requests_per_s": len(results) / wall,
        "ttft_p50_ms": 1000 * statistics.median(ttfts),
        "ttft_p99_ms": 1000 * percentile(ttfts, 99),
        "peak_rss_mib": server.peak_rss / 2**20,
    }


async def overload(server: Server, requests: list[dict], burst: int) -> dict:
    bodies = [dict(requests[i % len(requests)], max_tokens=128) for i in range(burst)]
    server.reset_peak()
    start = time.perf_counter()
    results = await asyncio.gather(*(stream_completion(server.port, b) for b in bodies))
    wall = time.perf_counter() - start
    refused = [r for r in results if r["status"] == 503]
    served = [r for r in results if r["status"] == 200]
    return {
        "burst": burst,
        "served": len(served),
        "served_complete": sum(
            r["done"] and r.get("usage", {}).get("completion_tokens") == 128 for r in served
        ),
        "refused_503": len(refused),
        "refused_with_retry_after": sum(r["retry_after"] is not None for r in refused),
        "other": len(results) - len(served) - len(refused),
        "refusal_p50_ms": 1000 * statistics.median([r["latency"] for r in refused]) if refused else None,
        "refusal_max_ms": 1000 * max(r["latency"] for r in refused) if refused else None,
        "wall_s": wall,
        "peak_rss_mib": server.peak_rss / 2**20,
    }


def report(args, levels: list[dict], burst: dict, baseline_rss: float, final_rss: float, model: str) -> str:
    lines = [
        f"# `hilt serve` under load ({time.strftime('%Y-%m-%d')})",
        "",
        f"`{' '.join(['benchmarks/serve_bench.py', *sys.argv[1:]])}` on {cpu_name()}, {os.cpu_count()} cores "
        f"(clients and server share them); model: {model}; server flags: --max_batch {args.max_batch} "
        f"--max_queue {args.max_queue}; {'greedy' if args.temperature == 0 else f'temperature {args.temperature}'}"
        ", prompts 8-300 tokens, 16/64/128 new tokens, streamed.",
        "",
        "| concurrency | requests | failed | generated tokens/s | requests/s | TTFT p50 | TTFT p99 | peak RSS |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in levels:
        lines.append(
            f"| {r['concurrency']} | {r['requests']} | {r['failed']} | {r['tokens_per_s']:.0f} | "
            f"{r['requests_per_s']:.2f} | {r['ttft_p50_ms']:.0f} ms | {r['ttft_p99_ms']:.0f} ms | "
            f"{r['peak_rss_mib']:.0f} MiB |"
        )
    lines += [
        "",
        f"Overload: {burst['burst']} requests at once (128 new tokens each) against {args.max_batch} slots + "
        f"{args.max_queue} queue places: {burst['served']} served ({burst['served_complete']} complete with the "
        f"right count), {burst['refused_503']} refused with 503 ({burst['refused_with_retry_after']} with "
        f"Retry-After), {burst['other']} other; the refusals came back in {burst['refusal_p50_ms'] or 0:.0f} ms "
        f"(median), {burst['refusal_max_ms'] or 0:.0f} ms at most; peak RSS {burst['peak_rss_mib']:.0f} MiB.",
        "",
        f"Server memory: {baseline_rss:.0f} MiB after warm-up, {final_rss:.0f} MiB at the end.",
    ]
    return "\n".join(lines) + "\n"


async def main_async(args) -> int:
    text = Path(args.text_file).read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        model_path = args.model_path or demo_shaped_checkpoint(Path(tmp))
        model = args.model_path or "make demo's shape with random weights (7.6M parameters)"
        flags = ["--max_batch", str(args.max_batch), "--max_queue", str(args.max_queue)]
        server = Server(model_path, flags)
        try:
            await wait_ready(server.port)
            levels_wanted = [int(c) for c in args.concurrency.split(",")]
            n_total = sum(max(args.min_requests, c * args.requests_per_client) for c in levels_wanted)
            requests = make_requests(n_total, text, args.seed, args.temperature)
            prompt_tokens = {}
            for body in requests:
                if body["prompt"] not in prompt_tokens:
                    _, tok = await get_json(server.port, "POST", "/tokenize", {"text": body["prompt"]})
                    prompt_tokens[body["prompt"]] = tok["count"]
            # warm-up: the first requests pay for lazy initialisation (oneDNN kernels, allocator growth)
            await run_level(server, requests[:4], 4, prompt_tokens)
            baseline = server.rss() / 2**20
            levels, used = [], 0
            for c in levels_wanted:
                n = max(args.min_requests, c * args.requests_per_client)
                level = await run_level(server, requests[used : used + n], c, prompt_tokens)
                used += n
                levels.append(level)
                print(
                    f"c={c:3d}: {level['requests']} requests, {level['failed']} failed, "
                    f"{level['tokens_per_s']:.0f} tok/s, TTFT p50 {level['ttft_p50_ms']:.0f} ms "
                    f"p99 {level['ttft_p99_ms']:.0f} ms, peak RSS {level['peak_rss_mib']:.0f} MiB",
                    flush=True,
                )
                for p in level["problems"]:
                    print(f"  problem: {p}")
            burst = await overload(server, requests, args.max_batch + args.max_queue + args.burst_extra)
            print(json.dumps(burst), flush=True)
            final = server.rss() / 2**20
        finally:
            code = server.stop()
    table = report(args, levels, burst, baseline, final, model)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve_bench.md").write_text(table)
    (RESULTS / "serve_bench.json").write_text(
        json.dumps(
            {"levels": levels, "overload": burst, "rss_mib": [baseline, final], "exit": code}, indent=1
        )
    )
    ok = all(r["failed"] == 0 for r in levels) and burst["other"] == 0 and burst["refused_503"] > 0
    ok = ok and burst["served_complete"] == burst["served"] and code == 0
    print("all checks passed" if ok else "CHECKS FAILED")
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_path", default=None, help="checkpoint to serve (default: make demo's shape)")
    parser.add_argument("--concurrency", default="1,8,32,64", help="client counts (default 1,8,32,64)")
    parser.add_argument(
        "--requests_per_client", type=int, default=2, help="requests each client sends per level (default 2)"
    )
    parser.add_argument(
        "--min_requests", type=int, default=16, help="requests per level at the least (default 16)"
    )
    parser.add_argument("--max_batch", type=int, default=32, help="the server's --max_batch (default 32)")
    parser.add_argument("--max_queue", type=int, default=64, help="the server's --max_queue (default 64)")
    parser.add_argument(
        "--burst_extra", type=int, default=64, help="overload: requests beyond slots + queue (default 64)"
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default 0)")
    parser.add_argument("--text_file", default=str(REPO / "data.txt"), help="where prompts come from")
    parser.add_argument("--seed", type=int, default=0, help="workload seed (default 0)")
    args = parser.parse_args()
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
