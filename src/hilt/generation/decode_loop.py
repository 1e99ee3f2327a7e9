"""The engine's decode thread: the loop that admits requests into slots, prefills, decodes every running row in
one call, samples each row and frees the slots of finished ones (see ``engine.py`` for how it all fits). The
``Engine`` is a ``DecodeLoop``: these are its methods that only the decode thread calls, apart from the ones any
thread may call.
"""

from __future__ import annotations

import torch

from hilt.device import release_openmp_workers
from hilt.generation.decoding import without_onednn
from hilt.generation.request import Request
from hilt.generation.rows import Row, sample_rows
from hilt.generation.sampling import TextStreamer
from hilt.generation.threads import DecodeThreads


class DecodeLoop:
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

    def _ended(self, row: Row) -> bool:
        if row.request.finished:
            self.cache.free(row.slot)
            return True
        return False

    def _new_row(self, request: Request) -> Row:
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
        return Row(request, list(request.prompt_ids), generator, streamer, frozenset(stop_ids))

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

    def _prefill_groups(self, rows: list[Row]) -> list[list[Row]]:
        """Rows of similar window lengths together, so that right-padding wastes at most a quarter of a call."""
        lengths = {id(r): len(r.tokens) - r.window_start(self.max_seq_len) for r in rows}
        groups: list[list[Row]] = []
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

    def _prefill(self, group: list[Row]) -> None:
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

    def _decode(self, rows: list[Row]) -> None:
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

    def _sample_and_emit(self, rows: list[Row], logits: torch.Tensor) -> None:
        token_text = self._token_text
        for row, token, logprob, top in sample_rows(rows, logits, token_text):
            finish = row.emit(token, logprob, top)
            # the counters are written by this thread only; stats() may read them a step behind
            self._counters.generated_tokens += 1
            if finish is not None:
                self._counters.finished[finish] += 1

    def _token_text(self, token: int) -> str:
        if self.tokenizer is None:
            return str(token)
        return self.tokenizer.decode([token], skip_special_tokens=False)
