"""A request's row in the engine's batch: its decoding state, how a token is drawn for it from its own logits and
Generator, and how the token's text reaches the request (held back while it could still be the start of a stop
string). The decode thread owns every row.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from hilt.generation.request import Output, Request
from hilt.generation.sampling import TextStreamer, context_start, sample_next_token
from hilt.model.kernels import greedy_tokens


@dataclass(eq=False)
class Row:
    """A request's decoding state, owned by the decode thread."""

    request: Request
    tokens: list[int]  # prompt + generated so far
    generator: torch.Generator | None
    streamer: TextStreamer | None
    stop_ids: frozenset[int]
    slot: int = -1
    start: int = -1  # the window start the slot's cache was computed for; -1 = nothing cached yet
    generated: int = 0
    held: str = ""  # text not yet sent: it could be the start of a stop string
    first_token_at: float | None = None
    ready: bool = False  # the slot holds the window up to the last token but one: the next step decodes

    def window_start(self, max_seq_len: int) -> int:
        return context_start(len(self.tokens), max_seq_len)

    def emit(self, token: int, logprob: float | None, top: dict | None) -> str | None:
        """Hands ``token``'s text to the request; returns the finish reason when it ends the row, else None."""
        p = self.request.params
        self.generated += 1
        finish = None
        if token in self.stop_ids:
            finish = "stop"  # the stop token's own text is not part of the output
            piece = self.streamer.flush() if self.streamer else ""
        else:
            self.tokens.append(token)
            piece = self.streamer.push(token) if self.streamer else ""
            if self.generated >= p.max_new_tokens:
                finish = "length"
                piece += self.streamer.flush() if self.streamer else ""
        text = self.held + piece
        hit = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
        if hit >= 0:
            finish, text, self.held = "stop", text[:hit], ""
        elif finish is None and p.stop:
            keep = stop_prefix_length(text, p.stop)
            text, self.held = text[: len(text) - keep], text[len(text) - keep :]
        else:
            self.held = ""
        self.request._push(Output(token, text, logprob, top, finish))
        return finish


def sample_rows(
    rows: list[Row], logits: torch.Tensor, token_text: Callable[[int], str]
) -> Iterator[tuple[Row, int, float | None, dict | None]]:
    """Each row's next token from its own (1, V) logits (B, V), with its logprob and top alternatives when asked."""
    greedy = greedy_tokens(logits).tolist()
    now = time.perf_counter()
    for i, row in enumerate(rows):
        p = row.request.params
        if p.temperature == 0:
            token = greedy[i]
        else:  # the row's own (1, V) logits and Generator: the draw cannot depend on the other rows
            token = int(
                sample_next_token(
                    logits[i : i + 1],
                    temperature=p.temperature,
                    top_k=p.top_k,
                    top_p=p.top_p,
                    generator=row.generator,
                )
            )
        logprob = top = None
        if p.logprobs is not None:
            logprob, top = token_logprobs(logits[i], token, p.logprobs, token_text)
        if row.first_token_at is None:
            row.first_token_at = now
        yield row, token, logprob, top


def token_logprobs(
    logits: torch.Tensor, token: int, k: int, token_text: Callable[[int], str]
) -> tuple[float, dict[str, float] | None]:
    logprobs = logits.float().log_softmax(dim=-1)
    top = None
    if k:
        values, ids = logprobs.topk(k)
        top = {token_text(t): v for t, v in zip(ids.tolist(), values.tolist(), strict=True)}
    return float(logprobs[token]), top


def stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is the beginning of a stop string (it could still complete)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
