"""Token ids for a whole corpus, on all cores: an encoder for text pieces, and the pipeline that runs it over a
``Corpus`` in order, puts ``<EOS>`` between documents and hands the ids to a writer.

For the shipped GPT-2 tokenizer the encoder is tiktoken (Rust, GIL released, ~10x the ids/s of Hugging Face
``tokenizers`` for this BPE), built offline from the same vocab.json and checked against ``Tokenizer.encode`` on a
probe when it is built; other tokenizers use ``Tokenizer.encode_batch``. Pieces are encoded on a thread pool and
written in their original order, so the result is independent of the thread count.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from array import array
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from hilt.data.corpus import Corpus, Piece
from hilt.data.tokenizer import Tokenizer, gpt2_files_dir
from hilt.errors import UserError

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# every kind of regex piece, special tokens, unicode whitespace and scripts: both encoders must agree on it
PROBE = (
    "Hello world! It's 2024: we'll see, they're 'quoted'.\n\n\n  indented\tTab\r\nCRLF <EOS> and<PAD>x \u00a0nbsp"
    " \u3000ideo \u2028sep 日本語のテキスト, émigré naïve café, emoji 🙂🚀, numbers 1234567 3.14159 ...!!?? \n"
)

Encoder = Callable[[list[str]], list[np.ndarray]]  # texts -> uint32 ids of each; thread-safe, GIL released


def uses_gpt2_pretokenizer(tokenizer_dir: str | Path | None) -> bool:
    """The shipped tokenizer and vocab.json + merges.txt folders get GPT-2's byte-level regex (see
    Tokenizer.load); a tokenizer.json may do anything."""
    return tokenizer_dir is None or not (Path(tokenizer_dir) / "tokenizer.json").is_file()


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte -> printable character map used in vocab.json
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _tiktoken_gpt2(tokenizer: Tokenizer) -> Encoder | None:
    try:
        import tiktoken
    except ImportError:
        return None
    # vocab.json spells each byte as one printable character; translate maps them back to chr(byte) in C and
    # latin-1 turns those into the bytes (measured 0.15 -> 0.08 s of start-up against a generator per token)
    to_bytes = {ord(ch): b for b, ch in _bytes_to_unicode().items()}
    vocab = json.loads((gpt2_files_dir() / "vocab.json").read_text(encoding="utf-8"))
    ranks = {token.translate(to_bytes).encode("latin-1"): rank for token, rank in vocab.items()}
    specials = {"<PAD>": tokenizer.pad_id, "<BOS>": tokenizer.bos_id, "<EOS>": tokenizer.eos_id}
    enc = tiktoken.Encoding("hilt-gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    if enc.encode(PROBE, allowed_special="all") != tokenizer.encode(PROBE):
        print("warning: tiktoken disagrees with the GPT-2 tokenizer; using the slower one", file=sys.stderr)
        return None

    def encode_many(texts: list[str]) -> list[np.ndarray]:
        # literal "<EOS>" in a text becomes the special id, exactly as in Tokenizer.encode
        if len(texts) > 1 and not any(s in t for t in texts for s in specials):
            # one call for many short texts (one call each costs more in GIL hand-offs than in encoding): special
            # tokens split the text before the regex runs, so "a<EOS>b" encodes as a, <EOS>, b; cut at the <EOS>s
            ids = enc.encode_to_numpy("<EOS>".join(texts), allowed_special="all")
            parts = np.split(ids, np.flatnonzero(ids == tokenizer.eos_id))
            assert len(parts) == len(texts)
            return [parts[0], *(p[1:] for p in parts[1:])]
        return [enc.encode_to_numpy(t, allowed_special="all") for t in texts]

    return encode_many


def piece_encoder(tokenizer: Tokenizer, tokenizer_dir: str | Path | None = None) -> tuple[Encoder, str]:
    """The fastest encoder that gives exactly ``tokenizer.encode``'s ids, and its name."""
    if tokenizer_dir is None:
        fast = _tiktoken_gpt2(tokenizer)
        if fast is not None:
            return fast, "tiktoken"
    # encode_batch releases the GIL, so the thread pool still spreads pieces over the cores
    return lambda texts: [
        np.asarray(ids, dtype=np.uint32) for ids in tokenizer.encode_batch(texts)
    ], "tokenizers"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 for GPT-2's 50,260 ids (half the disk and page cache of int32); uint32 past 65,536."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class EncodeResult:
    n_tokens: int
    doc_starts: np.ndarray  # int64 token offset of every document's first token
    complete: bool  # False when max_tokens stopped the pass early
    seconds: float
    bytes_read: int


