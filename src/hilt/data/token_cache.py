"""The token cache: a corpus is tokenized once into a flat file of ids that later runs memory-map and use at once.

Files in the cache folder (``--cache_dir``; default ``.hilt_cache/`` in the folder that holds the input), for one
input and one set of reader settings ``<name>-<key>``:

    <name>-<key>.json                metadata (format below); written last, by rename: the commit point
    <name>-<key>.<build>.tokens      the ids, raw, dtype given in the metadata ("<u2" for GPT-2)
    <name>-<key>.<build>.docs.npy    int64 offset of every document's first token

``key`` hashes the input's absolute paths, the tokenizer's identity and the reader settings, so another tokenizer
or separator gets its own cache. The metadata records each input file's size, modification time and SHA-256
(computed in the tokenizing pass itself), and a BLAKE2b checksum of the ids and of the document offsets as they were
written. A later run reuses the cache when the inputs' sizes and times match; an input whose time changed but whose
size did not is hashed again (a read, no tokenizing) and, if its content is the same, kept. Every open then checks
the cache's own files against their checksums and the ids against the vocabulary (~0.9 GB/s, one pass over the
mapping), because a cache file edited or damaged in place keeps its size: without the check it would train on the
wrong ids or fail with a traceback on every run. Anything else rebuilds, with one line saying why. A killed build
leaves only a hidden ``.tmp`` file that nothing reads: the ids and document files are complete before the metadata
that names them replaces the old one.

With ``max_tokens`` > 0 a build stops once it has that many ids (``complete: false``); a later run that needs more
rebuilds, one that needs fewer reuses any cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hilt.data.corpus import Corpus
from hilt.data.encode import (
    default_threads,
    encode_corpus,
    piece_encoder,
    token_dtype,
    uses_gpt2_pretokenizer,
)
from hilt.data.sources import default_cache_dir, file_sha256, resolve_sources, source_kind
from hilt.data.tokenizer import Tokenizer
from hilt.errors import UserError
from hilt.files import atomic_write, write_error

CACHE_VERSION = 1
_STALE_TMP_SECONDS = 600  # a build in progress rewrites its .tmp file constantly; older ones are leftovers
# the fastest strong hash in hashlib here: ~0.9 GB/s on one core (SHA-256 is no faster, MD5 half as fast)
CHECKSUM = "blake2b-128"
_HASH_BYTES = 8 << 20  # per update: Python's per-call cost vanishes, the chunk stays in the CPU's cache


@dataclass
class TokenCache:
    tokens: np.ndarray  # (n_tokens,) memory-mapped ids
    doc_starts: np.ndarray  # (n_documents,) int64 offset of each document's first token
    meta: dict
    meta_path: Path
    built: bool  # this call tokenized the input (False: an existing cache was reused)


def open_cache(
    spec: str | Path,
    tokenizer: Tokenizer,
    *,
    tokenizer_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    doc_separator: str | None = None,
    text_field: str = "text",
    max_tokens: int = 0,
    build: bool = True,
    progress: bool = True,
    threads: int | None = None,
    log: Callable[[str], None] | None = print,
    **corpus_options,
) -> TokenCache:
    """The tokens of ``spec`` (all of them, or at least the first ``max_tokens``) from the cache, tokenizing the
    input first when no valid cache exists. ``build=False`` only reads (for processes that wait on another)."""
    log = log or (lambda _: None)
    files = resolve_sources(spec)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir(spec)
    gpt2_cuts = uses_gpt2_pretokenizer(tokenizer_dir)
    settings = {
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "dtype": token_dtype(tokenizer.vocab_size).str,
        "doc_separator": doc_separator or None,
        "text_field": text_field if any(source_kind(f) != "text" for f in files) else None,
        "cuts": "gpt2" if gpt2_cuts else "line-start",
    }
    identity = json.dumps({"version": CACHE_VERSION, "files": [str(f) for f in files], "settings": settings})
    stem = files[0].stem if len(files) == 1 else Path(str(spec).rstrip("/")).name
    base = f"{re.sub(r'[^A-Za-z0-9._-]+', '_', stem)[:40] or 'corpus'}-{hashlib.sha256(identity.encode()).hexdigest()[:12]}"
    meta_path = cache_dir / f"{base}.json"

    meta = _read_meta(meta_path)
    try:
        reason = _stale_reason(meta, meta_path, files, settings, max_tokens)
    except (KeyError, TypeError, ValueError):  # metadata edited or damaged by hand
        reason = "the cache metadata is unreadable"
    if reason is None:
        cache, reason = _load(meta, meta_path)
        if cache is not None:
            log(f"Token cache: {meta['n_tokens']:,} tokens from {meta_path.with_suffix('')} (memory-mapped)")
            return cache
    if not build:
        raise RuntimeError(f"token cache {meta_path} is not ready: {reason}")
    log(f"Token cache: tokenizing {spec} into {cache_dir} ({reason})")
    corpus = Corpus(
        spec, doc_separator=doc_separator, text_field=text_field, gpt2_cuts=gpt2_cuts, **corpus_options
    )
    cache = _build(corpus, tokenizer, tokenizer_dir, settings, meta_path, base, max_tokens, threads, progress)
    m = cache.meta
    mb = m["source_bytes"] / 1e6
    log(
        f"Token cache: {m['n_tokens']:,} tokens, {m['n_documents']:,} document(s) from {mb:,.1f} MB in "
        f"{m['build_seconds']:.1f} s ({mb / max(m['build_seconds'], 1e-9):.1f} MB/s, {m['encoder']} on "
        f"{m['threads']} threads)"
    )
    return cache


# --- checking -----------------------------------------------------------------------------------------------


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _stale_reason(
    meta: dict | None, meta_path: Path, files: list[Path], settings: dict, max_tokens: int
) -> str | None:
    """Why the cache cannot serve this request, or None when it can (cheap checks first, hashing last)."""
    if meta is None:
        return "no cache yet"
    if meta.get("version") != CACHE_VERSION or meta.get("settings") != settings:
        return "the cache was built by another version or with other settings"
    recorded = meta.get("sources", [])
    if [s["path"] for s in recorded] != [str(f) for f in files]:
        return "the input files changed"
    touched = []
    for rec, path in zip(recorded, files, strict=True):
        st = path.stat()
        if st.st_size != rec["size"]:
            return f"{path.name} changed"
        if st.st_mtime_ns != rec["mtime_ns"]:
            touched.append((rec, path, st.st_mtime_ns))
    tokens_path = meta_path.parent / meta["tokens_file"]
    itemsize = np.dtype(meta["settings"]["dtype"]).itemsize
    if not tokens_path.is_file() or tokens_path.stat().st_size != meta["n_tokens"] * itemsize:
        return "the cached ids are missing or truncated"
    if not (meta_path.parent / meta["docs_file"]).is_file():
        return "the cached document offsets are missing"
    if not meta["complete"] and (max_tokens == 0 or meta["n_tokens"] < max_tokens):
        return f"the cache holds only the first {meta['n_tokens']:,} tokens"
    for rec, path, mtime_ns in touched:  # same size, new time: the content decides
        if rec.get("sha256") is None or file_sha256(path) != rec["sha256"]:
            return f"{path.name} changed"
        rec["mtime_ns"] = mtime_ns
    if touched:
        atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return None


def ids_digest(*parts: np.ndarray) -> str:
    """The checksum of ``parts``' bytes, one after the other: the token cache's checksum of its ids, and what a
    checkpoint records of the ids it was trained on (so the two agree when a run uses the whole cache)."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        part = np.ascontiguousarray(part)
        step = max(1, _HASH_BYTES // part.itemsize)
        for i in range(0, len(part), step):
            h.update(part[i : i + step])
    return h.hexdigest()


def _digest_and_max(tokens: np.ndarray) -> tuple[str, int]:
    """``ids_digest(tokens)`` and the largest id, in one pass over the mapping (each chunk is hashed and scanned
    while it is in the CPU's cache)."""
    h = hashlib.blake2b(digest_size=16)
    top = -1
    step = _HASH_BYTES // tokens.itemsize
    for i in range(0, len(tokens), step):
        chunk = tokens[i : i + step]
        h.update(chunk)
        top = max(top, int(chunk.max()))
    return h.hexdigest(), top


def _changed(name: str) -> str:
    return f"{name} does not match its checksum (changed or damaged since it was built)"


def _load(meta: dict, meta_path: Path) -> tuple[TokenCache | None, str | None]:
    """The cache memory-mapped, once its files match their checksums and its ids fit the vocabulary; otherwise
    (None, why it must be rebuilt)."""
    folder = meta_path.parent
    sums = meta.get("checksums")
    if not isinstance(sums, dict) or sums.get("algorithm") != CHECKSUM:
        return None, "the cache has no checksums (built by an older HILT)"
    try:
        tokens = np.memmap(
            folder / meta["tokens_file"],
            dtype=np.dtype(meta["settings"]["dtype"]),
            mode="r",
            shape=(meta["n_tokens"],),
        )
        digest, top = _digest_and_max(tokens)
        if digest != sums["tokens"]:
            return None, _changed(meta["tokens_file"])
        vocab_size = meta["settings"]["vocab_size"]
        if top >= vocab_size:
            return None, f"{meta['tokens_file']} holds id {top}, outside the vocabulary of {vocab_size}"
        raw = (folder / meta["docs_file"]).read_bytes()
        if hashlib.blake2b(raw, digest_size=16).hexdigest() != sums["docs"]:
            return None, _changed(meta["docs_file"])
        doc_starts = np.load(io.BytesIO(raw))
    # a file gone, or metadata edited by hand
    except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
        return None, f"the cache cannot be read ({type(e).__name__})"
    return TokenCache(tokens, doc_starts, meta, meta_path, built=False), None


# --- building -----------------------------------------------------------------------------------------------


def _build(
    corpus: Corpus,
    tokenizer: Tokenizer,
    tokenizer_dir,
    settings: dict,
    meta_path: Path,
    base: str,
    max_tokens: int,
    threads: int | None,
    progress: bool,
) -> TokenCache:
    folder = meta_path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create the token cache folder {folder} ({e.strerror}); choose one with --cache_dir"
        ) from None
    _remove_leftovers(folder, base)
    stats = [
        (path, path.stat()) for path in corpus.files
    ]  # before reading: a change during the pass shows later
    encode, encoder_name = piece_encoder(tokenizer, tokenizer_dir)
    threads = threads or default_threads()
    dtype = np.dtype(settings["dtype"])
    build_id = secrets.token_hex(4)
    tokens_file, docs_file = f"{base}.{build_id}.tokens", f"{base}.{build_id}.docs.npy"
    tmp = folder / f".{tokens_file}.tmp"
    tokens_hash = hashlib.blake2b(digest_size=16)  # the checksum in the same pass: no second read

    def write(ids: np.ndarray) -> None:
        tokens_hash.update(ids)
        out.write(ids)

    try:
        with open(tmp, "wb") as out:
            result = encode_corpus(
                corpus,
                encode,
                write,
                eos_id=tokenizer.eos_id,
                dtype=dtype,
                max_tokens=max_tokens,
                threads=threads,
                progress=progress and corpus.total_bytes >= 16 << 20,
            )
            out.flush()
            os.fsync(out.fileno())
        # map before the rename: a concurrent build's clean-up may remove this file, the mapping stays valid
        tokens = np.memmap(tmp, dtype=dtype, mode="r", shape=(result.n_tokens,))
        os.replace(tmp, folder / tokens_file)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        # the input is read in this block too: of its OSErrors only a full disk is surely the write's
        if (error := write_error(e, folder / tokens_file, disk_full_only=True)) is not None:
            raise error from None
        raise
    buf = io.BytesIO()
    np.save(buf, result.doc_starts)
    atomic_write(folder / docs_file, lambda f: f.write(buf.getvalue()))
    meta = {
        "format": "hilt-token-cache",
        "version": CACHE_VERSION,
        "settings": settings,
        "input": corpus.spec,
        "sources": [
            {
                "path": str(path),
                "size": st.st_size,
                "mtime_ns": st.st_mtime_ns,
                "sha256": corpus.digests.get(path),  # None for files a max_tokens build did not finish
                "invalid_utf8_bytes": corpus.bad_bytes.get(path, 0),
            }
            for path, st in stats
        ],
        "n_tokens": result.n_tokens,
        "n_documents": len(result.doc_starts),
        "complete": result.complete,
        "tokens_file": tokens_file,
        "docs_file": docs_file,
        "checksums": {
            "algorithm": CHECKSUM,
            "tokens": tokens_hash.hexdigest(),
            "docs": hashlib.blake2b(buf.getvalue(), digest_size=16).hexdigest(),
        },
        "source_bytes": result.bytes_read,
        "build_seconds": round(result.seconds, 3),
        "encoder": encoder_name,
        "threads": threads,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    _remove_old_builds(folder, base, meta_path)
    return TokenCache(tokens, result.doc_starts, meta, meta_path, built=True)


def _remove_leftovers(folder: Path, base: str) -> None:
    """Temporary files of builds that were killed (old enough that no live build still writes them)."""
    now = time.time()
    for tmp in folder.glob(f".{base}.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                tmp.unlink()
        except FileNotFoundError:
            pass


def _remove_old_builds(folder: Path, base: str, meta_path: Path) -> None:
    """Ids and offsets of earlier builds that the metadata no longer names."""
    meta = _read_meta(meta_path) or {}
    keep = {meta.get("tokens_file"), meta.get("docs_file")}
    for path in [*folder.glob(f"{base}.*.tokens"), *folder.glob(f"{base}.*.docs.npy")]:
        if path.name not in keep:
            path.unlink(missing_ok=True)
