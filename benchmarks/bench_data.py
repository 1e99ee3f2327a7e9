"""Token cache benchmark: generate a synthetic TinyStories-like corpus, prepare it with `hilt prepare`, and report
the tokenizing rate, the peak memory of that process and the start-up time once the cache exists.

    .venv/bin/python benchmarks/bench_data.py                    # 200 MB corpus in a temporary folder
    .venv/bin/python benchmarks/bench_data.py --mb 1000          # peak memory must not grow with the size
    .venv/bin/python benchmarks/bench_data.py --threads 1        # the pipeline on one core
    xz -dc benchmarks/data/kjv.txt.xz > /tmp/kjv.txt                  # the King James Bible, shipped compressed
    .venv/bin/python benchmarks/bench_data.py --mb 55 --from_text /tmp/kjv.txt   # real text, one document

The corpus: stories of 3-8 lines of 10-60 words drawn with data.txt's word frequencies, a blank line between
stories (prepared with --doc_separator blank, so an <EOS> ends each story). With --from_text, copies of that file
instead, prepared as `hilt prepare` prepares a plain text by default (the whole file one document). Each `hilt prepare` runs in its own
process; its peak RSS comes from wait4(). For scale, the single-threaded rate of the bare encoders (tiktoken and
Hugging Face tokenizers, one call on a slice of the same text) is measured too, and the cache's first stories are
checked against a one-shot encode. The machine's load average is printed: on a shared machine the rates are lower
bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from common import cpu_kind

from hilt.data.corpus import GPT2_LINE_CUT
from hilt.data.encode import piece_encoder
from hilt.data.token_cache import open_cache
from hilt.data.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """Writes about ``megabytes`` MB of stories; returns the exact size."""
    counts = Counter(re.findall(r"[A-Za-z']+[,;:!?]?", (ROOT / "data.txt").read_text(encoding="utf-8")))
    words = np.array(list(counts), dtype=object)
    p = np.array(list(counts.values()), dtype=np.float64)
    p /= p.sum()
    rng = np.random.default_rng(seed)
    target = int(megabytes * 1e6)
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            n = 400_000  # words per round
            picked = words[rng.choice(len(words), size=n, p=p)]
            # separators: a space, a line end every 10-60 words, a blank line after every 3-8 lines
            seps = np.full(n, " ", dtype=object)
            line_ends = np.cumsum(rng.integers(10, 61, size=n // 10))
            line_ends = line_ends[line_ends < n]
            seps[line_ends] = ".\n"
            every = np.cumsum(rng.integers(3, 9, size=len(line_ends)))
            seps[line_ends[every[every < len(line_ends)]]] = ".\n\n"
            seps[-1] = ".\n\n"
            text = "".join(w + s for w, s in zip(picked.tolist(), seps.tolist(), strict=True))
            f.write(text)
            written += len(text.encode("utf-8"))
    return path.stat().st_size


def write_copies(path: Path, source: Path, megabytes: float) -> int:
    """Concatenates whole copies of ``source`` until ``path`` holds at least ``megabytes`` MB; returns the size."""
    data = source.read_bytes()
    copies = max(1, -(-int(megabytes * 1e6) // len(data)))  # ceil
    with open(path, "wb") as f:
        for _ in range(copies):
            f.write(data)
    return path.stat().st_size


def stage_seconds(path: Path, tok: Tokenizer) -> dict[str, float]:
    """CPU seconds of each stage of `hilt prepare`, each run alone on one thread over the whole file."""
    import hashlib

    from hilt.data.corpus import Corpus, decode_counting

    def cpu(fn):
        start = time.process_time()
        result = fn()
        return time.process_time() - start, result

    seconds = {}
    seconds["read"], data = cpu(path.read_bytes)
    seconds["SHA-256"], _ = cpu(lambda: hashlib.sha256(data).hexdigest())
    seconds["UTF-8 decoding"], _ = cpu(lambda: decode_counting(data))
    seconds["Corpus.pieces (read + hash + decode + cut)"], pieces = cpu(
        lambda: [p.text for p in Corpus(path).pieces()]
    )
    seconds["special-token check"], _ = cpu(
        lambda: any(s in p for p in pieces for s in ("<PAD>", "<BOS>", "<EOS>"))
    )
    encode = piece_encoder(tok)[0]
    seconds["tiktoken"], ids = cpu(lambda: [encode([p])[0] for p in pieces])
    with tempfile.TemporaryFile() as f:
        seconds["converting and writing the ids"], _ = cpu(
            lambda: [f.write(a.astype(np.uint16)) for a in ids]
        )
    return seconds


def run_prepare(args: list[str]) -> tuple[float, float, float, str]:
    """Runs `hilt prepare` in a fresh process: (wall seconds, CPU seconds, peak RSS in MB, stdout)."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hilt", "prepare", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"hilt prepare failed: {out}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, out


