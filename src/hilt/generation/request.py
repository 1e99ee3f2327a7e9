"""What a caller of the engine holds: ``SamplingParams`` in, a ``Request`` to iterate (``Output`` per new token) or
wait on (``Result``), and the engine's exceptions. ``hilt.generation.engine`` re-exports all of them.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass

FINISH_REASONS = ("stop", "length", "cancelled")
MAX_LOGPROBS = 5


class QueueFull(Exception):
    """``submit`` found the waiting queue full (an HTTP server answers 429 or 503)."""


class EngineClosed(RuntimeError):
    """``submit`` after ``shutdown``."""


class EngineError(RuntimeError):
    """The decode thread failed; every request still running gets this from its iterator."""


# --- requests ------------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class SamplingParams:
    """One request's settings. ``temperature`` 0 is greedy; ``seed`` None draws a fresh seed. Generation stops at
    ``max_new_tokens``, at any of ``stop_token_ids`` or the tokenizer's <EOS> (unless ``ignore_eos``), or when the
    text contains one of the ``stop`` strings (the text then ends before it). ``logprobs`` (0-5) asks for the chosen
    token's log-probability and that many alternatives, taken from the model's own distribution (before
    temperature and filters)."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    stop: str | Sequence[str] = ()
    logprobs: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        self.stop_token_ids = tuple(self.stop_token_ids)
        self.validate()

    def validate(self) -> None:
        """Raises ValueError naming the first bad field."""
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not isinstance(self.temperature, int | float) or not 0 <= self.temperature < math.inf:  # and NaN
            raise ValueError(
                f"temperature must be a number >= 0 (0 = greedy) and finite, got {self.temperature!r}"
            )
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if self.top_p is not None and (
            not isinstance(self.top_p, int | float) or not 0.0 < self.top_p <= 1.0
        ):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**64
        ):  # torch.Generator.manual_seed's range: outside it the decode thread would fail
            raise ValueError(f"seed must be an integer from -2**63 to 2**64 - 1, got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be integers, got {self.stop_token_ids!r}")
        if self.logprobs is not None and not (
            isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise ValueError(f"logprobs must be an integer from 0 to {MAX_LOGPROBS}, got {self.logprobs!r}")


@dataclass
class Output:
    """One step of one request: the new token and the text it completes (possibly ""; text that could still
    become a stop string is held back). ``token_id`` is None only on a "cancelled" output."""

    token_id: int | None
    text: str
    logprob: float | None = None
    top_logprobs: dict[str, float] | None = None
    finish_reason: str | None = None  # None while running; "stop" | "length" | "cancelled" on the last one


@dataclass
class Result:
    """A whole request: every generated id (a stop token included), the text (without it), and why it ended."""

    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[float] | None = None
    top_logprobs: list[dict[str, float]] | None = None


class Request:
    """A submitted prompt. Iterate it (blocking) or ``aiter()`` it (asyncio) for its ``Output``s; ``cancel()``
    ends it at once. Any number of consumers may iterate; each sees every output from the first."""

    _ids = itertools.count()

    def __init__(self, on_cancel: Callable[[Request], None], prompt_ids: list[int], params: SamplingParams):
        self.id = next(self._ids)
        self.prompt_ids = prompt_ids
        self.params = params
        self.submitted_at = time.perf_counter()
        self._on_cancel = on_cancel  # the engine's: frees the slot before its next step
        self._outputs: list[Output] = []
        self._cond = threading.Condition()
        # set (under _cond) when the request ends; result() waits on it, which the per-token notifications of
        # _cond never wake
        self._finished = threading.Event()
        self._error: BaseException | None = None
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._on_finish: Callable[[Request], None] | None = None

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def cancel(self) -> None:
        """Ends the request with finish_reason "cancelled"; its slot is freed before the engine's next step."""
        if self._finish_with(Output(None, "", finish_reason="cancelled")):
            self._on_cancel(self)

    def _push(self, out: Output) -> bool:
        """Called by the decode thread; False once the request has ended (e.g. cancelled meanwhile)."""
        if out.finish_reason is not None:
            return self._finish_with(out)
        with self._cond:
            if self._finished.is_set():
                return False
            self._outputs.append(out)
            self._cond.notify_all()
            waiters = list(self._async_waiters)
        self._wake(waiters)
        return True

    def _finish_with(self, out: Output | None, error: BaseException | None = None) -> bool:
        with self._cond:
            if self._finished.is_set():
                return False
            self._finished.set()
            self._error = error
            if out is not None:
                self._outputs.append(out)
            self._cond.notify_all()
            waiters = list(self._async_waiters)
        self._wake(waiters)
        if self._on_finish is not None:
            self._on_finish(self)
        return True

    @staticmethod
    def _wake(waiters) -> None:
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the consumer's loop has closed
                pass

    def __iter__(self) -> Iterator[Output]:
        seen = 0
        while True:
            with self._cond:
                while seen == len(self._outputs) and not self._finished.is_set():
                    self._cond.wait()
                new = self._outputs[seen:]
                seen += len(new)
                done, error = self._finished.is_set() and seen == len(self._outputs), self._error
            yield from new
            if done:
                if error is not None:
                    raise EngineError(f"the engine's decode thread failed: {error!r}") from error
                return

    async def aiter(self) -> AsyncIterator[Output]:
        """``async for out in req.aiter()``: the same outputs without blocking the event loop."""
        loop, event = asyncio.get_running_loop(), asyncio.Event()
        with self._cond:
            self._async_waiters.append((loop, event))
        seen = 0
        try:
            while True:
                with self._cond:
                    event.clear()
                    new = self._outputs[seen:]
                    seen += len(new)
                    done, error = self._finished.is_set() and seen == len(self._outputs), self._error
                for out in new:
                    yield out
                if done:
                    if error is not None:
                        raise EngineError(f"the engine's decode thread failed: {error!r}") from error
                    return
                if not new:
                    await event.wait()
        finally:
            with self._cond:
                self._async_waiters.remove((loop, event))

    def result(self) -> Result:
        """Blocks until the request ends; everything it produced. It waits for the end only: iterating wakes the
        caller at every token, and each wake-up takes the GIL from the decode thread."""
        self._finished.wait()
        outs = list(self)
        tokens = [o.token_id for o in outs if o.token_id is not None]
        want = self.params.logprobs is not None
        return Result(
            prompt_ids=list(self.prompt_ids),
            token_ids=tokens,
            text="".join(o.text for o in outs),
            finish_reason=outs[-1].finish_reason,
            logprobs=[o.logprob for o in outs if o.token_id is not None] if want else None,
            top_logprobs=[o.top_logprobs for o in outs if o.token_id is not None] if want else None,
        )
