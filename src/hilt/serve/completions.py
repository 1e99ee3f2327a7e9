"""/v1/completions and /v1/chat/completions on top of the engine: one engine request per choice (n prompts x n
choices), their outputs merged as they come, returned whole or streamed as server-sent events in OpenAI's chunk
format ending with ``data: [DONE]``.

A stream's client that goes away cancels its engine requests at once: Starlette cancels the task that runs the
stream, and the ``finally`` below cancels every request still running (its slot is free before the next step).
A non-streamed request watches its connection the same way while it waits.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import StreamingResponse
from jinja2 import TemplateError

from hilt.engine import EngineClosed, EngineError, Output, QueueFull, SamplingParams
from hilt.serve.chat import ChatTemplate
from hilt.serve.errors import APIError, overloaded
from hilt.serve.logprobs import TokenTexts, prompt_texts, score_prompt, token_texts
from hilt.serve.schemas import (
    MAX_SEED,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Delta,
    TokenLogprob,
    TopLogprob,
    Usage,
)

log = logging.getLogger("hilt.serve")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # nginx: pass each event on at once

__all__ = ["ChatCompletionRequest", "CompletionRequest", "chat", "complete"]


# --- from a request body to engine requests ------------------------------------------------------------------


def _sampling(body, max_tokens: int, stops: list[str], logprobs: int | None, choice: int) -> SamplingParams:
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


def _check_limits(state, body, n_prompt: int, max_tokens: int | None, param: str) -> int:
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


def _submit(state, items: list[tuple[list[int], SamplingParams]]) -> list:
    """All of a request's choices or none: a full queue refuses the whole request."""
    engine = state.ready().engine
    submitted = []
    try:
        for ids, params in items:
            submitted.append(engine.submit(ids, params))
    except QueueFull:
        _cancel(submitted)
        raise overloaded("the server is busy: its queue is full; retry shortly") from None
    except EngineClosed:
        _cancel(submitted)
        raise overloaded("the server is shutting down", code="shutting_down") from None
    except ValueError as e:
        _cancel(submitted)
        raise APIError(400, str(e)) from None
    state.metrics.prompt_tokens.inc(sum(len(ids) for ids, _ in items))
    return submitted


def _cancel(requests) -> None:
    for r in requests:
        r.cancel()  # does nothing to a finished request


# --- merging the choices' outputs ----------------------------------------------------------------------------


async def _outputs(state, requests) -> AsyncIterator[tuple[int, Output]]:
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
        _cancel(requests)
        for task in tasks:
            task.cancel()


async def _collect(state, requests, http_request: Request) -> dict[int, list[Output]]:
    """Every output of every choice; the engine requests are cancelled if the client leaves meanwhile."""
    results: dict[int, list[Output]] = defaultdict(list)

    async def consume() -> None:
        async with aclosing(_outputs(state, requests)) as outputs:
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
            _cancel(requests)
    if consumer not in done:
        raise APIError(400, "the client closed the connection")  # nobody reads this; the log does
    consumer.result()  # re-raises an APIError (timeout, engine failure)
    return results


def _sse(payload) -> str:
    return f"data: {payload.model_dump_json()}\n\n"


class _EventStream(StreamingResponse):
    """Closes its event generators however the response ends. When the client leaves while an event is being
    sent, Starlette cancels the send and the generators stay suspended at a ``yield``; closing them here runs
    their ``finally`` (which cancels the engine requests) now instead of whenever they are garbage collected."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _stream(events: AsyncIterator[str]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async with aclosing(events) as inner:
                async for event in inner:
                    yield event
        except APIError as e:  # the status line is sent already: the error travels as an event
            yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"

    return _EventStream(body(), media_type="text/event-stream", headers=SSE_HEADERS)


def _usage(prompt_tokens: int, outputs: dict[int, list[Output]]) -> Usage:
    completion = sum(o.token_id is not None for outs in outputs.values() for o in outs)
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion
    )


# --- /v1/completions -----------------------------------------------------------------------------------------


def _completion_logprobs(entries: list[tuple[Output, str, int]], base: int, lp=None) -> CompletionLogprobs:
    """``entries`` from ``TokenTexts``; ``base``: where the generated text begins in the choice's text."""
    lp = lp if lp is not None else CompletionLogprobs()
    for o, text, offset in entries:
        lp.tokens.append(text)
        lp.token_logprobs.append(o.logprob)
        lp.top_logprobs.append(o.top_logprobs)
        lp.text_offset.append(base + offset)
    return lp


