"""Corpus readers and the piece pipeline: chunked ids equal one-shot ids, documents, formats, bad input."""

import errno
import gzip
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from hilt.cli import main
from hilt.data.corpus import Corpus
from hilt.data.encode import piece_encoder, tokenize_corpus
from hilt.data.sources import check_text_head, resolve_sources
from hilt.data.tokenizer import Tokenizer, gpt2_files_dir
from hilt.errors import UserError
from tests.conftest import DATA_TXT


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load()


def tricky_text(n: int = 6000, seed: int = 0) -> str:
    """Everything that makes GPT-2's pre-tokenizer depend on context: runs of blank lines, CRLF, mixed spaces and
    tabs, unicode whitespace, contractions, digits, emoji, CJK, literal special tokens."""
    parts = [
        "Hello world.",
        "\n",
        "\n\n",
        "\n\n\n",
        " ",
        "  ",
        "\t",
        "\r\n",
        "It's",
        " we'll",
        "日本語",
        "\u00a0",
        "\u3000",
        "\u2028",
        "🙂",
        "123",
        "<EOS>",
        "x",
        "naïve",
        "...",
        "\x0b",
        "\x0c",
        "\x1c",
        " \n",
        "\n ",
        "café",
        "\ufffd",
    ]
    rng = random.Random(seed)
    return "".join(rng.choice(parts) for _ in range(n))


def write(path, text: str):
    path.write_bytes(text.encode("utf-8"))
    return path


# --- chunked = one-shot -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoder", ["tiktoken", "tokenizers"])
@pytest.mark.parametrize(("piece_chars", "block_bytes"), [(7, 13), (100, 1000), (64 << 10, 4 << 20)])
def test_chunked_ids_equal_encoding_the_whole_text_at_once(tmp_path, tok, encoder, piece_chars, block_bytes):
    text = tricky_text()
    src = write(tmp_path / "t.txt", text)
    tokenizer_dir = None if encoder == "tiktoken" else gpt2_files_dir()  # a folder forces the tokenizers path
    assert piece_encoder(tok, tokenizer_dir)[1] == encoder
    corpus = Corpus(src, piece_chars=piece_chars, block_bytes=block_bytes)
    ids = tokenize_corpus(corpus, tok, tokenizer_dir)
    assert ids.dtype == np.uint16
    assert ids.tolist() == tok.encode(text)


def test_cutting_after_a_newline_would_change_the_ids(tok):
    # why pieces end *before* line breaks: GPT-2 merges a blank-line run differently at the end of a text
    text = "one\n\n\ntwo\n"
    per_line = [i for line in text.splitlines(keepends=True) for i in tok.encode(line)]
    assert per_line != tok.encode(text)


def test_piece_cuts_happen_and_fall_back_to_spaces_in_long_lines(tmp_path, tok):
    text = " ".join(["word"] * 3000)  # one 15 kB line: only space cuts are possible
    corpus = Corpus(write(tmp_path / "t.txt", text), piece_chars=50, block_bytes=64)
    pieces = list(corpus.pieces())
    assert len(pieces) > 100 and all(p.text.endswith("word") for p in pieces[:-1])
    assert [p.new_doc for p in pieces].count(True) == 1
    assert tokenize_corpus(
        Corpus(tmp_path / "t.txt", piece_chars=50, block_bytes=64), tok
    ).tolist() == tok.encode(text)


