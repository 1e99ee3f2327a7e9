"""Log-probabilities in OpenAI's shapes, lined up with the text the client gets: each generated token paired with
the part of the sent text it makes up (``TokenTexts``), and an echoed prompt's own tokens scored by one forward
pass (``score_prompt``).

The engine's text is not simply its tokens' texts end to end: it sends a token's text late while it could still
begin a stop string, cuts the text before a stop string, ends it without the <EOS> token's text, and a character
split over two tokens arrives with the second; chat also drops the reply's leading whitespace. A client that
joins the logprob tokens expects the text it was sent, so every token's entry carries only what it added to that
text, and tokens that added nothing to it at the edges (leading whitespace chat dropped, a stop string, <EOS>)
get no entry.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor

import torch

from hilt.device import release_openmp_workers
from hilt.generation.engine import Output
from hilt.generation.sampling import TextStreamer

# one scoring pass at a time, on one thread: it shares the CPU with the decode thread, and one more OpenMP pool
# is what that thread can bear (hilt.device.release_openmp_workers)
_SCORER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hilt-score")
_CHUNK = 256  # positions whose (chunk, V) logits exist at once


class TokenTexts:
    """One choice's generated tokens, paired with the text each one put into what the client was sent.

    ``push`` takes the engine's outputs in order and returns the tokens whose text has now been sent, as
    (output, text, offset in the choice's text); their texts join to exactly the choice's text. A token is
    returned once its text has gone out whole, or at the end, cut to what went out."""

    def __init__(self, tokenizer, strip_leading: bool = False):
        self._streamer = TextStreamer(tokenizer)  # the engine decodes its text the same way
        self._strip = strip_leading
        self._pending: list[tuple[Output, int, str]] = []  # (output, where its piece starts, piece)
        self._decoded = 0  # length of the decoded text so far: where the next piece starts
        self._sent = 0  # length of the text the engine sent, before any stripping
        self._lead = 0  # leading whitespace stripped from it
        self._started = not strip_leading

    def push(self, out: Output) -> list[tuple[Output, str, int]]:
        if out.token_id is None:  # cancelled: no token
            return []
        final = out.finish_reason is not None
        piece = self._streamer.push(out.token_id)
        if final:
            piece += self._streamer.flush()
        if not self._started:
            text = out.text.lstrip()
            self._lead += len(out.text) - len(text)
            self._started = bool(text)
        self._sent += len(out.text)
        self._pending.append((out, self._decoded, piece))
        self._decoded += len(piece)
        return self._release(final)

    def _release(self, final: bool) -> list[tuple[Output, str, int]]:
        start, end = self._lead, self._sent
        ready = len(self._pending)
        if not final:
            # up to the last token whose text went out whole; one with no text yet (the first bytes of a
            # character) waits for the token that completes it
            ready = 0
            for i, (_, lo, piece) in enumerate(self._pending):
                if lo + len(piece) > end:
                    break
                if piece:
                    ready = i + 1
        released = []
        for out, lo, piece in self._pending[:ready]:
            hi = lo + len(piece)
            if lo < end and (hi > start or lo == hi >= start):
                released.append((out, piece[max(start - lo, 0) : end - lo], max(lo - start, 0)))
        del self._pending[:ready]
        return released


def token_texts(tokenizer, outs: list[Output], strip_leading: bool = False) -> list[tuple[Output, str, int]]:
    """``TokenTexts`` over a whole choice."""
    texts = TokenTexts(tokenizer, strip_leading)
    return [entry for out in outs for entry in texts.push(out)]


def prompt_texts(tokenizer, prompt: str, ids: list[int]) -> list[str]:
    """Each prompt token's text; they join to the prompt. Special tokens written in it (<EOS>) keep their text;
    the <BOS> that stands for an empty prompt has none."""
    if not prompt:
        return [""] * len(ids)
    streamer = TextStreamer(_KeepSpecial(tokenizer))
    pieces = [streamer.push(t) for t in ids]
    pieces[-1] += streamer.flush()
    return pieces


class _KeepSpecial:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


async def score_prompt(engine, tokenizer, ids: list[int], k: int) -> list[tuple[float | None, dict | None]]:
    """(logprob, top ``k`` alternatives) of each prompt token given the ones before it; (None, None) for the first,
    which nothing precedes. The engine's model and compute precision, off the event loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(_SCORER, _score, engine, tokenizer, ids, k)


@torch.inference_mode()
def _score(engine, tokenizer, ids: list[int], k: int) -> list[tuple[float | None, dict | None]]:
    model, dtype, device = engine.model, engine.compute_dtype, engine.device
    scores: list[tuple[float | None, dict | None]] = [(None, None)]
    try:
        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            hidden = model.features(torch.tensor([ids], device=device))[0]  # (T, C)
            for lo in range(0, len(ids) - 1, _CHUNK):
                # position i predicts token i + 1; the last position predicts nothing in the prompt
                logprobs = model.head(hidden[lo : lo + _CHUNK][: len(ids) - 1 - lo]).float().log_softmax(-1)
                targets = torch.tensor(ids[lo + 1 : lo + 1 + len(logprobs)], device=device)
                chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
                tops: list[dict | None] = [None] * len(chosen)
                if k:
                    values, top_ids = logprobs.topk(k, dim=-1)  # (chunk, k) each
                    tops = [
                        {_text(tokenizer, t): v for t, v in zip(row_ids, row, strict=True)}
                        for row_ids, row in zip(top_ids.tolist(), values.tolist(), strict=True)
                    ]
                scores += zip(chosen, tops, strict=True)
    finally:
        if device.type == "cpu":
            release_openmp_workers()
    return scores


def _text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)  # as the engine names its alternatives