def encode_corpus(
    corpus: Corpus,
    encode: Encoder,
    write: Callable[[np.ndarray], None],
    *,
    eos_id: int,
    dtype: np.dtype,
    max_tokens: int = 0,
    threads: int | None = None,
    progress: bool = True,
) -> EncodeResult:
    """Encodes every piece of ``corpus`` (in order, on ``threads`` threads) and passes the ids, as ``dtype``, to
    ``write``; one ``eos_id`` goes between consecutive documents. With ``max_tokens`` > 0 it stops once that many
    ids are written (the result then holds at least that many)."""
    threads = threads or default_threads()
    t0 = time.perf_counter()
    doc_starts = array("q")  # 8 bytes per document, not a Python int each: a million stories stay small
    n_tokens = 0
    eos = np.array([eos_id], dtype=dtype)
    bar = tqdm(
        total=corpus.total_bytes,
        unit="B",
        unit_scale=True,
        desc=f"Tokenizing {Path(corpus.spec).name}",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    )
    pending: deque = deque()  # (pieces, future of their ids), oldest first

    def write_oldest() -> None:
        nonlocal n_tokens
        pieces, future = pending.popleft()
        for piece, ids in zip(pieces, future.result(), strict=True):
            if piece.new_doc:
                if doc_starts:  # <EOS> between documents, so the model learns where one ends
                    write(eos)
                    n_tokens += 1
                doc_starts.append(n_tokens)
            write(ids.astype(dtype, copy=False))
            n_tokens += len(ids)

    batch: list[Piece] = []
    batch_chars = 0
    pieces = corpus.pieces()
    with ThreadPoolExecutor(threads, thread_name_prefix="hilt-encode") as pool:
        try:
            for piece in itertools.chain(pieces, [None]):
                if piece is not None:
                    batch.append(piece)
                    batch_chars += len(piece.text)
                # short documents travel together: one task per ~piece_chars keeps the pool's overhead negligible
                if batch and (piece is None or batch_chars >= corpus.piece_chars):
                    pending.append((batch, pool.submit(encode, [p.text for p in batch])))
                    batch, batch_chars = [], 0
                # a short queue keeps every core busy while bounding memory
                while len(pending) > 2 * threads or (piece is None and pending):
                    write_oldest()
                    if max_tokens and n_tokens >= max_tokens:
                        break
                bar.update(corpus.bytes_read - bar.n)
                if max_tokens and n_tokens >= max_tokens:
                    break
            complete = not pending and not batch and (piece is None)
        finally:
            for _, future in pending:
                future.cancel()
            pieces.close()
            bar.close()
    corpus.warn_bad_bytes()
    if not corpus.saw_text:
        what = "only whitespace" if corpus.bytes_read else "no text"
        raise UserError(
            f"{corpus.spec} contains {what}" + ("" if complete else f" in its first {n_tokens} tokens")
        )
    return EncodeResult(
        n_tokens=n_tokens,
        doc_starts=np.frombuffer(doc_starts, dtype=np.int64).copy() if doc_starts else np.zeros(1, np.int64),
        complete=complete,
        seconds=time.perf_counter() - t0,
        bytes_read=corpus.bytes_read,
    )


def tokenize_corpus(corpus: Corpus, tokenizer: Tokenizer, tokenizer_dir=None, **kwargs) -> np.ndarray:
    """All ids of ``corpus`` in memory (no cache): for small inputs and tests."""
    encode, _ = piece_encoder(tokenizer, tokenizer_dir)
    parts: list[np.ndarray] = []
    dtype = token_dtype(tokenizer.vocab_size)
    encode_corpus(
        corpus, encode, parts.append, eos_id=tokenizer.eos_id, dtype=dtype, progress=False, **kwargs
    )
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
