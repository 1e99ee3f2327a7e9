"""Request and response bodies in OpenAI's shapes (completions, chat completions, models, errors), plus HILT's
/tokenize and /detokenize. Requests are validated strictly: "5" is not a number and an unknown role is an error,
so a client learns about its mistake instead of getting a silently different answer. Fields OpenAI defines that
HILT does not implement (penalties, logit_bias, suffix, tools, a JSON response_format) are refused when set,
never ignored. Fields whose rules a union type would hide (``stop``, ``prompt``) are checked by hand, so that the
message names the rule ("at most 4", "non-empty") instead of "Input should be a valid string".
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 4  # OpenAI's limit on stop strings per request
MAX_LOGPROBS = 5
MAX_SEED = 2**63 - 1

Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class _Request(BaseModel):
    # strict: no "5" -> 5 or "true" -> True; unknown fields (user, metadata, ...) are accepted and ignored
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class ResponseFormat(_Request):
    type: str  # "text" is what this server does; json_object and json_schema are refused


class _Sampling(_Request):
    """The fields completions and chat share."""

    model: str | None = None  # None: the one model this server serves
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0  # 0 = greedy
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=1)] | None = (
        None  # extension (vLLM, llama.cpp): sample from the k likeliest
    )
    n: Annotated[int, Field(ge=1)] = 1
    seed: Seed | None = None  # choice i of n draws with seed + i, so each choice repeats on its own
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension (vLLM): run to max_tokens even past <EOS>, e.g. for benchmarks
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value):
        if value is None:
            return value
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError(f"must be a string or a list of at most {MAX_STOP} strings")
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings are allowed; this request has {len(stops)}")
        if not all(stops):
            # "" would stop before the first token: never what a client meant
            raise ValueError("each stop string must be non-empty")
        return value

    @field_validator("response_format")
    @classmethod
    def _refuse_structured_output(cls, value):
        if value is not None and value.type != "text":
            raise ValueError(
                f"type {value.type!r} is not supported by this server: it cannot constrain the text to JSON; "
                'leave response_format unset or use {"type": "text"}'
            )
        return value

    @model_validator(mode="after")
    def _refuse_unimplemented(self):
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ValueError(f"{name} is not supported by this server; leave it at 0")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server")
        return self

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("must not be an empty list: send a string or a list of 1 or more strings")
            if any(isinstance(p, int | list) for p in value):
                raise ValueError("token-id prompts are not supported by this server: send the text")
        elif not isinstance(value, str):
            raise ValueError("must be a string or a list of strings")
        return value

    @model_validator(mode="after")
    def _refuse_unimplemented_completion(self):
        if self.suffix:
            raise ValueError("suffix (insertion) is not supported by this server")
        if self.best_of not in (None, self.n):
            raise ValueError("best_of is not supported by this server; leave it unset")
        return self

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # the newer name of max_tokens
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list | None = None

    @model_validator(mode="after")
    def _refuse_unimplemented_chat(self):
        if self.tools:
            raise ValueError("tools (function calling) are not supported by this server")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TokenizeRequest(_Request):
    model: str | None = None
    text: str = ""  # llama.cpp and vLLM call it content / prompt; one name here
    add_bos: bool = False


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


# --- responses -----------------------------------------------------------------------------------------------


def _now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """One entry per token of the choice's text (echoed prompt tokens first, the first of them with no logprob:
    nothing precedes it); the tokens join to exactly the text, and text_offset is where each begins in it."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "hilt"
    max_model_len: int  # extension (vLLM): the context, prompt plus new tokens
    hilt: dict  # extension: the architecture and parameter count, shown by the playground


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
