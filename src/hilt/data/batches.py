"""Training data: corpus -> token ids (through the token cache) -> train/validation split -> batches of
next-token examples.

Every consumer sees tokens through one interface, ``TokenBatches``: a 1-D array of ids (in memory or
memory-mapped) cut into ``seq_len + 1`` windows, served in a seeded order that depends only on
(seed, epoch) and the batch settings, so the position ``(epoch, batch index)`` is all a checkpoint needs to resume the data exactly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from hilt.data.corpus import Corpus, decode_counting
from hilt.data.encode import token_dtype, tokenize_corpus
from hilt.data.sources import check_text_head
from hilt.data.tokenizer import Tokenizer
from hilt.errors import UserError

__all__ = [
    "TokenBatches",
    "corpus_tokens",
    "min_tokens_needed",
    "read_text",
    "split_tokens",
    "token_dtype",
    "tokenize_file",
    "train_val_tokens",
]


def read_text(path: str | Path) -> str:
    """Reads a (small) UTF-8 text file whole, refusing what cannot be training text with one clear message."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"text file not found: {path}")
    if path.is_dir():
        raise UserError(f"text file is a directory: {path}")
    data = path.read_bytes()
    if not data:
        raise UserError(f"text file is empty: {path}")
    check_text_head(path, data[:8192])
    text, bad = decode_counting(data)
    if text.isspace():
        raise UserError(f"{path} contains only whitespace")
    if bad:
        print(f"warning: {path}: {bad} invalid UTF-8 byte(s) replaced with U+FFFD", file=sys.stderr)
    return text


def tokenize_file(
    path: str | Path,
    tokenizer: Tokenizer,
    max_tokens: int = 0,
    *,
    tokenizer_dir: str | Path | None = None,
    doc_separator: str | None = None,
    text_field: str = "text",
) -> np.ndarray:
    """All token ids of a corpus in memory, without the cache (the first ``max_tokens`` when it is > 0)."""
    corpus = Corpus(path, doc_separator=doc_separator, text_field=text_field)
    tokens = tokenize_corpus(corpus, tokenizer, tokenizer_dir, max_tokens=max_tokens)
    return tokens[:max_tokens] if max_tokens > 0 else tokens


