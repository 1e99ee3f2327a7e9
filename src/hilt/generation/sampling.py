"""Sampling, a pure function of the logits with an explicit ``torch.Generator``: the filters (top-k, top-p), one
draw, greedy below a tiny temperature; the context window a decoder reads; and ``TextStreamer``, which turns new
ids into text as they come. Shared by ``generate`` (one batch in lockstep) and the engine (a row at a time).
"""

from __future__ import annotations

import math

import torch

from hilt.model.kernels import greedy_tokens

# --- sampling filters: pure functions of the logits ----------------------------------------------------------


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keeps exactly the k largest logits of each row (ties broken by topk's order); the rest become -inf."""
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    if k >= logits.size(-1):
        return logits
    values, indices = logits.topk(k, dim=-1)  # (B, k)
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keeps the smallest set of most likely tokens whose probability reaches p (always at least
    the most likely one); the rest become -inf."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p >= 1.0:
        return logits  # the cumulative sum may round to 1 early; p = 1 must keep every token
    probs = logits.softmax(dim=-1)
    # Rank the 64 most likely tokens, and all of them only when some row's nucleus is longer: sorting all of
    # GPT-2's 50,260 takes ~5 ms a row on one CPU thread, several decoding steps' worth
    # (`git show ab15cea:benchmarks/sampling_bench.py`)
    for m in sorted({min(64, probs.size(-1)), probs.size(-1)}):
        top, order = probs.topk(m, dim=-1)  # (B, m), most likely first
        keep = top.cumsum(dim=-1) - top < p  # needed while the tokens ranked above have not yet reached p
        keep[..., 0] = True
        if not keep[..., -1].any():  # every row's nucleus ended among the m
            break
    kept = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, keep)  # back to vocabulary order
    return logits.masked_fill(~kept, float("-inf"))


# below this temperature the draw is an argmax unless two logits lie within ~1e-4 of each other, and dividing by it
# can overflow the logits to inf in float32 (1e-300 is 0 there), which makes NaN probabilities: greedy is the limit
GREEDY_BELOW = 1e-5


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). Temperature 0 is greedy (argmax); otherwise temperature, then top-k, then
    top-p, then one draw from ``generator``. A temperature below ``GREEDY_BELOW`` is greedy too."""
    if temperature < GREEDY_BELOW:
        return greedy_tokens(logits)
    logits = logits.float() / temperature
    candidates = None
    if top_k is not None and top_k < logits.size(-1):  # what top_k_filter keeps; the rest cannot be drawn
        logits, candidates = logits.topk(top_k, dim=-1)  # (B, k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    ids = draw(logits.softmax(dim=-1), generator)
    return ids if candidates is None else candidates.gather(-1, ids[:, None]).squeeze(-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row of probs (B, V), by inverting the cumulative distribution at one uniform number per row.
    torch.multinomial draws an exponential per vocabulary entry instead: 1.4 ms a row for 50,260 ids on one CPU
    thread, most of a sampled decoding step; this takes ~0.13 ms."""
    wide = torch.float32 if probs.device.type == "mps" else torch.float64  # MPS has no float64
    cdf = probs.to(wide).cumsum(dim=-1)  # wide: the tail keeps its resolution over 50k additions
    # u in (0, total]: the first entry whose cumulative sum reaches u exists and has a probability above 0
    u = 1 - torch.rand(cdf.size(0), 1, generator=generator, dtype=wide, device=cdf.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1)


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not 0 <= temperature < math.inf:  # also refuses NaN
        raise ValueError(f"temperature must be >= 0 (0 = greedy) and finite, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


# --- the context window ------------------------------------------------------------------------


def context_start(length: int, max_seq_len: int) -> int:
    """Index of the first of ``length`` tokens the model reads when predicting the next one.

    Up to ``max_seq_len`` tokens it reads them all. Past that the window slides, in jumps of a quarter of the
    context: positions are absolute (added to the embeddings), so a cached key cannot move to a new position and
    every slide means recomputing the window; jumping rebuilds the cache once every max_seq_len // 4 tokens
    instead of every token, and the model always sees at least 3/4 of its context.
    """
    if length <= max_seq_len:
        return 0
    stride = max(1, max_seq_len // 4)
    return -(-(length - max_seq_len) // stride) * stride  # the smallest multiple of stride that fits


# --- text streaming ------------------------------------------------------------------------------------------


class TextStreamer:
    """Turns token ids into printable text as they arrive.

    Byte-level BPE can split one character over several tokens, and decoding a token alone may drop or change
    what depends on its neighbours; so each step decodes a short run of recent ids and emits only the text that
    a new token added, and only once it no longer ends in U+FFFD (an incomplete UTF-8 sequence). The pieces
    joined equal decoding all ids at once.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were emitted and give the decoding context for what follows
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back (e.g. a character the generation cut in half)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before) :]
