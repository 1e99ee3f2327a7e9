"""Data as the trainer sees it: the train/validation split, the batch order and its epoch budget, and what the
CLI says about inputs that cannot be training text."""

import gzip
import json
import socket

import numpy as np
import pytest
import torch

from hilt.cli import main
from hilt.data.batches import (
    TokenBatches,
    corpus_tokens,
    min_tokens_needed,
    read_text,
    split_tokens,
    train_val_tokens,
)
from hilt.data.tokenizer import Tokenizer
from hilt.errors import UserError
from tests.conftest import DATA_TXT

TINY = ["--model_dim", "32", "--n_layers", "1", "--n_heads", "2", "--ilt_dim", "16", "--d_ff", "64"]


def train(text_file, out_dir, *extra):
    return main(
        [
            "train",
            "--text_file",
            str(text_file),
            "--out_dir",
            str(out_dir),
            "--batch_size",
            "4",
            "--seq_len",
            "16",
            "--epochs",
            "1",
            *TINY,
            *extra,
        ]
    )


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.startswith("error: ")][-1]


# --- split ------------------------------------------------------------------------------------------------------


def test_split_holds_out_the_end_by_position():
    tokens = np.arange(1000)
    train, val = split_tokens(tokens, 0.1)
    assert len(train) == 900 and len(val) == 100
    assert np.array_equal(np.concatenate([train, val]), tokens)


def test_split_moves_to_the_nearest_document_start():
    tokens = np.arange(1000)
    doc_starts = np.array([0, 300, 640, 880, 960])
    train, val = split_tokens(tokens, 0.1, doc_starts=doc_starts, min_part=17)
    assert len(train) == 880 and val[0] == 880  # no document in both parts
    # no start near enough to the target (within half the validation size): split by position
    train, val = split_tokens(tokens, 0.1, doc_starts=np.array([0, 300, 640]), min_part=17)
    assert len(train) == 900
    # a start that would leave less than min_part on one side is not used
    train, val = split_tokens(tokens, 0.1, doc_starts=np.array([0, 990]), min_part=17)
    assert len(train) == 900


def test_train_val_tokens_split_separated_documents_at_an_eos(tmp_path):
    tok = Tokenizer.load()
    stories = [f"Story {i}: " + "the cat sat on the mat. " * (5 + i % 7) for i in range(60)]
    src = tmp_path / "stories.txt"
    src.write_text("\n\n".join(stories), encoding="utf-8")
    train, val = train_val_tokens(src, tok, seq_len=16, val_fraction=0.1, max_tokens=0, doc_separator="blank")
    assert train[-1] == tok.eos_id  # the cut is right after an <EOS>: validation starts with a whole story
    assert tok.decode(val[:4].tolist()).startswith("Story ")
    assert abs(len(val) - 0.1 * (len(train) + len(val))) < 0.05 * (len(train) + len(val))


# --- batch order and the epoch budget ---------------------------------------------------------------------------


def all_batches(data: TokenBatches, epochs: int) -> list[torch.Tensor]:
    return [x for e in range(epochs) for _, x, _ in data.epoch_batches(e)]


