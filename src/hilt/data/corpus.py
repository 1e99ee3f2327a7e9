"""Corpus readers: what ``--text_file`` names, read as a stream of text pieces ready to tokenize.

``--text_file`` may be a text file, a folder of ``.txt``/``.jsonl``/``.parquet`` files, a glob, a ``.jsonl`` file
(one JSON object per line, the text in ``--text_field``) or a ``.parquet`` file (a text column, read with pyarrow).
Files are read in blocks, never whole, so memory does not grow with the corpus.

Documents: a ``.jsonl`` record or ``.parquet`` row is one document; in text files ``--doc_separator`` splits
documents (``blank``: one or more blank lines, ``line``: every line, anything else: that literal string, with
``\\n`` and ``\\t`` understood); without it a whole file is one document. Separator documents and records lose the
line breaks at their two ends; documents with no visible character are dropped. The tokenizer stage puts one
``<EOS>`` between consecutive documents.

Pieces: a document longer than ``piece_chars`` is handed on in pieces cut where the cut provably does not change
GPT-2's tokens. GPT-2's pre-tokenizer regex
``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`` never puts a non-whitespace
character and a following whitespace character in one piece (only the optional *leading* space may join a word),
so a cut between them is a piece boundary of the whole text; the scan of the left part ends the same way (no
pattern looks beyond that boundary except the lookahead of whitespace runs, which start after it) and the scan of
the right part starts where the whole-text scan restarts. BPE merges never cross pieces, so the ids are identical.
Cuts go at line ends (``x|\\n``) and fall back to spaces only inside very long lines. A cut right after a newline
is *not* safe: ``a\\n\\nb`` pre-tokenizes as ``\\n``, ``\\n`` but its left half ``a\\n\\n`` as ``\\n\\n``. For other
tokenizers (a ``tokenizer.json``) no such proof exists; pieces are then cut at line starts (``\\n|x``).
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import json
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hilt.data.sources import (
    BLOCK_BYTES,
    check_text_head,
    file_sha256,
    json_error,
    json_kind,
    read_head,
    resolve_sources,
    source_kind,
)
from hilt.errors import UserError

# target piece handed to the encoder: big enough to amortise the call, small enough to balance the cores
PIECE_CHARS = 64 << 10

# safe cuts (see the module docstring); the cut position is match.end()
GPT2_LINE_CUT = re.compile(r"\S(?=[\r\n])")
GPT2_SPACE_CUT = re.compile(r"\S(?=[ \t\r\n])")
LINE_START_CUT = re.compile(r"\n(?=\S)")

# --- UTF-8 decoding that counts what it replaces --------------------------------------------------------------

_bad_bytes = threading.local()


def _count_and_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    # one U+FFFD per maximal invalid subsequence, like errors="replace"; count the bytes it stands for
    _bad_bytes.n += err.end - err.start
    return "\ufffd", err.end


@functools.cache
def _register_counting_handler() -> None:
    # a codec error handler is process-wide: registered once, when the first text is decoded, not at import
    codecs.register_error("hilt-count-replace", _count_and_replace)


def decode_counting(data: bytes) -> tuple[str, int]:
    """``data`` decoded as UTF-8 with invalid bytes replaced by U+FFFD, and the number of invalid bytes."""
    _register_counting_handler()
    _bad_bytes.n = 0
    return data.decode("utf-8", errors="hilt-count-replace"), _bad_bytes.n


# --- documents and pieces ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Separator:
    pattern: re.Pattern
    guard: int  # characters to keep back at a block end: a literal separator may be cut in two there


def parse_separator(spec: str | None) -> Separator | None:
    if spec is None or spec == "" or spec == "none":
        return None
    if spec == "blank":
        return Separator(re.compile(r"\n(?:[ \t\r\f\v]*\n)+"), 0)
    if spec == "line":
        return Separator(re.compile(r"\n"), 0)
    literal = spec.replace("\\n", "\n").replace("\\t", "\t").replace("\\r", "\r")
    return Separator(re.compile(re.escape(literal)), len(literal))


@dataclass(frozen=True)
class Piece:
    text: str
    new_doc: bool  # the first piece of a document


class DocumentSplitter:
    """Cuts one file's text, fed block by block, into documents (at ``separator``) and documents into pieces of
    about ``piece_chars`` at safe cuts. Holds back at most ``hold_chars`` of an unfinished document."""

    def __init__(
        self,
        separator: Separator | None,
        *,
        strip: bool,
        gpt2_cuts: bool,
        piece_chars: int = PIECE_CHARS,
        hold_chars: int = BLOCK_BYTES,
    ):
        self.separator = separator
        self.strip = strip
        self.cuts = (GPT2_LINE_CUT, GPT2_SPACE_CUT) if gpt2_cuts else (LINE_START_CUT,)
        self.piece_chars = piece_chars
        self.hold_chars = max(hold_chars, 4 * piece_chars)
        self.open = ""  # text of the current document not handed on yet
        self.started = False  # the current document has produced a piece

    def feed(self, text: str, final: bool = False) -> Iterator[Piece]:
        buf = self.open + text
        pos = 0
        if self.separator is not None:
            for m in self.separator.pattern.finditer(buf):
                if not final and m.end() == len(buf):
                    break  # a run of blank lines may go on in the next block
                yield from self._emit(buf[pos : m.start()], ends=True)
                pos = m.end()
        rest = buf[pos:]
        if final:
            self.open = ""
            yield from self._emit(rest, ends=True)
            return
        if len(rest) > self.hold_chars:  # a long document: hand on its head now
            limit = len(rest) - (self.separator.guard if self.separator else 0)
            cut = self._last_cut(rest, limit)
            if cut:
                yield from self._emit(rest[:cut], ends=False)
                rest = rest[cut:]
        self.open = rest

    def _emit(self, text: str, ends: bool) -> Iterator[Piece]:
        if self.strip:
            text = text if self.started else text.lstrip("\r\n")
            text = text.rstrip("\r\n") if ends else text
        if text and (self.started or not ends or not text.isspace()):
            for piece in self._pieces(text):
                yield Piece(piece, new_doc=not self.started)
                self.started = True
        if ends:
            self.started = False

    def _pieces(self, text: str) -> Iterator[str]:
        pos = 0
        while len(text) - pos > self.piece_chars:
            cut = self._next_cut(text, pos + self.piece_chars)
            if cut is None:
                break
            yield text[pos:cut]
            pos = cut
        yield text[pos:]

    def _next_cut(self, text: str, start: int) -> int | None:
        # prefer a line end; fall back to a space only when the line end is far away
        reach = start + 3 * self.piece_chars
        for cut in self.cuts:
            m = cut.search(text, start, reach)
            if m:
                return m.end()
        m = self.cuts[-1].search(text, start)
        return m.end() if m else None

    def _last_cut(self, text: str, limit: int) -> int | None:
        """The last cut before ``limit``: a line cut in the last 4 pieces' worth of text, else a space cut there,
        else the same over the whole text. A cut depends only on its own two characters, so the last one in a
        short tail is the last one in any longer stretch: the tail grows 8-fold until it holds one (iterating every
        line end of 256K characters in Python cost 30 ms per 4 MB block, with the GIL held)."""
        window = 4 * self.piece_chars
        for floor in (max(0, limit - window), 0):
            for cut in self.cuts:
                span = 1024
                while True:
                    lo = max(floor, limit - span)
                    last = None
                    for m in cut.finditer(text, lo, limit):
                        last = m.end()
                    if last:
                        return last
                    if lo == floor:
                        break
                    span *= 8
        return None


class Corpus:
    """Every file of ``spec`` as one stream of pieces (``pieces()``), with what was learnt while reading it:
    ``bytes_read`` (for progress), ``digests`` (SHA-256 per file, folded into the same pass), ``bad_bytes``
    (invalid UTF-8 per file) and ``saw_text`` (anything but whitespace at all)."""

    def __init__(
        self,
        spec: str | Path,
        *,
        doc_separator: str | None = None,
        text_field: str = "text",
        gpt2_cuts: bool = True,
        block_bytes: int = BLOCK_BYTES,
        piece_chars: int = PIECE_CHARS,
        warn=None,
    ):
        self.spec = str(spec)
        self.files = resolve_sources(spec)
        self.separator = parse_separator(doc_separator)
        self.text_field = text_field
        self.gpt2_cuts = gpt2_cuts
        self.block_bytes = block_bytes
        self.piece_chars = piece_chars
        self.warn = warn  # a file for warnings; None = sys.stderr at the time of writing
        self.bytes_read = 0
        self.digests: dict[Path, str] = {}
        self.bad_bytes: dict[Path, int] = {}
        self.saw_text = False
        if all(p.stat().st_size == 0 for p in self.files):
            raise UserError(f"text file is empty: {spec}")
        for path in self.files:
            if source_kind(path) != "parquet":
                check_text_head(path, read_head(path))

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    def pieces(self) -> Iterator[Piece]:
        for path in self.files:
            kind = source_kind(path)
            reader = {"text": self._text_pieces, "jsonl": self._jsonl_pieces, "parquet": self._parquet_pieces}
            for piece in reader[kind](path):
                if not self.saw_text and not piece.text.isspace():
                    self.saw_text = True
                yield piece

    def warn_bad_bytes(self) -> None:
        """One warning line per file that had invalid UTF-8 (in the part read so far)."""
        for path, n in self.bad_bytes.items():
            if n:
                print(
                    f"warning: {path}: {n} invalid UTF-8 byte(s) replaced with U+FFFD",
                    file=self.warn or sys.stderr,
                )

    def _splitter(self, separator: Separator | None, strip: bool) -> DocumentSplitter:
        return DocumentSplitter(
            separator,
            strip=strip,
            gpt2_cuts=self.gpt2_cuts,
            piece_chars=self.piece_chars,
            hold_chars=self.block_bytes,
        )

    def _text_pieces(self, path: Path) -> Iterator[Piece]:
        splitter = self._splitter(self.separator, strip=self.separator is not None)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="hilt-count-replace")
        digest = hashlib.sha256()
        bad = 0
        with open(path, "rb") as f:
            while True:
                block = f.read(self.block_bytes)
                digest.update(block)
                self.bytes_read += len(block)
                _bad_bytes.n = 0
                text = decoder.decode(block, final=not block)
                bad += _bad_bytes.n
                self.bad_bytes[path] = bad
                yield from splitter.feed(text, final=not block)
                if not block:
                    break
        self.digests[path] = digest.hexdigest()

    def _jsonl_pieces(self, path: Path) -> Iterator[Piece]:
        digest = hashlib.sha256()
        bad = 0
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                digest.update(raw)
                self.bytes_read += len(raw)
                line, n_bad = decode_counting(raw)
                bad += n_bad
                self.bad_bytes[path] = bad
                if not line.strip():
                    continue
                try:
                    record = json.loads(line.rstrip("\r\n"))  # else an unclosed string ends in a "bad" \n
                except json.JSONDecodeError as e:
                    raise UserError(f"{path} line {lineno} is not valid JSON: {json_error(e)}") from None
                if not isinstance(record, dict):
                    raise UserError(
                        f"{path} line {lineno} is {json_kind(record)}, not a JSON object with a "
                        f"{self.text_field!r} field"
                    )
                if self.text_field not in record:
                    raise UserError(
                        f"{path} line {lineno} has no text field {self.text_field!r} "
                        f"(found: {', '.join(sorted(record)) or 'no fields'}); choose one with --text_field"
                    )
                text = record[self.text_field]
                if not isinstance(text, str):
                    raise UserError(
                        f"{path} line {lineno}: field {self.text_field!r} holds {json_kind(text)}, not a "
                        f"string; choose the text field with --text_field"
                    )
                yield from self._splitter(None, strip=True).feed(text, final=True)
        self.digests[path] = digest.hexdigest()

    def _parquet_pieces(self, path: Path) -> Iterator[Piece]:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError("reading .parquet files needs pyarrow: pip install pyarrow") from None
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path} is not a readable Parquet file ({e})") from None
        schema = pf.schema_arrow
        if self.text_field not in schema.names:
            raise UserError(
                f"{path} has no column {self.text_field!r} (columns: {', '.join(schema.names)}); "
                f"choose one with --text_field"
            )
        kind = schema.field(self.text_field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise UserError(f"{path}: column {self.text_field!r} holds {kind}, not text")
        size, rows, done = path.stat().st_size, max(1, pf.metadata.num_rows), 0
        start = self.bytes_read
        for batch in pf.iter_batches(batch_size=1024, columns=[self.text_field]):
            for text in batch.column(0).to_pylist():
                if text:
                    yield from self._splitter(None, strip=True).feed(text, final=True)
            done += batch.num_rows
            self.bytes_read = start + size * done // rows
        # pyarrow reads the file by seeking, not front to back, so its hash is a separate (fast) pass
        self.digests[path] = file_sha256(path)
