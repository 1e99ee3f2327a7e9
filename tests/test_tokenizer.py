import pytest

from hilt.data.tokenizer import Tokenizer, gpt2_files_dir
from hilt.errors import UserError


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load()


def test_gpt2_ids_and_special_tokens(tok):
    assert tok.encode("Hello world") == [15496, 995]
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (50257, 50258, 50259)
    assert tok.vocab_size == 50260


def test_round_trip_including_multibyte_text(tok):
    text = "To be, or not to be: that is the question.\n  Ünïcödé — 日本語 🙂"
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_are_single_ids_and_skipped_on_decode(tok):
    ids = tok.encode("end<EOS>")
    assert ids[-1] == tok.eos_id
    assert tok.decode(ids) == "end"
    assert tok.decode(ids, skip_special_tokens=False) == "end<EOS>"


def test_batch_encoding_equals_single_encoding(tok):
    lines = ["First Citizen:\n", "Before we proceed any further, hear me speak.\n", "\n"]
    assert tok.encode_batch(lines) == [tok.encode(line) for line in lines]


def test_ships_its_files_and_license():
    names = {p.name for p in gpt2_files_dir().iterdir()}
    assert {"vocab.json", "merges.txt", "LICENSE"} <= names


def test_loads_a_local_tokenizer_folder(tmp_path):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((gpt2_files_dir() / name).read_bytes())
    other = Tokenizer.load(tmp_path)
    assert other.encode("Hello world") == [15496, 995]
    assert other.name != Tokenizer.load().name  # a different identity, so caches and checkpoints can tell


def test_missing_tokenizer_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no tokenizer"):
        Tokenizer.load(tmp_path)