def corpus_tokens(
    text_file: str | Path,
    tokenizer: Tokenizer,
    *,
    tokenizer_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    doc_separator: str | None = None,
    text_field: str = "text",
    max_tokens: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """The corpus' ids (memory-mapped from the token cache, built on first use; the first ``max_tokens`` when
    > 0) and the offsets of the documents that start within them. Under torch.distributed rank 0 builds the
    cache while the other ranks wait, then read it."""
    from hilt.data.token_cache import open_cache

    options = dict(
        tokenizer_dir=tokenizer_dir,
        cache_dir=cache_dir,
        doc_separator=doc_separator,
        text_field=text_field,
        max_tokens=max_tokens,
    )
    distributed = world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed:
        cache = open_cache(text_file, tokenizer, **options)
    else:
        # rank 0 builds; the others wait for its verdict (an error there must not leave them waiting forever)
        verdict = [None]
        if rank == 0:
            try:
                cache = open_cache(text_file, tokenizer, **options)
            except Exception as e:
                verdict = [
                    str(e) if isinstance(e, UserError) else f"rank 0 could not prepare the data ({e!r})"
                ]
                torch.distributed.broadcast_object_list(verdict, src=0)
                raise
        torch.distributed.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            raise UserError(verdict[0])
        if rank != 0:
            cache = open_cache(text_file, tokenizer, build=False, log=None, **options)
    tokens, doc_starts = cache.tokens, cache.doc_starts
    if max_tokens > 0:
        tokens = tokens[:max_tokens]
        doc_starts = doc_starts[doc_starts < len(tokens)]
    return tokens, doc_starts


def train_val_tokens(
    text_file: str | Path,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    val_fraction: float = 0.1,
    max_tokens: int = 0,
    **read_options,
) -> tuple[np.ndarray, np.ndarray]:
    """The training and validation ids exactly as ``hilt train`` cuts them (``read_options``: tokenizer_dir,
    cache_dir, doc_separator, text_field, rank, world_size, as for ``corpus_tokens``)."""
    tokens, doc_starts = corpus_tokens(text_file, tokenizer, max_tokens=max_tokens, **read_options)
    need = min_tokens_needed(seq_len, val_fraction)
    if len(tokens) < need:
        raise UserError(
            f"{text_file} gives {len(tokens)} tokens; at --seq_len {seq_len} one training and one validation "
            f"sequence need at least {need} (use more text, a smaller --seq_len, or --max_tokens 0)"
        )
    return split_tokens(tokens, val_fraction, doc_starts=doc_starts, min_part=seq_len + 1)


def split_tokens(
    tokens: np.ndarray,
    val_fraction: float = 0.1,
    *,
    doc_starts: np.ndarray | None = None,
    min_part: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Holds out the last ``val_fraction`` of the stream by position, so the two parts never overlap.

    With ``doc_starts`` the cut moves to the nearest document start (so no document is in both parts) when one
    lies within half the validation size of the target and leaves both parts ``min_part`` tokens; otherwise the
    cut stays at the position and one document straddles it."""
    n = len(tokens)
    n_val = int(n * val_fraction)
    cut = n - n_val
    if doc_starts is not None and len(doc_starts) > 1:
        starts = np.asarray(doc_starts, dtype=np.int64)
        starts = starts[
            (starts >= max(min_part, 1)) & (starts <= n - min_part) & (np.abs(starts - cut) <= n_val // 2)
        ]
        if len(starts):
            cut = int(starts[np.argmin(np.abs(starts - cut))])
    return tokens[:cut], tokens[cut:]


class TokenBatches:
    """Batches of (input, target) windows from a 1-D token array.

    Windows start every ``seq_len`` tokens and are ``seq_len + 1`` long (inputs and targets overlap by all but
    one token). With ``shuffle`` the window order of pass ``p`` over the data is a permutation seeded by
    (seed, p); ``rank`` and ``world_size`` give each data-parallel process a disjoint, equally long share of every
    batch index.

    An epoch is one pass, unless ``epoch_tokens`` asks for fewer tokens than a pass holds: then an epoch is that
    many tokens' worth of batches and the passes' batch sequence simply continues across epochs (epoch ``e``,
    batch ``i`` is batch ``e * len(self) + i`` of that sequence). Either way batch ``(epoch, index)`` is a pure
    function of the settings, so a checkpoint's (epoch, batch in epoch) resumes without repeating or skipping.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch_tokens: int = 0,
    ):
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_windows = max(0, (len(tokens) - 1) // seq_len)
        # each rank gets the same number of whole batches, so no process waits on another at the end
        self.batches_per_pass = self.num_windows // (batch_size * world_size)
        if self.batches_per_pass == 0 and self.num_windows > 0 and world_size == 1:
            self.batches_per_pass = 1  # fewer windows than one batch: one short batch
        budget = max(1, epoch_tokens // (batch_size * world_size * seq_len)) if epoch_tokens > 0 else 0
        self.epoch_tokens = epoch_tokens
        self.budgeted = 0 < budget < self.batches_per_pass
        self.batches_per_epoch = budget if self.budgeted else self.batches_per_pass

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _gather(self, window_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        starts = window_idx.numpy() * self.seq_len
        windows = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        windows = torch.from_numpy(windows)
        return windows[:, :-1], windows[:, 1:]  # (B, seq_len) each: targets are inputs shifted by one

    def pass_order(self, p: int) -> torch.Tensor:
        """The window order of pass ``p`` over the data: a pure function of (seed, p)."""
        if not self.shuffle:
            return torch.arange(self.num_windows)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + p)
        return torch.randperm(self.num_windows, generator=g)

    def window_order(self, epoch: int) -> torch.Tensor:
        """The windows of ``epoch``'s batches, in order (``batch`` slices it)."""
        if not self.budgeted:
            return self.pass_order(epoch)
        per_step = self.batch_size * self.world_size
        first, last = epoch * self.batches_per_epoch, (epoch + 1) * self.batches_per_epoch
        parts = []
        while first < last:  # an epoch may end one pass and begin the next
            p, j = divmod(first, self.batches_per_pass)
            take = min(last - first, self.batches_per_pass - j)
            parts.append(self.pass_order(p)[j * per_step : (j + take) * per_step])
            first += take
        return torch.cat(parts)

    def batch(
        self, epoch: int, index: int, order: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index`` of ``epoch``: (x, y), each (batch, seq_len) int64, y shifted by one token."""
        order = self.window_order(epoch) if order is None else order
        per_step = self.batch_size * self.world_size
        picked = order[index * per_step : (index + 1) * per_step][self.rank :: self.world_size]
        return self._gather(picked)

    def eval_batches(self):
        """Every window exactly once, in order, this rank's share only (for validation): yields (x, y)."""
        mine = torch.arange(self.num_windows)[self.rank :: self.world_size]
        for i in range(0, len(mine), self.batch_size):
            yield self._gather(mine[i : i + self.batch_size])

    def epoch_batches(self, epoch: int, start: int = 0):
        """Yields (index, x, y) for the batches of ``epoch`` from batch ``start`` on."""
        order = self.window_order(epoch)
        for index in range(start, self.batches_per_epoch):
            x, y = self.batch(epoch, index, order)
            yield index, x, y


def min_tokens_needed(seq_len: int, val_fraction: float = 0.1) -> int:
    """The fewest tokens that give one training and one validation window after the split."""
    per_window = seq_len + 1
    return int(np.ceil(max(per_window / val_fraction, per_window / (1 - val_fraction))))
