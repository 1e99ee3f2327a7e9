"""A pre-allocated key/value cache for incremental decoding.

Lifecycle: ``KVCache(...)`` -> ``model(prompt, cache=cache)`` (prefill) -> ``model(next_ids, cache=cache)`` per new
token (each call appends T positions to every layer and advances) -> ``reorder(beam_idx)`` between beam-search
steps -> ``reset()`` to reuse the memory for another sequence.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every main layer: ``k``/``v`` are (L, B, H, max_len, D), allocated on first use on the
    device of the first keys written, in ``dtype`` or else theirs (so bf16 autocast gets a bf16 cache). A wider
    ``dtype`` holds the keys exactly and the model then attends in it (``hilt.generation.decoding.cache_dtype``'s reason).

    ``length`` counts the positions already stored; the model reads it as the position of its next token.
    """

    def __init__(self, n_layers: int, max_len: int, dtype: torch.dtype | None = None):
        self.n_layers = n_layers
        self.max_len = max_len
        self.dtype = dtype
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
        dtype = self.dtype or k.dtype
        if self.k is None or self.k.shape[1] != B or self.k.dtype != dtype:
            if self.length:
                raise ValueError("KV cache batch size or dtype changed mid-sequence")
            self.k = k.new_zeros(self.n_layers, B, H, self.max_len, D, dtype=dtype)
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


class SlotCache:
    """Keys and values for a batch of independent sequences (the engine's slots), each with its own length.

    ``k``/``v`` are (L, N, H, max_len, D) in ``dtype``: N slots, pre-allocated at once (zeros, so a key that was
    never written is finite and a mask can hide it). A fresh call's attention reads the keys it was given; the
    others read the buffers, so a wider ``dtype`` than the keys' makes them attend in it (see ``KVCache``).
    ``lengths[i]`` counts the positions slot i holds. Before each model call the owner says which slots the call
    covers and how many real tokens each adds (``bind``); the model then calls ``update`` for every layer and
    ``advance`` once, as with ``KVCache``. Two kinds of call:

    - fresh (a prompt, or a window re-read after a slide): the slots start empty; the ids are right-padded to the
      longest row, so the padding lands after each row's real tokens, where the plain causal mask keeps every real
      query away from it and the next writes overwrite it. Any slots, in any order.
    - continuing: one slot with any number of new tokens (the model reads ``length`` as its next position and
      builds the bottom-right causal mask itself), or a contiguous range of slots with one new token each, which
      the caller gives ``positions`` (``lengths``) and ``attn_mask`` (``padding_mask``) since the rows differ.

    Keeping the rows of a continuing call contiguous makes ``update`` return views of the buffers, never gathered
    copies; ``move`` lets the owner keep its running rows packed at the front.
    """

    def __init__(
        self,
        n_layers: int,
        n_slots: int,
        max_len: int,
        n_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        self.n_layers, self.n_slots, self.max_len = n_layers, n_slots, max_len
        self.k = torch.zeros(n_layers, n_slots, n_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.lengths = [0] * n_slots
        self._slots: list[int] = []
        self._added: list[int] = []
        self._fresh = False

    @staticmethod
    def bytes_per_slot(n_layers: int, max_len: int, d_model: int, dtype: torch.dtype) -> int:
        return 2 * n_layers * max_len * d_model * torch.empty(0, dtype=dtype).element_size()

    def bind(self, slots: list[int], added: list[int], *, fresh: bool) -> None:
        """The next model call covers ``slots`` (its batch rows, in order), adding ``added[i]`` real tokens to each."""
        if (
            not fresh
            and len(slots) > 1
            and (slots != list(range(slots[0], slots[0] + len(slots))) or max(added) > 1)
        ):
            raise ValueError("a continuing call covers one slot, or a contiguous range with one token each")
        self._slots, self._added, self._fresh = slots, added, fresh
        if fresh:
            for s in slots:
                self.lengths[s] = 0
        self._index = torch.tensor(slots, device=self.k.device) if fresh and len(slots) > 1 else None
        if not fresh and len(slots) > 1:
            self._rows = torch.arange(len(slots), device=self.k.device)
            self._pos = torch.tensor([self.lengths[s] for s in slots], device=self.k.device)

    @property
    def length(self) -> int:
        """Position of the next token of the one bound row (the model reads it only when given no positions)."""
        if self._fresh:
            return 0
        if len(self._slots) != 1:
            raise ValueError("SlotCache.length is defined for one bound row; pass positions for more")
        return self.lengths[self._slots[0]]

    def positions(self) -> torch.Tensor:
        """(B, 1): the position of each bound row's next token, for a continuing call of several rows."""
        return self._pos[:, None]

    def padding_mask(self) -> torch.Tensor:
        """(B, 1, 1, S) True where a row's new token may attend: its own keys, never another row's shorter tail."""
        S = int(self._pos.max()) + 1
        return (torch.arange(S, device=self.k.device) <= self._pos[:, None])[:, None, None, :]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, D) for the bound slots; return the keys/values to attend to (B, H, S, D)."""
        T = k.size(2)
        slots = self._slots
        if self._fresh:
            if T > self.max_len:
                raise ValueError(f"SlotCache: {T} positions > max_len {self.max_len}")
            if self._index is None:
                s = slots[0]
                self.k[layer_idx, s : s + 1, :, :T] = k
                self.v[layer_idx, s : s + 1, :, :T] = v
            else:  # index_put takes no other dtype (slice assignment converts by itself)
                self.k[layer_idx, self._index, :, :T] = k.to(self.k.dtype)
                self.v[layer_idx, self._index, :, :T] = v.to(self.v.dtype)
            return k, v  # the padded rows' keys beyond their length are hidden by the causal mask
        first = slots[0]
        if len(slots) == 1:  # as few indexing calls as KVCache: this is every batch-1 decoding step
            start = self.lengths[first]
            end = start + T
            if end > self.max_len:
                raise ValueError(f"SlotCache full: {end} positions > max_len {self.max_len}")
            self.k[layer_idx, first : first + 1, :, start:end] = k
            self.v[layer_idx, first : first + 1, :, start:end] = v
            return self.k[layer_idx, first : first + 1, :, :end], self.v[
                layer_idx, first : first + 1, :, :end
            ]
        keys = self.k[layer_idx, first : first + len(slots)]
        values = self.v[layer_idx, first : first + len(slots)]
        end = int(self._pos.max()) + 1
        if end > self.max_len:
            raise ValueError(f"SlotCache full: {end} positions > max_len {self.max_len}")
        keys[self._rows, :, self._pos] = k[:, :, 0].to(keys.dtype)  # (B, H, D) into each row's next position
        values[self._rows, :, self._pos] = v[:, :, 0].to(values.dtype)
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, n: int) -> None:
        """Called by the model once every layer has stored its n new positions (padding included)."""
        for s, added in zip(self._slots, self._added, strict=True):
            self.lengths[s] += added

    def move(self, src: int, dst: int) -> None:
        """Slot ``dst`` takes over slot ``src``'s sequence (the owner packs its running rows)."""
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lengths[dst] = n

    def free(self, slot: int) -> None:
        self.lengths[slot] = 0