def test_epoch_budget_continues_the_same_order_across_epochs():
    tokens = np.arange(16 * 100 + 1)  # 100 windows of 16 -> 25 batches of 4 per pass
    full = TokenBatches(tokens, 16, 4, seed=3)
    budget = TokenBatches(tokens, 16, 4, seed=3, epoch_tokens=4 * 16 * 10)  # 10 batches per epoch
    assert len(full) == 25 and len(budget) == 10
    # five budget epochs = two passes: the same batches in the same order, epochs crossing pass ends
    passes = all_batches(full, 2)
    epochs = all_batches(budget, 5)
    assert len(epochs) == len(passes) == 50
    assert all(torch.equal(a, b) for a, b in zip(passes, epochs, strict=True))
    # every window once per pass
    first_pass = torch.cat([x[:, 0] for x in epochs[:25]])
    assert sorted((first_pass // 16).tolist()) == list(range(100))


def test_a_resumed_position_gives_the_same_next_batch():
    tokens = np.arange(16 * 100 + 1)
    before = TokenBatches(tokens, 16, 4, seed=9, epoch_tokens=700)
    after = TokenBatches(tokens.copy(), 16, 4, seed=9, epoch_tokens=700)  # a new process after --resume
    for epoch, index in [(0, 0), (2, 5), (3, 9), (7, 4)]:
        assert torch.equal(before.batch(epoch, index)[0], after.batch(epoch, index)[0])
    rest = [x for _, x, _ in after.epoch_batches(3, start=6)]
    assert all(torch.equal(x, before.batch(3, 6 + i)[0]) for i, x in enumerate(rest))


def test_a_budget_of_a_pass_or_more_changes_nothing():
    tokens = np.arange(16 * 40 + 1)
    plain = TokenBatches(tokens, 16, 4, seed=1)
    big = TokenBatches(tokens, 16, 4, seed=1, epoch_tokens=10**9)
    assert len(big) == len(plain) == 10 and not big.budgeted
    assert torch.equal(plain.window_order(2), big.window_order(2))
    g = torch.Generator().manual_seed(1 * 1_000_003 + 2)
    assert torch.equal(
        plain.window_order(2), torch.randperm(40, generator=g)
    )  # the order checkpoints rely on


def test_min_tokens_needed_gives_both_parts_a_window():
    need = min_tokens_needed(16, 0.1)
    train, val = split_tokens(np.arange(need), 0.1)
    assert len(train) >= 17 and len(val) >= 17
    train, val = split_tokens(np.arange(need - 1), 0.1)
    assert len(val) < 17


def _rank_reads_corpora(rank: int, port: int, paths: list[str], cache_dir: str, results) -> None:
    torch.distributed.init_process_group(
        "gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}"
    )
    try:
        for path in paths:
            try:
                tokens, _ = corpus_tokens(
                    path, Tokenizer.load(), cache_dir=cache_dir, rank=rank, world_size=2
                )
                results[rank, path] = tokens.tolist()
            except UserError as e:
                results[rank, path] = str(e)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_under_ddp_rank_0_builds_and_every_rank_gets_the_result(tmp_path):
    good, bad = tmp_path / "good.txt", tmp_path / "bad.png"
    good.write_bytes(DATA_TXT.read_bytes()[:3000])
    bad.write_bytes(b"\x89PNG\r\n\x1a\nIHDR")  # rank 0's error must reach rank 1, not leave it waiting
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = torch.multiprocessing.Manager().dict()
    paths = [str(good), str(bad)]
    torch.multiprocessing.spawn(
        _rank_reads_corpora, args=(port, paths, str(tmp_path / "cache"), results), nprocs=2
    )
    assert results[0, str(good)] == results[1, str(good)] == Tokenizer.load().encode(good.read_text())
    message = f"{bad.resolve()} looks binary (a PNG image), not UTF-8 text"
    assert results[0, str(bad)] == results[1, str(bad)] == message


# --- the CLI on inputs that are not training text (one clear line, exit 2) ------------------------------------


def test_missing_text_file(tmp_path, capsys):
    assert train(tmp_path / "nope.txt", tmp_path / "out") == 2
    assert error_line(capsys) == f"error: text file not found: {tmp_path / 'nope.txt'}"


def test_directory_without_text_files(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert train(tmp_path / "data", tmp_path / "out") == 2
    assert error_line(capsys) == (
        f"error: text file is a directory with no .txt, .jsonl or .parquet files in it: {tmp_path / 'data'}"
    )


def test_empty_text_file(tmp_path, capsys):
    (tmp_path / "empty.txt").write_bytes(b"")
    assert train(tmp_path / "empty.txt", tmp_path / "out") == 2
    assert error_line(capsys) == f"error: text file is empty: {tmp_path / 'empty.txt'}"


def test_whitespace_only_text_file(tmp_path, capsys):
    (tmp_path / "blank.txt").write_text(" \n\t\n   \r\n" * 100)
    assert train(tmp_path / "blank.txt", tmp_path / "out") == 2
    assert error_line(capsys) == f"error: {(tmp_path / 'blank.txt').resolve()} contains only whitespace"


def test_png_file(tmp_path, capsys):
    (tmp_path / "cat.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    assert train(tmp_path / "cat.png", tmp_path / "out") == 2
    assert (
        error_line(capsys)
        == f"error: {(tmp_path / 'cat.png').resolve()} looks binary (a PNG image), not UTF-8 text"
    )


def test_gzip_file(tmp_path, capsys):
    # gzip output of plain text has no NUL in its first bytes necessarily: the magic number is what tells
    (tmp_path / "data.txt.gz").write_bytes(gzip.compress(DATA_TXT.read_bytes()[:5000]))
    assert train(tmp_path / "data.txt.gz", tmp_path / "out") == 2
    assert error_line(capsys) == (
        f"error: {(tmp_path / 'data.txt.gz').resolve()} looks binary (gzip-compressed data; decompress it first), "
        "not UTF-8 text"
    )


def test_invalid_utf8_is_replaced_with_a_counted_warning(tmp_path, capsys):
    text = DATA_TXT.read_bytes()[:4000]
    # Latin-1 é (1 bad byte) x 3, a truncated 3-byte sequence (2) and a lone continuation byte (1): 6 bytes
    bad = text[:1000] + b"caf\xe9 caf\xe9 caf\xe9 \xe2\x82 \x80" + text[1000:]
    (tmp_path / "latin.txt").write_bytes(bad)
    assert train(tmp_path / "latin.txt", tmp_path / "out", "--epoch_tokens", "64") == 0
    err = capsys.readouterr().err
    assert (
        f"warning: {(tmp_path / 'latin.txt').resolve()}: 6 invalid UTF-8 byte(s) replaced with U+FFFD" in err
    )


def test_read_text_counts_invalid_bytes_not_replacement_characters(tmp_path, capsys):
    # 2 bytes of a truncated 3-byte sequence give one U+FFFD; a U+FFFD already in the file is not an error
    (tmp_path / "t.txt").write_bytes("fine \ufffd ".encode() + b"\xe2\x82 and \xff\n")
    assert read_text(tmp_path / "t.txt") == "fine \ufffd \ufffd and \ufffd\n"
    assert "t.txt: 3 invalid UTF-8 byte(s) replaced with U+FFFD" in capsys.readouterr().err


def test_text_too_short_for_one_training_and_one_validation_sequence(tmp_path, capsys):
    (tmp_path / "short.txt").write_text("Hello world. " * 5)
    assert train(tmp_path / "short.txt", tmp_path / "out") == 2
    assert error_line(capsys) == (
        f"error: {tmp_path / 'short.txt'} gives 16 tokens; at --seq_len 16 one training and one validation "
        "sequence need at least 170 (use more text, a smaller --seq_len, or --max_tokens 0)"
    )


# --- prepare, then train from the cache -------------------------------------------------------------------------


def test_prepare_then_train_on_jsonl_reuses_the_cache_and_keeps_the_budget(tmp_path, capsys):
    lines = DATA_TXT.read_text(encoding="utf-8")[:20_000].split("\n\n")
    src = tmp_path / "plays.jsonl"
    src.write_text("".join(json.dumps({"body": t}) + "\n" for t in lines), encoding="utf-8")
    cache = tmp_path / "cache"
    assert main(["prepare", "--text_file", str(src), "--text_field", "body", "--cache_dir", str(cache)]) == 0
    assert "Built:" in capsys.readouterr().out
    assert main(["prepare", "--text_file", str(src), "--text_field", "body", "--cache_dir", str(cache)]) == 0
    assert "Up to date:" in capsys.readouterr().out
    flags = ["--text_field", "body", "--cache_dir", str(cache), "--max_tokens", "0", "--epoch_tokens", "320"]
    assert train(src, tmp_path / "run", *flags, "--epochs", "2") == 0
    out = capsys.readouterr().out
    assert "memory-mapped" in out and "5 batches of 4x16 per epoch" in out
    ckpt = torch.load(tmp_path / "run" / "last_model.pt", weights_only=True)
    assert ckpt["train_config"]["epoch_tokens"] == 320 and ckpt["train_config"]["text_field"] == "body"
    resume = ["--resume", str(tmp_path / "run" / "last_model.pt"), "--epochs", "3"]
    # a new budget on resume is a new batching plan: it applies from the next epoch on (as a new --batch_size does)
    assert train(src, tmp_path / "run", *flags[:-1], "640", *resume) == 0
    assert "10 batches of 4x16 per epoch" in capsys.readouterr().out
    assert torch.load(tmp_path / "run" / "last_model.pt", weights_only=True)["epoch"] == 3
