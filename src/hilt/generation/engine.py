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
from hilt.generation.decoding import cache_dtype, decoding_weights, without_onednn
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
from hilt.generation.sampling import TextStreamer, context_start, sample_next_token
from hilt.generation.threads import DecodeThreads
from hilt.model import HierarchicalTransformer
from hilt.model.kernels import greedy_tokens
from hilt.model.kv_cache import SlotCache


@dataclass(eq=False)
class _Row:
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


class Engine:
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
        self._rows: list[_Row] = []  # the running rows, in slot order after each _pack
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

    # --- the decode thread ---

    def _run(self) -> None:
        self._threads = DecodeThreads(self.threads, self.device)
        try:
            with torch.inference_mode():
                while self._next_batch():
                    # only a step that prefills nothing is timed for the thread choice
                    rows = len(self._rows) if all(r.ready for r in self._rows) else None
                    self._threads.step(self._step, rows)
        except BaseException as error:  # noqa: BLE001 - every request must hear about it, then it propagates
            with self._lock:
                self._error = error
                leftover = list(self._waiting) + [r.request for r in self._rows]
                self._waiting.clear()
                self._rows.clear()
                self._lock.notify_all()
            for request in leftover:
                request._finish_with(None, error)
            raise
        finally:
            self._threads.close()

    def _next_batch(self) -> bool:
        """Waits for work; drops ended rows, admits waiting requests into free slots. False: time to stop."""
        with self._lock:
            while True:
                self._rows = [r for r in self._rows if not self._ended(r)]
                while self._waiting and len(self._rows) < self.n_slots:
                    request = self._waiting.popleft()
                    if not request.finished:
                        self._rows.append(self._new_row(request))
                if self._rows:
                    return True
                self._lock.notify_all()  # shutdown waits for the engine to run dry
                if self._stopping:
                    return False
                release_openmp_workers()  # an idle engine holds none, so it slows no other thread's down
                self._threads.idle()
                self._lock.wait()

    def _ended(self, row: _Row) -> bool:
        if row.request.finished:
            self.cache.free(row.slot)
            return True
        return False

    def _new_row(self, request: Request) -> _Row:
        p = request.params
        generator = None
        if p.temperature > 0:
            generator = torch.Generator(device=self.device)
            if p.seed is None:
                generator.seed()
            else:
                generator.manual_seed(p.seed)
        stop_ids = set(p.stop_token_ids)
        if self.eos_id is not None and not p.ignore_eos:
            stop_ids.add(self.eos_id)
        streamer = TextStreamer(self.tokenizer) if self.tokenizer is not None else None
        return _Row(request, list(request.prompt_ids), generator, streamer, frozenset(stop_ids))

    def _step(self) -> None:
        rows = self._rows
        for row in rows:
            if row.ready and row.window_start(self.max_seq_len) != row.start:
                row.ready = False  # the window slid: re-read it from scratch, this row only
        if not all(r.ready for r in rows) or rows[-1].slot != len(rows) - 1:
            self._pack()  # someone left, joins or slid (otherwise the rows are packed already)
        waiting = [r for r in rows if not r.ready]
        decoding = [r for r in self._rows if r.ready]
        # prefill first: a newly arrived request gets its first token without waiting for a decoding call
        budget, chosen = self.prefill_tokens, []
        for row in waiting:
            n = len(row.tokens) - row.window_start(self.max_seq_len)
            if chosen and n > budget:
                break
            chosen.append(row)
            budget -= n
        for group in self._prefill_groups(chosen):
            self._prefill(group)
        if decoding:
            self._decode(decoding)
        self._counters.steps += 1

    def _pack(self) -> None:
        """Slots 0..d-1 for the d rows whose cache continues, in slot order; the rows to prefill after them (their
        slots' contents are about to be rewritten, so only continuing rows' caches move)."""
        rows = self._rows
        keep = sorted((r for r in rows if r.ready and r.slot >= 0), key=lambda r: r.slot)
        d = len(keep)
        taken = {r.slot for r in keep if r.slot < d}
        holes = (s for s in range(d) if s not in taken)
        for row in keep:
            if row.slot >= d:
                target = next(holes)
                self.cache.move(row.slot, target)
                row.slot = target
        keep.sort(key=lambda r: r.slot)
        rest = [r for r in rows if not (r.ready and r.slot >= 0)]
        for slot, row in enumerate(rest, start=d):
            row.slot, row.ready = slot, False
        self._rows = keep + rest

    def _prefill_groups(self, rows: list[_Row]) -> list[list[_Row]]:
        """Rows of similar window lengths together, so that right-padding wastes at most a quarter of a call."""
        lengths = {id(r): len(r.tokens) - r.window_start(self.max_seq_len) for r in rows}
        groups: list[list[_Row]] = []
        for row in sorted(rows, key=lambda r: lengths[id(r)]):
            group = groups[-1] if groups else None
            if group:
                n = lengths[id(row)]
                real = sum(lengths[id(r)] for r in group) + n
                padded = n * (len(group) + 1)
                if padded <= self.prefill_tokens and real >= 0.75 * padded:
                    group.append(row)
                    continue
            groups.append([row])
        return groups

    def _prefill(self, group: list[_Row]) -> None:
        starts = [r.window_start(self.max_seq_len) for r in group]
        windows = [r.tokens[s:] for r, s in zip(group, starts, strict=True)]
        T = max(len(w) for w in windows)
        ids = torch.zeros(len(group), T, dtype=torch.long)  # right-padded; the padding is never attended to
        for i, w in enumerate(windows):
            ids[i, : len(w)] = torch.tensor(w)
        ids = ids.to(self.device)
        self.cache.bind([r.slot for r in group], [len(w) for w in windows], fresh=True)
        with without_onednn(self.device, ids.numel()):
            hidden = self.decoder.features(ids, cache=self.cache)  # (B, T, C)
            last = torch.tensor([len(w) - 1 for w in windows], device=self.device)
            logits = self._head(hidden[torch.arange(len(group), device=self.device), last])
        for row, start in zip(group, starts, strict=True):
            row.start, row.ready = start, True
        self._counters.prefill_calls += 1
        self._counters.prefill_tokens += sum(len(w) for w in windows)
        self._counters.padded_prefill_tokens += ids.numel()
        self._sample_and_emit(group, logits)

    def _decode(self, rows: list[_Row]) -> None:
        """One new token for each of the d packed rows in slots 0..d-1."""
        d = len(rows)
        ids = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)  # (d, 1)
        self.cache.bind(list(range(d)), [1] * d, fresh=False)
        with without_onednn(self.device, d):
            if (
                d == 1
            ):  # the single-sequence path of hilt.generation.generate: the position comes from the cache
                hidden = self.decoder.features(ids, cache=self.cache)
            else:
                hidden = self.decoder.features(
                    ids,
                    cache=self.cache,
                    positions=self.cache.positions(),
                    attn_mask=self.cache.padding_mask(),
                )
            logits = self._head(hidden[:, -1])
        self._counters.decode_calls += 1
        self._counters.decode_rows += d
        self._sample_and_emit(rows, logits)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, C) -> (B, V) fp32, as hilt.generation.generate computes it."""
        return self.head(hidden).float()

    def _sample_and_emit(self, rows: list[_Row], logits: torch.Tensor) -> None:
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
                logprob, top = self._logprobs(logits[i], token, p.logprobs)
            if row.first_token_at is None:
                row.first_token_at = now
            self._emit(row, token, logprob, top)

    def _logprobs(self, logits: torch.Tensor, token: int, k: int) -> tuple[float, dict[str, float] | None]:
        logprobs = logits.float().log_softmax(dim=-1)
        top = None
        if k:
            values, ids = logprobs.topk(k)
            top = {self._token_text(t): v for t, v in zip(ids.tolist(), values.tolist(), strict=True)}
        return float(logprobs[token]), top

    def _token_text(self, token: int) -> str:
        if self.tokenizer is None:
            return str(token)
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def _emit(self, row: _Row, token: int, logprob, top) -> None:
        p = row.request.params
        row.generated += 1
        finish = None
        if token in row.stop_ids:
            finish = "stop"  # the stop token's own text is not part of the output
            piece = row.streamer.flush() if row.streamer else ""
        else:
            row.tokens.append(token)
            piece = row.streamer.push(token) if row.streamer else ""
            if row.generated >= p.max_new_tokens:
                finish = "length"
                piece += row.streamer.flush() if row.streamer else ""
        text = row.held + piece
        hit = min((i for i in (text.find(s) for s in p.stop) if i >= 0), default=-1)
        if hit >= 0:
            finish, text, row.held = "stop", text[:hit], ""
        elif finish is None and p.stop:
            keep = _stop_prefix_length(text, p.stop)
            text, row.held = text[: len(text) - keep], text[len(text) - keep :]
        else:
            row.held = ""
        row.request._push(Output(token, text, logprob, top, finish))
        # the counters are written by this thread only; stats() may read them a step behind
        self._counters.generated_tokens += 1
        if finish is not None:
            self._counters.finished[finish] += 1


def _stop_prefix_length(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that is the beginning of a stop string (it could still complete)."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
