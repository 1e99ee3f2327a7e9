"""/v1/completions and /v1/chat/completions on top of the engine: one engine request per choice (n prompts x n
choices), their outputs merged as they come, returned whole or streamed as server-sent events in OpenAI's chunk
format ending with ``data: [DONE]`` (the plumbing both share is in ``dispatch.py``).
"""

from __future__ import annotations

import logging
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request
from jinja2 import TemplateError

from hilt.generation.engine import Output
from hilt.serve.chat import ChatTemplate
from hilt.serve.dispatch import (
    check_limits,
    collect,
    event_stream,
    merged_outputs,
    sse_event,
    submit,
    to_sampling,
    usage_of,
)
from hilt.serve.errors import APIError
from hilt.serve.logprobs import TokenTexts, prompt_texts, score_prompt, token_texts
from hilt.serve.schemas import (
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
)

log = logging.getLogger("hilt.serve")

__all__ = ["ChatCompletionRequest", "CompletionRequest", "chat", "complete"]


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
        max_tokens = check_limits(state, body, len(ids), max_tokens, "prompt")
    n = body.n
    items = [
        (ids, to_sampling(body, max_tokens, body.stop_list, body.logprobs, c))
        for ids in prompt_ids
        for c in range(n)
    ]
    # echo with logprobs lists the prompt's tokens too, scored before any choice is queued
    prompt_scores = []
    if body.echo and body.logprobs is not None:
        engine = state.ready().engine
        prompt_scores = [await score_prompt(engine, tokenizer, ids, body.logprobs) for ids in prompt_ids]
    requests = submit(state, items)
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
        outputs = await collect(state, requests, http_request)
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
        return Completion(id=rid, model=name, choices=choices, usage=usage_of(n_prompt, outputs))

    include_usage = body.stream_options is not None and body.stream_options.include_usage

    async def events() -> AsyncIterator[str]:
        def chunk(index: int, text: str, logprobs=None, finish=None) -> str:
            choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish)
            return sse_event(Completion(id=rid, model=name, choices=[choice]))

        # the echoed prompt comes first, with its tokens' logprobs when asked for; text_offset counts from the
        # start of the choice's text (the echo included) in every chunk
        if body.echo:
            for index in range(len(requests)):
                yield chunk(index, prompt_of(index), echo_logprobs(index))
        base = {index: len(prompt_of(index)) if body.echo else 0 for index in range(len(requests))}
        texts = {index: TokenTexts(tokenizer) for index in range(len(requests))}
        outputs: dict[int, list[Output]] = defaultdict(list)
        async with aclosing(merged_outputs(state, requests)) as merged:
            async for index, out in merged:
                outputs[index].append(out)
                entries = texts[index].push(out)
                logprobs = None
                if body.logprobs is not None and entries:
                    logprobs = _completion_logprobs(entries, base[index])
                if out.text or logprobs or out.finish_reason:
                    yield chunk(index, out.text, logprobs, out.finish_reason)
        if include_usage:
            yield sse_event(Completion(id=rid, model=name, choices=[], usage=usage_of(n_prompt, outputs)))

    return event_stream(events())


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
    max_tokens = check_limits(state, body, len(ids), body.new_tokens, "messages")
    stops = body.stop_list + [s for s in template.stops if s not in body.stop_list]
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    requests = submit(
        state, [(ids, to_sampling(body, max_tokens, stops, logprobs, c)) for c in range(body.n)]
    )
    name, rid = state.settings.served_model_name, f"chatcmpl-{uuid.uuid4().hex}"

    if not body.stream:
        outputs = await collect(state, requests, http_request)
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
        return ChatCompletion(id=rid, model=name, choices=choices, usage=usage_of(len(ids), outputs))

    include_usage = body.stream_options is not None and body.stream_options.include_usage

    async def events() -> AsyncIterator[str]:
        def chunk(index: int, delta: Delta, logprobs=None, finish=None) -> str:
            choice = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)
            return sse_event(ChatCompletionChunk(id=rid, model=name, choices=[choice]))

        for index in range(len(requests)):
            yield chunk(index, Delta(role="assistant", content=""))
        started: set[int] = set()  # choices whose reply has begun (its leading space is dropped before that)
        texts = {index: TokenTexts(tokenizer, strip_leading=True) for index in range(len(requests))}
        outputs: dict[int, list[Output]] = defaultdict(list)
        async with aclosing(merged_outputs(state, requests)) as merged:
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
            yield sse_event(
                ChatCompletionChunk(id=rid, model=name, choices=[], usage=usage_of(len(ids), outputs))
            )

    return event_stream(events())