def _prompt_logprobs(tokenizer, prompt: str, ids: list[int], scores: list) -> CompletionLogprobs:
    """An echoed prompt's tokens, as OpenAI lists them: the first with no logprob (nothing precedes it)."""
    lp, offset = CompletionLogprobs(), 0
    for text, (logprob, top) in zip(prompt_texts(tokenizer, prompt, ids), scores, strict=True):
        lp.tokens.append(text)
        lp.token_logprobs.append(logprob)
        lp.top_logprobs.append(top)
        lp.text_offset.append(offset)
        offset += len(text)
    return lp


async def complete(state, body: CompletionRequest, http_request: Request):
    state.check_model(body.model)
    tokenizer = state.ready().tokenizer
    prompts = body.prompts
    # as `hilt generate` does: the text's tokens, no <BOS> in front; an empty prompt starts from <BOS>
    prompt_ids = [tokenizer.encode(p) or [tokenizer.bos_id] for p in prompts]
    max_tokens = body.max_tokens if body.max_tokens is not None else 16  # OpenAI's default
    for ids in prompt_ids:
        max_tokens = _check_limits(state, body, len(ids), max_tokens, "prompt")
    n = body.n
    items = [
        (ids, _sampling(body, max_tokens, body.stop_list, body.logprobs, c))
        for ids in prompt_ids
        for c in range(n)
    ]
    # echo with logprobs lists the prompt's tokens too, scored before any choice is queued
    prompt_scores = []
    if body.echo and body.logprobs is not None:
        engine = state.ready().engine
        prompt_scores = [await score_prompt(engine, tokenizer, ids, body.logprobs) for ids in prompt_ids]
    requests = _submit(state, items)
    name, rid = state.settings.served_model_name, f"cmpl-{uuid.uuid4().hex}"
    n_prompt = sum(len(ids) for ids in prompt_ids)

    def prompt_of(index: int) -> str:
        return prompts[index // n]

    def echo_logprobs(index: int) -> CompletionLogprobs | None:
        if not prompt_scores:
            return None
        p = index // n
        return _prompt_logprobs(tokenizer, prompts[p], prompt_ids[p], prompt_scores[p])

    if not body.stream:
        outputs = await _collect(state, requests, http_request)
        choices = []
        for index in range(len(requests)):
            outs = outputs[index]
            head = prompt_of(index) if body.echo else ""
            logprobs = None
            if body.logprobs is not None:
                entries = token_texts(tokenizer, outs)
                logprobs = _completion_logprobs(entries, len(head), echo_logprobs(index))
            text = head + "".join(o.text for o in outs)
            choices.append(
                CompletionChoice(
                    index=index, text=text, logprobs=logprobs, finish_reason=outs[-1].finish_reason
                )
            )
        return Completion(id=rid, model=name, choices=choices, usage=_usage(n_prompt, outputs))

    include_usage = body.stream_options is not None and body.stream_options.include_usage

    async def events() -> AsyncIterator[str]:
        def chunk(index: int, text: str, logprobs=None, finish=None) -> str:
            choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish)
            return _sse(Completion(id=rid, model=name, choices=[choice]))

        # the echoed prompt comes first, with its tokens' logprobs when asked for; text_offset counts from the
        # start of the choice's text (the echo included) in every chunk
        if body.echo:
            for index in range(len(requests)):
                yield chunk(index, prompt_of(index), echo_logprobs(index))
        base = {index: len(prompt_of(index)) if body.echo else 0 for index in range(len(requests))}
        texts = {index: TokenTexts(tokenizer) for index in range(len(requests))}
        outputs: dict[int, list[Output]] = defaultdict(list)
        async with aclosing(_outputs(state, requests)) as merged:
            async for index, out in merged:
                outputs[index].append(out)
                entries = texts[index].push(out)
                logprobs = None
                if body.logprobs is not None and entries:
                    logprobs = _completion_logprobs(entries, base[index])
                if out.text or logprobs or out.finish_reason:
                    yield chunk(index, out.text, logprobs, out.finish_reason)
        if include_usage:
            yield _sse(Completion(id=rid, model=name, choices=[], usage=_usage(n_prompt, outputs)))

    return _stream(events())


