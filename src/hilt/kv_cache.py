"""A pre-allocated key/value cache for incremental decoding.

Lifecycle: ``KVCache(...)`` -> ``model(prompt, cache=cache)`` (prefill) -> ``model(next_ids, cache=cache)`` per new
token (each call appends T positions to every layer and advances) -> ``reorder(beam_idx)`` between beam-search
steps -> ``reset()`` to reuse the memory for another sequence.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every main layer: ``k``/``v`` are (L, B, H, max_len, D), allocated on first use with
    the dtype and device of the first keys written (so bf16 autocast gets a bf16 cache).

    ``length`` counts the positions already stored; the model reads it as the position of its next token.
    """

    def __init__(self, n_layers: int, max_len: int):
        self.n_layers = n_layers
        self.max_len = max_len
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def reset(self) -> None:
        self.length = 0

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, D) after the cached positions; return all keys/values so far (B, H, S, D)."""
        B, H, T, D = k.shape
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        if self.k is None or self.k.shape[1] != B or self.k.dtype != k.dtype:
            if self.length:
                raise ValueError("KV cache batch size or dtype changed mid-sequence")
            self.k = k.new_zeros(self.n_layers, B, H, self.max_len, D)
            self.v = torch.zeros_like(self.k)
        self.k[layer_idx, :, :, self.length : end] = k
        self.v[layer_idx, :, :, self.length : end] = v
        return self.k[layer_idx, :, :, :end], self.v[layer_idx, :, :, :end]

    def advance(self, n: int) -> None:
        """Called by the model once every layer has stored its n new positions."""
        self.length += n

    def reorder(self, batch_idx: torch.Tensor) -> None:
        """Keep rows ``batch_idx`` (beam search: the beams that survived, possibly repeated)."""
        if self.k is None:
            return
        if len(batch_idx) == self.k.size(1):
            # the usual beam step: move only the filled positions, inside the pre-allocated buffers
            n = self.length
            self.k[:, :, :, :n] = self.k[:, batch_idx, :, :n]
            self.v[:, :, :, :n] = self.v[:, batch_idx, :, :n]
        else:
            # the batch size changes (the first beam step fans one prompt out to W beams): new buffers
            self.k = self.k[:, batch_idx]
            self.v = self.v[:, batch_idx]
