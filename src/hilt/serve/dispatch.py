"""What both endpoints share: a request body's choices as engine requests (sampling settings, limits, submission,
cancellation), their outputs merged as they come, and server-sent events.

A stream's client that goes away cancels its engine requests at once: Starlette cancels the task that runs the
stream, and the ``finally`` in ``merged_outputs`` cancels every request still running (its slot is free before the next
step). A non-streamed request watches its connection the same way while it waits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import StreamingResponse

from hilt.generation.engine import EngineClosed, EngineError, Output, QueueFull, SamplingParams
from hilt.serve.errors import APIError, overloaded
from hilt.serve.schemas import MAX_SEED, Usage

log = logging.getLogger("hilt.serve")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # nginx: pass each event on at once


# --- from a request body to engine requests ------------------------------------------------------------------


def to_sampling(body, max_tokens: int, stops: list[str], logprobs: int | None, choice: int) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_tokens,
        temperature=float(body.temperature),  # 0 stays 0 (greedy): never `temperature or default`
        top_k=body.top_k,
        top_p=None if body.top_p >= 1.0 else float(body.top_p),
        seed=None if body.seed is None else (body.seed + choice) % (MAX_SEED + 1),
        stop=stops,
        logprobs=logprobs,
        ignore_eos=body.ignore_eos,
    )


def check_limits(state, body, n_prompt: int, max_tokens: int | None, param: str) -> int:
    """The number of new tokens to generate; 400 naming the numbers when they do not fit."""
    s, context = state.settings, state.context
    if body.n > s.max_n:
        raise APIError(400, f"n is {body.n}; this server allows at most {s.max_n} choices", param="n")
    cap = min(s.max_tokens_cap or context, context)
    if max_tokens is not None and max_tokens > cap:
        raise APIError(
            400, f"max_tokens is {max_tokens}; this server allows at most {cap}", param="max_tokens"
        )
    if n_prompt >= context:
        raise APIError(
            400,
            f"the prompt is {n_prompt} tokens; this model's context is {context} tokens, so a prompt may have "
            f"at most {context - 1}",
            param=param,
            code="context_length_exceeded",
        )
    if max_tokens is None:  # chat: as many as fit
        return min(cap, context - n_prompt)
    if n_prompt + max_tokens > context:
        raise APIError(
            400,
            f"this model's context is {context} tokens, but the prompt has {n_prompt} tokens and max_tokens asks "
            f"for {max_tokens} more ({n_prompt + max_tokens}); shorten the prompt or lower max_tokens",
            param="max_tokens",
            code="context_length_exceeded",
        )
    return max_tokens


def submit(state, items: list[tuple[list[int], SamplingParams]]) -> list:
    """All of a request's choices or none: a full queue refuses the whole request."""
    engine = state.ready().engine
    submitted = []
    try:
        for ids, params in items:
            submitted.append(engine.submit(ids, params))
    except QueueFull:
        cancel_all(submitted)
        raise overloaded("the server is busy: its queue is full; retry shortly") from None
    except EngineClosed:
        cancel_all(submitted)
        raise overloaded("the server is shutting down", code="shutting_down") from None
    except ValueError as e:
        cancel_all(submitted)
        raise APIError(400, str(e)) from None
    state.metrics.prompt_tokens.inc(sum(len(ids) for ids, _ in items))
    return submitted


def cancel_all(requests) -> None:
    for r in requests:
        r.cancel()  # does nothing to a finished request


# --- merging the choices' outputs ----------------------------------------------------------------------------


async def merged_outputs(state, requests) -> AsyncIterator[tuple[int, Output]]:
    """(choice index, output) as they arrive from the engine, until every choice has finished. Leaving early
    (the client went away, the timeout, an error) cancels the requests still running."""
    metrics, loop = state.metrics, asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, request) -> None:
        try:
            async for out in request.aiter():
                queue.put_nowait((index, out, None))
        except EngineError as e:
            queue.put_nowait((index, None, e))
            return
        queue.put_nowait((index, None, None))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
    deadline = loop.time() + state.settings.request_timeout
    last: dict[int, float] = {}
    running = len(tasks)
    try:
        while running:
            try:
                index, out, error = await asyncio.wait_for(queue.get(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise APIError(
                    504, f"the request ran past the server's {state.settings.request_timeout:g} s timeout"
                ) from None
            if error is not None:
                log.error("engine failure: %s", error)
                raise APIError(500, "the model failed while generating (the server's log has the details)")
            if out is None:
                running -= 1
                continue
            now, started = time.perf_counter(), requests[index].submitted_at
            if out.token_id is not None:
                metrics.generation_tokens.inc()
                if index in last:
                    metrics.tpot.observe(now - last[index])
                else:
                    metrics.ttft.observe(now - started)
                last[index] = now
            if out.finish_reason is not None:
                metrics.latency.observe(now - started)
                if out.finish_reason == "cancelled":  # the engine shut down under it
                    raise overloaded("the server is shutting down", code="shutting_down")
            yield index, out
    finally:
        cancel_all(requests)
        for task in tasks:
            task.cancel()


async def collect(state, requests, http_request: Request) -> dict[int, list[Output]]:
    """Every output of every choice; the engine requests are cancelled if the client leaves meanwhile."""
    results: dict[int, list[Output]] = defaultdict(list)

    async def consume() -> None:
        async with aclosing(merged_outputs(state, requests)) as outputs:
            async for index, out in outputs:
                results[index].append(out)

    async def disconnected() -> None:
        while (await http_request.receive())["type"] != "http.disconnect":
            pass

    consumer, watcher = asyncio.create_task(consume()), asyncio.create_task(disconnected())
    done: set = set()
    try:
        done, _ = await asyncio.wait({consumer, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if consumer not in done:  # the client left (or this task was cancelled): free the slots now
            consumer.cancel()
            cancel_all(requests)
    if consumer not in done:
        raise APIError(400, "the client closed the connection")  # nobody reads this; the log does
    consumer.result()  # re-raises an APIError (timeout, engine failure)
    return results


def sse_event(payload) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


class EventStream(StreamingResponse):
    """Closes its event generators however the response ends. When the client leaves while an event is being
    sent, Starlette cancels the send and the generators stay suspended at a ``yield``; closing them here runs
    their ``finally`` (which cancels the engine requests) now instead of whenever they are garbage collected."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async with aclosing(events) as inner:
                async for event in inner:
                    yield event
        except APIError as e:  # the status line is sent already: the error travels as an event
            yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"

    return EventStream(body(), media_type="text/event-stream", headers=SSE_HEADERS)


def usage_of(prompt_tokens: int, outputs: dict[int, list[Output]]) -> Usage:
    completion = sum(o.token_id is not None for outs in outputs.values() for o in outs)
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion
    )
