"""What ``--text_file`` names: the files it resolves to (a file, a folder, a glob), each checked readable and
text before anything reads it, and the helpers the readers share for telling a user what is wrong with a file.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import stat
from pathlib import Path

from hilt.errors import UserError

DIR_SUFFIXES = (".txt", ".jsonl", ".parquet")
BLOCK_BYTES = 4 << 20  # read size

# first bytes of common binary formats -> what to call them in the error message
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"%PDF-", "a PDF document"),
    (b"\x1f\x8b", "gzip-compressed data; decompress it first"),
    (b"BZh", "bzip2-compressed data; decompress it first"),
    (b"\xfd7zXZ\x00", "xz-compressed data; decompress it first"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed data; decompress it first"),
    (b"PK\x03\x04", "a zip archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7z archive"),
    (b"\x7fELF", "an executable"),
    (b"PAR1", "a Parquet file; give it the .parquet suffix"),
    (b"SQLite format 3\x00", "an SQLite database"),
    (b"\xff\xfe", "UTF-16 text; convert it to UTF-8"),
    (b"\xfe\xff", "UTF-16 text; convert it to UTF-8"),
)
_HEAD_BYTES = 8192


# --- finding and checking the files ---------------------------------------------------------------------------


def resolve_sources(spec: str | Path) -> list[Path]:
    """The files ``--text_file`` names, in a fixed order: a file, a folder (its .txt/.jsonl/.parquet files, hidden
    folders skipped, sorted by path) or a glob (sorted). A folder that cannot be listed, or a file whose kind cannot
    be checked, is an error: skipping it would train on part of the input without a word."""
    spec = str(spec)
    path = Path(spec)
    if not path.exists() and any(c in spec for c in "*?["):
        _check_glob_folders(spec)
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if _is_file(Path(p)))
        if not files:
            raise UserError(f"no files match {spec}")
    elif not path.exists():
        raise UserError(f"text file not found: {spec}")
    elif path.is_dir():
        files = _folder_files(path)
        if not files:
            raise UserError(f"text file is a directory with no .txt, .jsonl or .parquet files in it: {spec}")
    else:
        files = [path]
    return [f.resolve() for f in files]


def _unreadable_folder(e: OSError) -> None:
    raise UserError(f"cannot read the folder {e.filename}: {e.strerror}")


def _is_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except FileNotFoundError:  # a dangling link: nothing there to read
        return False
    except OSError as e:  # e.g. a folder without search (x) permission: its files cannot even be looked at
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def _folder_files(root: Path) -> list[Path]:
    # os.walk instead of Path.rglob: rglob skips a folder it may not list without a word
    files = []
    for folder, subfolders, names in os.walk(root, onerror=_unreadable_folder):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]  # .hilt_cache, .git: not input
        for name in names:
            if (
                not name.startswith(".")
                and Path(name).suffix in DIR_SUFFIXES
                and _is_file(Path(folder, name))
            ):
                files.append(Path(folder, name))
    return sorted(files)


def _check_glob_folders(spec: str) -> None:
    """Lists every folder the glob lists (those before a wildcard part, and all of them under ``**``), because
    glob.glob silently skips the ones it may not read."""
    parts = Path(spec).parts
    for depth, part in enumerate(parts):
        if any(c in part for c in "*?[") or (depth and parts[depth - 1] == "**"):
            folders = glob.glob(os.path.join(*parts[:depth], ""), recursive=True) if depth else ["."]
            for folder in folders:
                try:
                    with os.scandir(folder):
                        pass
                except OSError as e:
                    raise UserError(f"cannot read the folder {folder.rstrip(os.sep)}: {e.strerror}") from None


def source_kind(path: Path) -> str:
    return {".jsonl": "jsonl", ".parquet": "parquet"}.get(path.suffix.lower(), "text")


def default_cache_dir(spec: str | Path) -> Path:
    """``.hilt_cache`` in the folder that holds the input (for a glob, its leading folders without wildcards)."""
    spec = str(spec)
    if not Path(spec).exists() and any(c in spec for c in "*?["):
        parts = Path(spec).parts
        fixed = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
        return Path(*parts[:fixed]).resolve() / ".hilt_cache" if fixed else Path(".hilt_cache").resolve()
    return Path(spec).resolve().parent / ".hilt_cache"


def check_text_head(path: Path, head: bytes) -> None:
    """Refuses files whose first bytes show they are not text (an image, an archive, UTF-16, NUL bytes)."""
    if head.startswith(b"BZh") and not head[3:4].isdigit():
        head_kind = None  # text that merely starts with "BZh"
    else:
        head_kind = next((what for magic, what in _MAGIC if head.startswith(magic)), None)
    if head_kind:
        raise UserError(f"{path} looks binary ({head_kind}), not UTF-8 text")
    if b"\x00" in head:
        raise UserError(f"{path} looks binary (it contains NUL bytes), not UTF-8 text")
    text = head.decode("utf-8", errors="replace")
    odd = sum(1 for c in text if c == "\ufffd" or (c < " " and c not in "\t\n\r\f\v\x1b"))
    if len(text) >= 64 and odd > 0.3 * len(text):
        raise UserError(f"{path} looks binary ({odd} of its first {len(text)} characters are not text)")


def read_head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(_HEAD_BYTES)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK_BYTES):
            h.update(block)
    return h.hexdigest()


def json_error(e: json.JSONDecodeError) -> str:
    """What is wrong with a JSON line, and where. ``e.msg`` alone can end mid-sentence ("Invalid control
    character at"): the position is kept in separate fields."""
    what = f"{e.msg.removesuffix(' at')} at column {e.colno}"
    if e.msg.startswith("Invalid control character"):
        what += f" ({e.doc[e.pos]!r}: inside a string it must be escaped)"
    return what


_JSON_KINDS = {
    dict: "an object",
    list: "a list",
    str: "a string",
    bool: "a boolean",
    int: "a number",
    float: "a number",
}


def json_kind(value: object) -> str:
    return "null" if value is None else _JSON_KINDS.get(type(value), type(value).__name__)