def encoder_rate(encode, text: str) -> float:
    start = time.perf_counter()
    encode(text)
    return len(text.encode("utf-8")) / 1e6 / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=200, help="corpus size in MB (default 200)")
    ap.add_argument("--dir", default=None, help="work folder (default: a temporary one, removed afterwards)")
    ap.add_argument("--threads", type=int, default=None, help="encoder threads (default: all cores)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument(
        "--from_text",
        default=None,
        metavar="FILE",
        help="the corpus is copies of FILE up to --mb MB, one document (default: synthetic stories)",
    )
    ap.add_argument(
        "--stages",
        action="store_true",
        help="also time each stage of prepare alone, one thread, in CPU seconds",
    )
    args = ap.parse_args()

    work = Path(args.dir or tempfile.mkdtemp(prefix="hilt-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    src, cache_dir = work / ("copies.txt" if args.from_text else "stories.txt"), work / "cache"
    separator = None if args.from_text else "blank"
    load_before = os.getloadavg()
    try:
        t0 = time.perf_counter()
        if args.from_text:
            size = write_copies(src, Path(args.from_text), args.mb)
            what = f"copies of {args.from_text}"
        else:
            size = write_corpus(src, args.mb)
            what = "synthetic stories"
        print(f"corpus: {size / 1e6:,.1f} MB of {what} in {src} ({time.perf_counter() - t0:.0f} s)")

        prepare = ["--text_file", str(src), "--cache_dir", str(cache_dir)]
        prepare += ["--doc_separator", separator] if separator else []
        prepare += ["--threads", str(args.threads)] if args.threads else []
        cold_wall, cold_cpu, cold_rss, _ = run_prepare(prepare)
        warm_wall, _, warm_rss, warm_out = run_prepare(prepare)
        assert "Up to date" in warm_out, warm_out

        tok = Tokenizer.load()
        start = time.perf_counter()
        cache = open_cache(src, tok, cache_dir=cache_dir, doc_separator=separator, log=None)
        hit_ms = (time.perf_counter() - start) * 1e3
        # what a training run pays on top before it reads the cache (hilt prepare itself never imports torch)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import hilt.cli, hilt.training.run"], check=True)
        import_s = time.perf_counter() - start
        meta = cache.meta

        # the cache's first stories equal a one-shot encode of them
        with open(src, "rb") as f:
            sample = f.read(20_000_000).decode("utf-8", errors="ignore")
        expected: list[int] = []
        if separator:  # the first stories, <EOS> between them
            for i, story in enumerate(sample[:2_000_000].split("\n\n")[:-1]):
                expected += ([tok.eos_id] if i else []) + tok.encode(story.strip("\r\n"))
        else:  # the text up to a safe cut (see hilt.data.corpus) has the first ids of the whole text
            *_, last = GPT2_LINE_CUT.finditer(sample, 0, 2_000_000)
            expected = tok.encode(sample[: last.end()])
        assert cache.tokens[: len(expected)].tolist() == expected, "cache differs from a one-shot encode"

        stages = stage_seconds(src, tok) if args.stages else {}
        encode = piece_encoder(tok)[0]
        tiktoken_rate = encoder_rate(lambda text: encode([text]), sample)
        hf_rate = encoder_rate(tok.encode, sample[:2_000_000])
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    # only now: torch in this process would raise the children's peak RSS (Linux carries it over exec)
    print(cpu_kind())

    figures = {
        "corpus_mb": size / 1e6,
        "tokens": meta["n_tokens"],
        "documents": meta["n_documents"],
        "threads": meta["threads"],
        "cold_prepare_s": cold_wall,
        "cold_prepare_mb_s": size / 1e6 / cold_wall,
        "start_up_and_finish_s": cold_wall - meta["build_seconds"],
        "tokenizing_pass_mb_s": size / 1e6 / meta["build_seconds"],
        "cold_cpu_s": cold_cpu,
        "cold_mb_per_cpu_s": size / 1e6 / cold_cpu,
        "cold_peak_rss_mb": cold_rss,
        "warm_prepare_s": warm_wall,
        "warm_peak_rss_mb": warm_rss,
        "python_import_s": import_s,
        "cache_hit_open_ms": hit_ms,
        "tiktoken_1_thread_mb_s": tiktoken_rate,
        "tokenizers_1_thread_mb_s": hf_rate,
        "load_average_before": load_before[0],
        "load_average_after": load_after[0],
    }
    print(
        f"tokens: {meta['n_tokens']:,} in {meta['n_documents']:,} document(s) ({meta['encoder']}, "
        f"{meta['threads']} threads)"
    )
    print(
        f"first prepare: {cold_wall:.1f} s = {figures['cold_prepare_mb_s']:.1f} MB/s end to end "
        f"({figures['tokenizing_pass_mb_s']:.1f} MB/s in the tokenizing pass, {cold_wall - meta['build_seconds']:.1f} s "
        f"before and after it), peak RSS {cold_rss:,.0f} MB; "
        f"{cold_cpu:.1f} CPU-seconds = {figures['cold_mb_per_cpu_s']:.1f} MB per CPU-second"
    )
    print(
        f"second prepare (cache hit): {warm_wall:.2f} s in a fresh process (no torch import); open_cache itself "
        f"{hit_ms:.1f} ms; peak RSS {warm_rss:,.0f} MB; starting Python and importing hilt.training.run (torch), as "
        f"training does: {import_s:.2f} s"
    )
    print(f"bare encoders, one thread: tiktoken {tiktoken_rate:.1f} MB/s, tokenizers {hf_rate:.1f} MB/s")
    if stages:
        print(
            "each stage alone, one thread, CPU seconds: "
            + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
        )
        figures["stage_cpu_s"] = stages
    print(
        f"load average (1 min) before/after: {load_before[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} cores"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
