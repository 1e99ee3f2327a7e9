"""GPT-2 byte-level BPE through Hugging Face `tokenizers`, loaded from files shipped in this package (no network,
no hub cache), with the three special tokens HILT adds: <PAD>, <BOS>, <EOS>."""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from hilt.errors import UserError

SPECIAL_TOKENS = ("<PAD>", "<BOS>", "<EOS>")
GPT2_SPECIAL_IDS = {"<PAD>": 50257, "<BOS>": 50258, "<EOS>": 50259}
GPT2_VOCAB_SIZE = 50260


def gpt2_files_dir() -> Path:
    return Path(str(resources.files("hilt") / "assets" / "gpt2"))


class Tokenizer:
    """Thin wrapper: encode/decode plus the special ids and an identity string for caches and checkpoints."""

    def __init__(self, hf_tokenizer: HFTokenizer, name: str):
        self._tok = hf_tokenizer
        self._tok.add_special_tokens(list(SPECIAL_TOKENS))  # ids follow the base vocabulary, in this order
        self.name = name
        self.pad_id, self.bos_id, self.eos_id = (self._tok.token_to_id(t) for t in SPECIAL_TOKENS)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def load(cls, path: str | Path | None = None) -> Tokenizer:
        """The shipped GPT-2 tokenizer, or a local Hugging Face tokenizer folder (tokenizer.json, or
        vocab.json + merges.txt)."""
        directory = Path(path) if path is not None else gpt2_files_dir()
        if (directory / "tokenizer.json").is_file():
            files = [directory / "tokenizer.json"]
            hf = HFTokenizer.from_file(str(files[0]))
        elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            files = [directory / "vocab.json", directory / "merges.txt"]
            hf = HFTokenizer(models.BPE.from_file(str(files[0]), str(files[1])))
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            hf.decoder = decoders.ByteLevel()
        else:
            raise UserError(
                f"no tokenizer in {directory}: expected tokenizer.json or vocab.json + merges.txt"
            )
        digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]
        # the name identifies the exact files, so token caches built with another tokenizer are never reused
        tokenizer = cls(hf, name=f"{'gpt2' if path is None else directory.name}-{digest}")
        if path is None:
            got = {t: tokenizer._tok.token_to_id(t) for t in SPECIAL_TOKENS}
            assert got == GPT2_SPECIAL_IDS and tokenizer.vocab_size == GPT2_VOCAB_SIZE, got
        return tokenizer

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encodes on all cores (the Rust tokenizer parallelises batches)."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)
