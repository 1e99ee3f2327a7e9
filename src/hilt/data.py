"""Training data: text file -> token ids -> train/validation split -> batches of next-token examples.

Every consumer sees tokens through one interface, ``TokenBatches``: a 1-D array of ids (in memory or
memory-mapped) cut into ``seq_len + 1`` windows, served in a seeded order that depends only on
(seed, epoch), so the position ``(epoch, batch index)`` is all a checkpoint needs to resume the data exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from hilt.errors import UserError
from hilt.tokenizer import Tokenizer


def read_text(path: str | Path) -> str:
    """Reads a UTF-8 text file, refusing what cannot be training text with one clear message."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"text file not found: {path}")
    if path.is_dir():
        raise UserError(f"text file is a directory: {path}")
    data = path.read_bytes()
    if not data.strip():
        raise UserError(f"text file is empty: {path}")
    if b"\x00" in data[:8192]:
        raise UserError(f"{path} looks binary (it contains NUL bytes), not text")
    text = data.decode("utf-8", errors="replace")
    bad = text.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
    if bad:
        print(f"warning: {path}: {bad} invalid UTF-8 sequence(s) replaced with U+FFFD")
    return text


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def tokenize_file(path: str | Path, tokenizer: Tokenizer, max_tokens: int = 0) -> np.ndarray:
    """All token ids of a text file (the first ``max_tokens`` of them when it is > 0)."""
    text = read_text(path)
    # Line batches let the Rust tokenizer use every core; GPT-2 BPE never merges across a newline, so the ids
    # equal those of encoding the whole text at once.
    lines = text.splitlines(keepends=True)
    ids: list[int] = []
    chunk = 4096
    for i in range(0, len(lines), chunk):
        for line_ids in tokenizer.encode_batch(lines[i : i + chunk]):
            ids.extend(line_ids)
        if 0 < max_tokens <= len(ids):
            break
    if max_tokens > 0:
        ids = ids[:max_tokens]
    return np.asarray(ids, dtype=token_dtype(tokenizer.vocab_size))


def split_tokens(tokens: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Holds out the last ``val_fraction`` of the stream by position, so the two parts never overlap."""
    n_val = int(len(tokens) * val_fraction)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]


class TokenBatches:
    """Batches of (input, target) windows from a 1-D token array.

    Windows start every ``seq_len`` tokens and are ``seq_len + 1`` long (inputs and targets overlap by all but
    one token). With ``shuffle`` the window order is a permutation seeded by (seed, epoch); ``rank`` and
    ``world_size`` give each data-parallel process a disjoint, equally long share of every batch index.
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
        self.batches_per_epoch = self.num_windows // (batch_size * world_size)
        if self.batches_per_epoch == 0 and self.num_windows > 0 and world_size == 1:
            self.batches_per_epoch = 1  # fewer windows than one batch: one short batch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _gather(self, window_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        starts = window_idx.numpy() * self.seq_len
        windows = np.stack([self.tokens[s : s + self.seq_len + 1] for s in starts]).astype(np.int64)
        windows = torch.from_numpy(windows)
        return windows[:, :-1], windows[:, 1:]  # (B, seq_len) each: targets are inputs shifted by one

    def window_order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_windows)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_windows, generator=g)

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
