"""The batched generation engine: one model decoding many requests together, with continuous batching.

    from hilt.generation.engine import Engine, SamplingParams
    with Engine(model, tokenizer, max_slots=16, compute_dtype=torch.bfloat16) as engine:
        req = engine.submit(tokenizer.encode("ROMEO:"), SamplingParams(max_new_tokens=40, temperature=0.8, seed=0))
        for out in req:                       # or: async for out in req.aiter()
            print(out.text, end="", flush=True)

How it works. One background thread owns the model and runs the decoding loop; ``submit`` only queues. Each
*step* the thread (1) admits waiting requests into free *slots* (rows of a pre-allocated ``SlotCache``), (2)
prefills the rows that need it, several prompts of similar length in one right-padded call within a token budget,
and samples their first token, (3) runs one decoding call for every other running row, each with its own
position and a mask over its own keys, and samples each row with its own settings and its own
``torch.Generator``, (4) streams each request its new token and text, and frees the slots of rows that
finished. A request joins between two steps and leaves the step it finishes, so a short request never waits for
a long one. Running rows stay packed in slots 0..n-1 (a finishing row's slot is refilled by moving the last row's
cache), so the decoding call reads views of the cache, never gathered copies.

Exactness. Every row reads the same window of tokens that ``hilt.generation.generate`` reads for that sequence alone
(``context_start``: past ``max_seq_len`` the window slides, and a slide re-prefills only that row), with the same
weights (``decoding_weights``) and the same sampling code on its own (1, V) logits. Batched matrix products
sum in other orders than single-row ones, so logits agree to float rounding, not bit for bit; greedy and seeded
tokens are the same unless two candidates tie to within that rounding (the tests check whole sequences).

Process-wide switches (the oneDNN switch for single-token steps) are applied only on the decode thread. OpenMP
keeps worker threads per thread that ran parallel operators; the engine ends the caller's when it starts and at
each submit, and the decode thread's whenever it runs dry (``hilt.device.release_openmp_workers``: with two pools
alive on a small machine every parallel operator of a step wakes a sleeping worker). ``threads="auto"`` lets the
decode thread pick its own torch thread count and change it as the machine's load changes (``hilt.generation.threads``: one
thread per core collapses when other work holds the cores).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from hilt import memory
from hilt.device import release_openmp_workers
from hilt.generation.decode_loop import DecodeLoop
from hilt.generation.decoding import cache_dtype, decoding_weights
from hilt.generation.request import (  # noqa: F401 (re-exported: the engine's public API)
    FINISH_REASONS,
    MAX_LOGPROBS,
    EngineClosed,
    EngineError,
    Output,
    QueueFull,
    Request,
    Result,
    SamplingParams,
)
from hilt.generation.rows import Row
from hilt.generation.threads import DecodeThreads
from hilt.model import HierarchicalTransformer
from hilt.model.kv_cache import SlotCache

# --- the engine ----------------------------------------------------------------------------------------------


@dataclass
class _Counters:
    steps: int = 0
    decode_calls: int = 0
    decode_rows: int = 0
    prefill_calls: int = 0
    generated_tokens: int = 0
    prefill_tokens: int = 0
    padded_prefill_tokens: int = 0
    finished: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FINISH_REASONS, 0))


class Engine(DecodeLoop):
    """Decodes many requests together on one model (see the module docstring).

    ``max_slots`` rows of KV cache are allocated at ``start`` (fewer when ``cache_memory`` bytes cannot hold
    that many full windows); ``max_queue`` requests may wait beyond them before ``submit`` raises ``QueueFull``.
    ``compute_dtype`` (e.g. torch.bfloat16) runs the matrix products in that precision as ``hilt.generation.generate``
    does; None keeps the model's. ``prefill_tokens`` bounds the prompt tokens prefilled per step, so that a
    burst of new prompts delays the running rows by a bounded amount (one prompt longer than it still goes
    whole, in a call of its own). ``threads``: torch's thread count on the decode thread; None keeps the
    process's setting (``torch.set_num_threads`` before ``start``), ``"auto"`` picks one up to that setting and
    changes it as the load changes (``hilt.generation.threads``), an int fixes it.
    """

    def __init__(
        self,
        model: HierarchicalTransformer,
        tokenizer=None,
        max_slots: int = 16,
        compute_dtype: torch.dtype | None = None,
        *,
        max_queue: int = 1024,
        cache_memory: int | None = None,
        prefill_tokens: int = 512,
        threads: int | str | None = None,
    ):
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if not (threads in (None, "auto") or (isinstance(threads, int) and threads >= 1)):
            raise ValueError(f"threads must be None, 'auto' or an int >= 1, got {threads!r}")
        self.threads = threads
        self._threads: DecodeThreads | None = None  # made on the decode thread, which owns the setting
        self.model = model
        self.tokenizer = tokenizer
        self.compute_dtype = compute_dtype
        self.max_queue = max_queue
        self.prefill_tokens = max(1, prefill_tokens)
        c = model.config
        self.max_seq_len = c.max_seq_len
        self.device = model.head.weight.device
        self.cache_dtype = cache_dtype(compute_dtype or model.head.weight.dtype, self.device)
        per_slot = SlotCache.bytes_per_slot(c.n_layers, c.max_seq_len, c.d_model, self.cache_dtype)
        self.n_slots = max_slots if cache_memory is None else max(1, min(max_slots, cache_memory // per_slot))
        self.cache_bytes = self.n_slots * per_slot
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self._waiting: deque[Request] = deque()
        self._rows: list[Row] = []  # the running rows, in slot order after each _pack
        self._lock = threading.Condition()
        self._closing = False  # no new requests
        self._stopping = False  # the thread leaves its loop
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._counters = _Counters()

    # --- the public side: any thread ---

    def start(self) -> Engine:
        """Builds the decoding copy of the weights and the cache once, then starts the decode thread."""
        if self._thread is not None:
            return self
        if self.model.training:
            raise ValueError("the engine decodes with the model in eval mode: call model.eval() first")
        c = self.model.config
        # the bf16 copy of the layers and the head is built here, once, not per request
        self.decoder, self.head = decoding_weights(self.model, self.compute_dtype)
        self.cache = SlotCache(
            c.n_layers,
            self.n_slots,
            c.max_seq_len,
            c.n_heads,
            c.d_model // c.n_heads,
            self.cache_dtype,
            self.device,
        )
        memory.large_blocks_from_the_heap()  # process-wide; see its docstring for what it saves a decoding step
        release_openmp_workers()  # this thread's, idle from now on: they would slow the decode thread's down
        self._thread = threading.Thread(target=self._run, name="hilt-engine", daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown(timeout=0 if exc[0] is not None else None)

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams | None = None) -> Request:
        """Queues a request; raises QueueFull when ``max_queue`` requests are already waiting, EngineClosed after
        ``shutdown``, ValueError for an empty prompt or a token id outside the vocabulary."""
        return self._submit(prompt_ids, params, bounded=True)

    def _submit(self, prompt_ids, params, bounded: bool, on_finish=None) -> Request:
        params = params or SamplingParams()
        params.validate()
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise ValueError("the prompt needs at least one token (e.g. <BOS>)")
        vocab = self.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got one outside")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need the engine's tokenizer")
        request = Request(self._cancelled, ids, params)
        request._on_finish = on_finish
        release_openmp_workers()  # the submitting thread's, if it ran parallel operators since (see start)
        with self._lock:
            if self._closing:
                raise EngineClosed("the engine is shutting down")
            if self._error is not None:
                raise EngineError(f"the engine's decode thread failed: {self._error!r}")
            if bounded and len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests already waiting (max_queue {self.max_queue})")
            self._waiting.append(request)
            self._lock.notify_all()
        return request

    def generate(self, items: Iterable[tuple[Sequence[int], SamplingParams | None]]) -> list[Result]:
        """Runs every (prompt ids, params) and returns their results in input order (starts the engine if needed;
        the queue bound does not apply)."""
        results: dict[int, Result] = {}
        for index, result in self.generate_iter(items):
            results[index] = result
        return [results[i] for i in range(len(results))]

    def generate_iter(
        self, items: Iterable[tuple[Sequence[int], SamplingParams | None]], *, in_flight: int | None = None
    ) -> Iterator[tuple[int, Result]]:
        """Yields (input index, result) as requests finish. At most ``in_flight`` (default 4 x slots) requests are
        submitted ahead, so an endless input is fine. Leaving the loop early cancels those still running."""
        self.start()
        in_flight = in_flight or 4 * self.n_slots
        finished: queue.SimpleQueue[tuple[int, Request]] = queue.SimpleQueue()
        pending: dict[int, Request] = {}
        source = iter(enumerate(items))
        exhausted = False
        try:
            while True:
                refill = []
                while not exhausted and len(pending) + len(refill) < in_flight:
                    item = next(source, None)
                    if item is None:
                        exhausted = True
                    else:
                        refill.append(item)
                with self._lock:  # the decode thread sees the whole refill at once and prefills it together
                    for index, (ids, params) in refill:
                        pending[index] = self._submit(
                            ids, params, bounded=False, on_finish=lambda r, i=index: finished.put((i, r))
                        )
                if not pending:
                    return
                index, request = finished.get()
                if pending.pop(index, None) is not None:
                    yield index, request.result()
        finally:
            for request in pending.values():
                request.cancel()

    def stats(self) -> dict:
        with self._lock:
            c = self._counters
            return {
                "running": sum(not r.request.finished for r in self._rows),
                "waiting": len(self._waiting),
                "slots": self.n_slots,
                "max_queue": self.max_queue,
                "cache_bytes": self.cache_bytes,
                "steps": c.steps,
                "decode_calls": c.decode_calls,
                "decode_rows": c.decode_rows,
                "prefill_calls": c.prefill_calls,
                "generated_tokens": c.generated_tokens,
                "prefill_tokens": c.prefill_tokens,
                "padded_prefill_tokens": c.padded_prefill_tokens,
                "finished": dict(c.finished),
                "alive": self._thread is not None and self._thread.is_alive(),
                "threads": self._threads.count if self._threads is not None else None,
            }

    def shutdown(self, timeout: float | None = None) -> None:
        """Stops accepting requests, lets the running and waiting ones finish for up to ``timeout`` seconds (None:
        as long as they take), cancels the rest and joins the decode thread."""
        with self._lock:
            self._closing = True
            deadline = None if timeout is None else time.monotonic() + timeout
            while (self._rows or self._waiting) and self._thread is not None and self._thread.is_alive():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._lock.wait(left if left is None else min(left, 0.1))
            leftover = list(self._waiting) + [r.request for r in self._rows]
        for request in leftover:
            request.cancel()
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _cancelled(self, request: Request) -> None:
        with self._lock:
            self._counters.finished["cancelled"] += 1
            if request in self._waiting:
                self._waiting.remove(request)
            # a running request's slot is freed by the decode thread before its next step
            self._lock.notify_all()