@pytest.mark.parametrize("gpt2_cuts", [True, False])
def test_the_last_cut_is_the_last_match_of_a_full_scan(gpt2_cuts):
    from hilt.data.corpus import DocumentSplitter

    splitter = DocumentSplitter(None, strip=False, gpt2_cuts=gpt2_cuts, piece_chars=700)

    def full_scan(
        text, limit
    ):  # the definition: prefer a line cut, in the last 4 pieces' worth, then anywhere
        for lo in (max(0, limit - 4 * 700), 0):
            for cut in splitter.cuts:
                ends = [m.end() for m in cut.finditer(text, lo, limit)]
                if ends:
                    return ends[-1]
        return None

    rng = random.Random(0)
    for seed in range(40):
        # long lines, rare spaces, or none at all: every fallback gets its turn
        words = ["x" * rng.randint(1, 3000) for _ in range(rng.randint(1, 12))]
        text = "".join(w + rng.choice(["\n", " ", "\r\n", "", "\n\n"]) for w in words) + tricky_text(50, seed)
        for limit in (len(text), len(text) // 2, rng.randint(0, len(text))):
            assert splitter._last_cut(text, limit) == full_scan(text, limit)


def test_tiktoken_agrees_with_the_reference_tokenizer_on_real_text(tok):
    text = DATA_TXT.read_text(encoding="utf-8")[:300_000]
    encode, name = piece_encoder(tok)
    assert name == "tiktoken"
    assert encode([text])[0].tolist() == tok.encode(text)


def test_python_whitespace_covers_unicode_white_space():
    # the safe-cut proof needs: not whitespace for Python's regex => not whitespace for the tokenizer's regex
    white_space = [
        *range(0x9, 0xE),
        0x20,
        0x85,
        0xA0,
        0x1680,
        *range(0x2000, 0x200B),
        0x2028,
        0x2029,
        0x202F,
        0x205F,
        0x3000,
    ]
    assert all(re.match(r"\s", chr(c)) for c in white_space)


# --- documents --------------------------------------------------------------------------------------------------


def docs_reference(tok, docs: list[str]) -> list[int]:
    ids: list[int] = []
    for i, doc in enumerate(docs):
        ids += ([tok.eos_id] if i else []) + tok.encode(doc)
    return ids


@pytest.mark.parametrize(
    ("separator", "text", "docs"),
    [
        (
            "blank",
            "Once upon a time.\nThe end.\n\n\nA second story.\r\n  \r\nThird one.\n",
            ["Once upon a time.\nThe end.", "A second story.", "Third one."],
        ),
        ("line", "first line\n\nsecond line\r\nthird", ["first line", "second line", "third"]),
        ("<|endoftext|>", "Story one.\n<|endoftext|>\nStory two.<|endoftext|>", ["Story one.", "Story two."]),
        ("\\n\\n", "a b\n\nc d\n\n\ne f", ["a b", "c d", "e f"]),
    ],
)
def test_separators_put_eos_between_documents(tmp_path, tok, separator, text, docs):
    src = write(tmp_path / "d.txt", text)
    for block_bytes in (3, 4 << 20):  # separators cut in two by block ends are still found
        corpus = Corpus(src, doc_separator=separator, block_bytes=block_bytes, piece_chars=2)
        assert tokenize_corpus(corpus, tok).tolist() == docs_reference(tok, docs)


def test_long_documents_are_cut_into_pieces_without_changing_ids(tmp_path, tok):
    stories = [tricky_text(800, seed).replace("<|endoftext|>", "") for seed in range(4)]
    src = write(tmp_path / "s.txt", "\n<|endoftext|>\n".join(stories))
    corpus = Corpus(src, doc_separator="<|endoftext|>", block_bytes=50, piece_chars=20)
    expected = docs_reference(tok, [s.strip("\r\n") for s in stories])
    assert tokenize_corpus(corpus, tok).tolist() == expected


def test_a_folder_reads_its_text_files_in_order_as_documents(tmp_path, tok):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hilt_cache").mkdir()
    write(tmp_path / "b.txt", "bee\n")
    write(tmp_path / "a.txt", "ay\n")
    write(tmp_path / "sub" / "c.txt", "sea\n")
    write(tmp_path / "notes.md", "not read")
    write(tmp_path / ".hilt_cache" / "x.txt", "hidden")
    assert [p.name for p in resolve_sources(tmp_path)] == ["a.txt", "b.txt", "c.txt"]
    assert tokenize_corpus(Corpus(tmp_path), tok).tolist() == docs_reference(tok, ["ay\n", "bee\n", "sea\n"])
    # a glob picks the same way
    assert [p.name for p in resolve_sources(str(tmp_path / "*.txt"))] == ["a.txt", "b.txt"]


def test_jsonl_records_are_documents(tmp_path, tok):
    records = [
        {"text": "First story.\n", "id": 1},
        {"text": "Second\n\nstory."},
        {"text": "  "},
        {"text": "Third."},
    ]
    src = write(tmp_path / "s.jsonl", "\n".join(json.dumps(r) for r in records) + "\n\n")
    assert tokenize_corpus(Corpus(src), tok).tolist() == docs_reference(
        tok, ["First story.", "Second\n\nstory.", "Third."]
    )
    other = write(tmp_path / "o.jsonl", json.dumps({"story": "Only one."}) + "\n")
    assert tokenize_corpus(Corpus(other, text_field="story"), tok).tolist() == tok.encode("Only one.")


def test_documents_that_spell_special_tokens_keep_their_ids(tmp_path, tok):
    # short documents are encoded together, joined by <EOS>; halves of a special token at their ends, or a whole
    # one inside, must not change what each document encodes to
    records = ["a <EO", "S> b", "c <PAD> d", "<BOS>", "e<", "EOS>f", "plain"]
    src = write(tmp_path / "s.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in records))
    assert tokenize_corpus(Corpus(src), tok).tolist() == docs_reference(tok, records)
    assert tokenize_corpus(Corpus(src), tok, gpt2_files_dir()).tolist() == docs_reference(tok, records)


def test_jsonl_errors_name_the_line(tmp_path, tok):
    bad = write(tmp_path / "bad.jsonl", '{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(UserError, match=r"bad.jsonl line 2 is not valid JSON"):
        tokenize_corpus(Corpus(bad), tok)
    missing = write(tmp_path / "m.jsonl", '{"story": "x", "id": 3}\n')
    with pytest.raises(
        UserError, match=r"line 1 has no text field 'text' \(found: id, story\); choose one with --text_field"
    ):
        tokenize_corpus(Corpus(missing), tok)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            '{"text": 5}',
            "line 2: field 'text' holds a number, not a string; choose the text field with --text_field",
        ),
        ('{"text": null}', "line 2: field 'text' holds null, not a string"),
        ('["a", "b"]', "line 2 is a list, not a JSON object with a 'text' field"),
        (
            '{"text": "tab\there"}',
            "line 2 is not valid JSON: Invalid control character at column 14 ('\\t': inside a string it must be "
            "escaped)",
        ),
        ('{"text": "no end', "line 2 is not valid JSON: Unterminated string starting at column 10"),
        ('{"text": "x"} more', "line 2 is not valid JSON: Extra data at column 15"),
    ],
    ids=["number", "null", "list", "control-character", "unterminated", "extra-data"],
)
def test_jsonl_errors_say_what_is_wrong_in_one_line(tmp_path, capsys, line, message):
    src = write(tmp_path / "bad.jsonl", '{"text": "fine"}\n' + line + "\n")
    assert main(["prepare", "--text_file", str(src), "--cache_dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {src.resolve()} {message}") and err.count("\n") == 1


# --- unreadable input -------------------------------------------------------------------------------------------


REAL_SCANDIR = os.scandir


def deny_listing(monkeypatch, *folders: Path) -> None:
    """os.scandir refuses ``folders`` as it does for a user without read permission on them (root reads any
    folder, so chmod alone shows nothing in a test run as root)."""
    denied = {os.path.abspath(f) for f in folders}

    def scandir(path="."):
        if os.path.abspath(path) in denied:
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return REAL_SCANDIR(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_an_unreadable_folder_of_the_input_is_an_error_not_skipped(tmp_path, monkeypatch, capsys):
    src = tmp_path / "in"
    for folder in ("sub", ".hidden"):
        (src / folder).mkdir(parents=True)
    write(src / "a.txt", "ay\n")
    write(src / "sub" / "b.txt", "bee\n")
    write(src / ".hidden" / "c.txt", "not input\n")
    deny_listing(monkeypatch, src / "sub", src / ".hidden")
    cache = tmp_path / "cache"
    for spec in (src, src / "**" / "*.txt", src / "*" / "*.txt"):
        assert main(["prepare", "--text_file", str(spec), "--cache_dir", str(cache)]) == 2
        assert capsys.readouterr().err == f"error: cannot read the folder {src / 'sub'}: Permission denied\n"
        assert not cache.exists()
    # a hidden folder is not input (.hilt_cache, .git): that it cannot be read does not matter
    deny_listing(monkeypatch, src / ".hidden")
    assert main(["prepare", "--text_file", str(src), "--cache_dir", str(cache)]) == 0
    assert [p.name for p in resolve_sources(src)] == ["a.txt", "b.txt"]


def unprivileged() -> list[str] | None:
    """A command prefix that runs a program without root's power to read anything: none for a user who is not
    root, setpriv to 'nobody' for root, None where neither works."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
    can_run = subprocess.run([*prefix, sys.executable, "-c", "import hilt.cli"], capture_output=True, cwd="/")
    return prefix if can_run.returncode == 0 else None


def test_unreadable_input_under_real_permissions_names_the_folder_or_file():
    prefix = unprivileged()
    if prefix is None:
        pytest.skip("no way here to run a command as a user without root's read-anything power")
    root = Path(
        tempfile.mkdtemp(prefix="hilt-perm-")
    )  # not under pytest's tmp_path: 'nobody' cannot enter that
    try:
        root.chmod(0o777)
        src = root / "in"
        for folder in ("locked", "unsearchable"):
            (src / folder).mkdir(parents=True)
        write(src / "a.txt", "ay\n" * 100)
        write(src / "locked" / "b.txt", "bee\n" * 100)
        write(src / "unsearchable" / "c.txt", "sea\n" * 100)

        def prepare() -> subprocess.CompletedProcess:
            args = ["prepare", "--text_file", str(src), "--cache_dir", str(root / "cache")]
            cmd = [*prefix, sys.executable, "-m", "hilt", *args]
            return subprocess.run(cmd, capture_output=True, text=True, cwd=root)

        (src / "locked").chmod(0o000)  # cannot be listed
        run = prepare()
        assert (
            run.returncode == 2
            and run.stderr == f"error: cannot read the folder {src / 'locked'}: Permission denied\n"
        )
        (src / "locked").chmod(0o755)
        (src / "unsearchable").chmod(0o644)  # listed, but what it holds cannot be looked at
        run = prepare()
        assert run.returncode == 2
        assert run.stderr == f"error: cannot read {src / 'unsearchable' / 'c.txt'}: Permission denied\n"
        (src / "unsearchable").chmod(0o755)
        run = prepare()
        assert run.returncode == 0, run.stderr
        assert "Token cache: 602 tokens, 3 document(s)" in run.stdout  # 200 ids per file, 2 <EOS>
    finally:
        for folder in root.rglob("*"):
            folder.chmod(0o755)
        shutil.rmtree(root)


def test_parquet_rows_are_documents(tmp_path, tok):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    stories = [f"Story number {i}.\nIt ends here." for i in range(50)] + [None, ""]
    path = tmp_path / "stories.parquet"
    pq.write_table(pa.table({"text": stories, "n": list(range(52))}), path, row_group_size=7)
    assert tokenize_corpus(Corpus(path), tok).tolist() == docs_reference(tok, stories[:50])
    with pytest.raises(UserError, match=r"has no column 'story' \(columns: text, n\)"):
        tokenize_corpus(Corpus(path, text_field="story"), tok)
    with pytest.raises(UserError, match=r"column 'n' holds int64, not text"):
        tokenize_corpus(Corpus(path, text_field="n"), tok)


# --- bad input --------------------------------------------------------------------------------------------------


def test_invalid_utf8_bytes_are_counted_exactly_across_block_ends(tmp_path, tok, capsys):
    # 1 (lone 0xff) + 2 (truncated 3-byte sequence) + 3 (truncated 4-byte sequence) + 2 (overlong 0xc0 0xaf);
    # the legitimate U+FFFD and é are not errors
    data = "ok é \ufffd ".encode() + b"\xff a \xe2\x82 b \xf0\x9f\x99 c \xc0\xaf end\n"
    src = tmp_path / "latin.txt"
    src.write_bytes(data * 3)
    for block_bytes in (1, 2, 5, 4 << 20):
        corpus = Corpus(src, block_bytes=block_bytes, piece_chars=4)
        ids = tokenize_corpus(corpus, tok)
        assert corpus.bad_bytes[src.resolve()] == 24
        assert ids.tolist() == tok.encode((data * 3).decode("utf-8", errors="replace"))
        assert f"{src.resolve()}: 24 invalid UTF-8 byte(s) replaced with U+FFFD" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("head", "what"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "a PNG image"),
        (gzip.compress(b"hello world " * 100), "gzip-compressed data; decompress it first"),
        (b"\xff\xfeh\x00i\x00", "UTF-16 text; convert it to UTF-8"),
        (b"text with a \x00 NUL", "it contains NUL bytes"),
        (bytes(range(1, 32)) * 10, "of its first 310 characters are not text"),
    ],
)
def test_binary_files_are_refused(tmp_path, head, what):
    with pytest.raises(UserError, match=re.escape(what)):
        check_text_head(tmp_path / "f", head)


def test_text_that_starts_like_a_magic_number_is_still_text(tmp_path):
    check_text_head(tmp_path / "f", b"BZh, said the bee.\n")
    check_text_head(tmp_path / "f", b"PK is a fine name.\n")
