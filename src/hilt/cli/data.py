"""`hilt prepare` and `hilt vocab`: the token cache ahead of training, and the tokenizer's facts. Neither imports
torch.
"""

from __future__ import annotations

import argparse

from hilt.cli.flags import add_fields
from hilt.cli.train import add_data_flags
from hilt.errors import UserError
from hilt.training.config import TrainConfig


def add_prepare(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text_file", required=True, help="the input, as for train")
    p.add_argument(
        "--max_tokens",
        type=int,
        default=0,
        help="stop after the first N tokens; 0 = all (default %(default)s)",
    )
    add_fields(p, TrainConfig, only=("tokenizer",))
    p.add_argument("--threads", type=int, default=None, help="encoder threads (default: one per core)")
    add_data_flags(p)


def cmd_prepare(args: argparse.Namespace) -> int:
    from hilt.data.token_cache import open_cache
    from hilt.data.tokenizer import Tokenizer

    if args.max_tokens < 0:
        raise UserError(f"--max_tokens must be >= 0, got {args.max_tokens}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    cache = open_cache(
        args.text_file,
        Tokenizer.load(args.tokenizer),
        tokenizer_dir=args.tokenizer,
        cache_dir=args.cache_dir,
        doc_separator=args.doc_separator,
        text_field=args.text_field,
        max_tokens=args.max_tokens,
        threads=args.threads,
    )
    print(f"{'Built' if cache.built else 'Up to date'}: {cache.meta_path}")
    return 0


def add_vocab(p: argparse.ArgumentParser) -> None:
    add_fields(p, TrainConfig, only=("tokenizer",))
    p.add_argument("--text", default="Hello world! To be, or not to be.", help="example for the round trip")


def cmd_vocab(args: argparse.Namespace) -> int:
    from hilt.data.tokenizer import SPECIAL_TOKENS, Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    print(f"Tokenizer: {tok.name}")
    print(f"Vocabulary size: {tok.vocab_size} (including special tokens)")
    for t in SPECIAL_TOKENS:
        print(f"  {t}: {tok._tok.token_to_id(t)}")
    ids = tok.encode(args.text)
    print(f"Round trip: {args.text!r}")
    print(f"  ids:    {ids}")
    print(f"  tokens: {[tok.id_to_token(i) for i in ids]}")
    back = tok.decode(ids)
    print(f"  decode: {back!r} ({'identical' if back == args.text else 'DIFFERENT'})")
    return 0
