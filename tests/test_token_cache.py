"""The token cache: built once, memory-mapped after, invalidated by what changes the ids, never half-written."""

import hashlib
import json
import os
import shutil
import time

import numpy as np
import pytest

import hilt.cli
import hilt.data.token_cache
from hilt.data.encode import token_dtype
from hilt.data.token_cache import open_cache
from hilt.data.tokenizer import Tokenizer, gpt2_files_dir
from hilt.errors import UserError
from tests.conftest import DATA_TXT


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load()


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(DATA_TXT.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    return path


def cache_files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_first_open_builds_and_later_opens_memory_map_the_same_ids(src, tok, capsys):
    first = open_cache(src, tok)
    assert first.built and first.meta_path.parent == src.parent / ".hilt_cache"
    assert first.tokens.tolist() == tok.encode(src.read_text(encoding="utf-8"))
    second = open_cache(src, tok)
    assert not second.built and isinstance(second.tokens, np.memmap) and second.tokens.dtype == np.uint16
    assert np.array_equal(first.tokens, second.tokens)
    assert "memory-mapped" in capsys.readouterr().out
    meta = json.loads(first.meta_path.read_text())
    (source,) = meta["sources"]
    assert source["size"] == src.stat().st_size and source["mtime_ns"] == src.stat().st_mtime_ns
    assert source["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()  # folded into the tokenizing pass
    assert (
        meta["n_tokens"] == len(first.tokens)
        and meta["complete"]
        and meta["settings"]["tokenizer"] == tok.name
    )
    # one metadata file, one ids file, one offsets file
    assert sorted(n.split(".")[-1] for n in cache_files(first.meta_path.parent)) == ["json", "npy", "tokens"]


def test_a_changed_source_rebuilds(src, tok):
    old = open_cache(src, tok)
    text = src.read_text(encoding="utf-8")
    src.write_text(text.replace("First", "Frist"), encoding="utf-8")  # same size, new content
    os.utime(src, ns=(time.time_ns(), time.time_ns() + 10**9))
    new = open_cache(src, tok)
    assert new.built and new.tokens.tolist() == tok.encode(src.read_text(encoding="utf-8"))
    assert not np.array_equal(old.tokens[:50], new.tokens[:50])
    src.write_text(text + "more", encoding="utf-8")  # new size
    assert open_cache(src, tok).built
    # the old build's files are gone
    assert len(cache_files(new.meta_path.parent)) == 3


def test_a_touched_but_unchanged_source_is_rehashed_not_retokenized(src, tok):
    open_cache(src, tok)
    later = time.time_ns() + 5 * 10**9
    os.utime(src, ns=(later, later))
    again = open_cache(src, tok)
    assert not again.built
    assert (
        json.loads(again.meta_path.read_text())["sources"][0]["mtime_ns"] == later
    )  # refreshed: no rehash next


def test_another_tokenizer_or_separator_gets_its_own_cache(src, tok, tmp_path):
    gpt2 = open_cache(src, tok)
    shutil.copytree(gpt2_files_dir(), tmp_path / "my_tok")
    other = Tokenizer.load(tmp_path / "my_tok")
    assert other.name != tok.name
    mine = open_cache(src, other, tokenizer_dir=tmp_path / "my_tok")
    assert mine.built and mine.meta_path != gpt2.meta_path
    assert np.array_equal(mine.tokens, gpt2.tokens)  # same BPE files, so the same ids
    blank = open_cache(src, tok, doc_separator="blank")
    assert blank.built and blank.meta_path != gpt2.meta_path and len(blank.doc_starts) > 1
    assert not open_cache(src, tok).built  # the first is still valid


def test_a_failed_build_leaves_no_cache_that_looks_valid(src, tok, monkeypatch):
    good = open_cache(src, tok)
    src.write_text(src.read_text(encoding="utf-8") + " changed", encoding="utf-8")
    real = hilt.data.token_cache.piece_encoder

    def failing_encoder(*args, **kwargs):
        encode, name = real(*args, **kwargs)
        calls = []

        def encode_then_die(texts):
            calls.append(1)
            if len(calls) > 1:
                raise KeyboardInterrupt  # as if the user hit Ctrl-C halfway
            return encode(texts)

        return encode_then_die, name

    monkeypatch.setattr(hilt.data.token_cache, "piece_encoder", failing_encoder)
    with pytest.raises(KeyboardInterrupt):
        open_cache(src, tok, piece_chars=500)
    folder = good.meta_path.parent
    assert not [n for n in cache_files(folder) if n.endswith(".tmp")]
    monkeypatch.undo()
    rebuilt = open_cache(src, tok)  # the old metadata describes the old file: it is not used
    assert rebuilt.built and rebuilt.tokens.tolist() == tok.encode(src.read_text(encoding="utf-8"))


def test_leftovers_of_a_killed_build_are_ignored_and_cleaned(src, tok):
    first = open_cache(src, tok)
    folder = first.meta_path.parent
    base = first.meta_path.stem
    # what `kill -9` halfway through the next build leaves: a temporary, and ids that no metadata names
    (folder / f".{base}.dead.tokens.tmp").write_bytes(b"\x00" * 100)
    (folder / f"{base}.dead.tokens").write_bytes(b"\x00" * 100)
    os.utime(folder / f".{base}.dead.tokens.tmp", (time.time() - 3600, time.time() - 3600))
    assert not open_cache(src, tok).built
    src.write_text("A new text. " * 500, encoding="utf-8")
    assert open_cache(src, tok).built
    assert not any("dead" in n for n in cache_files(folder))


def test_damaged_metadata_rebuilds(src, tok):
    first = open_cache(src, tok)
    first.meta_path.write_text(json.dumps({"version": 1, "settings": first.meta["settings"]}))
    assert open_cache(src, tok).built


def test_max_tokens_builds_a_prefix_that_serves_smaller_requests(src, tok):
    full_ids = tok.encode(src.read_text(encoding="utf-8"))
    prefix = open_cache(src, tok, max_tokens=300, piece_chars=200)
    assert prefix.built and not prefix.meta["complete"]
    assert 300 <= len(prefix.tokens) < len(full_ids)
    assert prefix.tokens.tolist() == full_ids[: len(prefix.tokens)]
    assert not open_cache(src, tok, max_tokens=200).built
    assert open_cache(src, tok, max_tokens=len(full_ids)).built  # needs more than the prefix holds
    full = open_cache(src, tok)
    assert full.meta["complete"] and full.tokens.tolist() == full_ids
    assert not open_cache(src, tok, max_tokens=300).built


def test_cache_dir_flag_and_unwritable_folder(src, tok, tmp_path):
    elsewhere = tmp_path / "caches" / "here"
    assert open_cache(src, tok, cache_dir=elsewhere).meta_path.parent == elsewhere
    blocker = tmp_path / "file_not_folder"
    blocker.write_text("x")
    with pytest.raises(
        UserError, match="cannot create the token cache folder .* choose one with --cache_dir"
    ):
        open_cache(src, tok, cache_dir=blocker / "sub")


def test_token_dtype_widens_past_65536_ids():
    assert token_dtype(50_260) == np.uint16 and token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32 and token_dtype(128_256) == np.uint32


# --- cache files changed in place: checksums and the id range ---------------------------------------------------


def _tokens_path(cache):
    return cache.meta_path.parent / cache.meta["tokens_file"]


def test_ids_overwritten_with_other_valid_ids_of_the_same_size_rebuild_with_a_reason(src, tok, capsys):
    first = open_cache(src, tok)
    right = first.tokens.tolist()
    wrong = np.array(right, dtype=np.uint16)
    np.random.default_rng(0).shuffle(wrong)  # valid ids, same size: only the content tells
    _tokens_path(first).write_bytes(wrong.tobytes())
    capsys.readouterr()
    again = open_cache(src, tok)
    assert again.built and again.tokens.tolist() == right
    line = capsys.readouterr().out.splitlines()[0]
    assert "does not match its checksum" in line and first.meta["tokens_file"] in line
    assert not open_cache(src, tok).built  # the rebuilt cache verifies


def test_ids_outside_the_vocabulary_rebuild_even_with_a_matching_checksum(src, tok, capsys):
    first = open_cache(src, tok)
    bad = np.array(first.tokens, dtype=np.uint16)
    bad[100] = 65_000  # past GPT-2's 50,260 ids: an IndexError deep in the model, were it used
    _tokens_path(first).write_bytes(bad.tobytes())
    meta = json.loads(first.meta_path.read_text())
    # the metadata edited to match
    meta.setdefault("checksums", {})["tokens"] = hashlib.blake2b(bad, digest_size=16).hexdigest()
    first.meta_path.write_text(json.dumps(meta))
    capsys.readouterr()
    again = open_cache(src, tok)
    assert again.built and int(again.tokens.max()) < tok.vocab_size
    assert "holds id 65000, outside the vocabulary of 50260" in capsys.readouterr().out


DAMAGE = [b"", b"\x93NUMPY garbage", None]


@pytest.mark.parametrize("damage", DAMAGE, ids=["empty", "garbage", "other-offsets"])
def test_damaged_document_offsets_rebuild_instead_of_failing_on_every_run(src, tok, capsys, damage):
    first = open_cache(src, tok, doc_separator="blank")
    docs = first.meta_path.parent / first.meta["docs_file"]
    if damage is None:  # a valid .npy with other offsets
        np.save(docs, first.doc_starts[::2])
        damage = docs.read_bytes()
    docs.write_bytes(damage)
    capsys.readouterr()
    # through the CLI: one line saying why, a rebuild, exit 0 (before: a numpy traceback on every run)
    args = ["prepare", "--text_file", str(src), "--doc_separator", "blank"]
    assert hilt.cli.main(args) == 0
    out = capsys.readouterr().out
    assert "does not match its checksum" in out and "Built:" in out
    again = open_cache(src, tok, doc_separator="blank")
    assert not again.built and np.array_equal(again.doc_starts, first.doc_starts)


def test_a_cache_without_checksums_is_rebuilt_once(src, tok, capsys):
    first = open_cache(src, tok)
    meta = json.loads(first.meta_path.read_text())
    del meta["checksums"]  # as an older HILT wrote it
    first.meta_path.write_text(json.dumps(meta))
    capsys.readouterr()
    assert open_cache(src, tok).built
    assert "no checksums" in capsys.readouterr().out
    assert not open_cache(src, tok).built


def test_the_checksums_are_of_the_files_as_written(src, tok):
    cache = open_cache(src, tok)
    sums = cache.meta["checksums"]
    assert sums["tokens"] == hashlib.blake2b(_tokens_path(cache).read_bytes(), digest_size=16).hexdigest()
    docs = cache.meta_path.parent / cache.meta["docs_file"]
    assert sums["docs"] == hashlib.blake2b(docs.read_bytes(), digest_size=16).hexdigest()