# --- /v1/chat/completions ------------------------------------------------------------------------------------


def _chat_logprobs(entries: list[tuple[Output, str, int]]) -> ChatLogprobs:
    """``entries`` from ``TokenTexts``: the tokens join to exactly the reply's content."""
    content = []
    for o, text, _ in entries:
        top = [
            TopLogprob(token=t, logprob=v, bytes=list(t.encode("utf-8")))
            for t, v in (o.top_logprobs or {}).items()
        ]
        content.append(
            TokenLogprob(token=text, logprob=o.logprob, bytes=list(text.encode("utf-8")), top_logprobs=top)
        )
    return ChatLogprobs(content=content)


async def chat(state, body: ChatCompletionRequest, http_request: Request):
    state.check_model(body.model)
    tokenizer = state.ready().tokenizer
    template: ChatTemplate = state.template
    messages = [{"role": m.role, "content": m.text} for m in body.messages]
    try:
        prompt = template.render(messages, add_generation_prompt=True)
    except TemplateError as e:
        raise APIError(400, f"the chat template refused these messages: {e}", param="messages") from None
    ids = tokenizer.encode(prompt) or [tokenizer.bos_id]
    max_tokens = _check_limits(state, body, len(ids), body.new_tokens, "messages")
    stops = body.stop_list + [s for s in template.stops if s not in body.stop_list]
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    requests = _submit(state, [(ids, _sampling(body, max_tokens, stops, logprobs, c)) for c in range(body.n)])
    name, rid = state.settings.served_model_name, f"chatcmpl-{uuid.uuid4().hex}"

    if not body.stream:
        outputs = await _collect(state, requests, http_request)
        choices = [
            ChatChoice(
                index=i,
                message=AssistantMessage(content="".join(o.text for o in outputs[i]).lstrip()),
                logprobs=_chat_logprobs(token_texts(tokenizer, outputs[i], strip_leading=True))
                if body.logprobs
                else None,
                finish_reason=outputs[i][-1].finish_reason,
            )
            for i in range(len(requests))
        ]
        return ChatCompletion(id=rid, model=name, choices=choices, usage=_usage(len(ids), outputs))

    include_usage = body.stream_options is not None and body.stream_options.include_usage

    async def events() -> AsyncIterator[str]:
        def chunk(index: int, delta: Delta, logprobs=None, finish=None) -> str:
            choice = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)
            return _sse(ChatCompletionChunk(id=rid, model=name, choices=[choice]))

        for index in range(len(requests)):
            yield chunk(index, Delta(role="assistant", content=""))
        started: set[int] = set()  # choices whose reply has begun (its leading space is dropped before that)
        texts = {index: TokenTexts(tokenizer, strip_leading=True) for index in range(len(requests))}
        outputs: dict[int, list[Output]] = defaultdict(list)
        async with aclosing(_outputs(state, requests)) as merged:
            async for index, out in merged:
                outputs[index].append(out)
                text = out.text if index in started else out.text.lstrip()
                if text:
                    started.add(index)
                entries = texts[index].push(out)
                logprobs = _chat_logprobs(entries) if body.logprobs and entries else None
                if text or logprobs:
                    yield chunk(index, Delta(content=text), logprobs)
                if out.finish_reason:
                    yield chunk(index, Delta(), finish=out.finish_reason)
        if include_usage:
            yield _sse(ChatCompletionChunk(id=rid, model=name, choices=[], usage=_usage(len(ids), outputs)))

    return _stream(events())
