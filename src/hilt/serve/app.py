"""The FastAPI app: routes, the API key check, body limits, errors in OpenAI's shape, the playground page.

    app = create_app(AppSettings(served_model_name="demo"), load=lambda: Loaded(engine, tokenizer, info))

The model loads in a background thread after start-up (``load``), so /health answers 503 until it is ready and
200 from then on. Generation itself lives in ``hilt.serve.completions``; this module knows HTTP only.
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from hilt.serve import completions
from hilt.serve.chat import DEFAULT_TEMPLATE, ChatTemplate
from hilt.serve.errors import APIError, from_validation, overloaded
from hilt.serve.metrics import Metrics
from hilt.serve.schemas import DetokenizeRequest, ModelCard, ModelList, TokenizeRequest

log = logging.getLogger("hilt.serve")
BOS, EOS = "<BOS>", "<EOS>"  # hilt.data.tokenizer.SPECIAL_TOKENS: every HILT tokenizer has them
STATIC = Path(__file__).parent / "static"
# the page loads only its own files: no inline script, nothing from elsewhere
PAGE_POLICY = "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"


@dataclass(kw_only=True)
class AppSettings:
    """What the HTTP side enforces; the flags of `hilt serve` (docs/serving.md)."""

    served_model_name: str
    api_key: str | None = None  # Bearer token for everything but /health and the page; None = open
    cors_origins: list[str] = field(default_factory=list)  # empty = no CORS headers at all
    chat_template: ChatTemplate | None = None  # None = the default template
    max_body_bytes: int = 1_000_000
    max_n: int = 8
    max_tokens_cap: int = 0  # largest max_tokens a request may ask for; 0 = the model's context
    request_timeout: float = 600.0  # seconds from submission to the last token


@dataclass
class Loaded:
    """What ``load`` returns: a started engine, its tokenizer, and facts about the model for /v1/models."""

    engine: object  # hilt.generation.engine.Engine (not imported here: this module stays free of torch)
    tokenizer: object
    info: dict  # architecture, parameters, device, dtype
    created: int = 0  # the checkpoint's modification time


class State:
    """The app's one mutable object: the model once loaded, the metrics, the settings."""

    def __init__(self, settings: AppSettings, load: Callable[[], Loaded], on_load_error):
        self.settings = settings
        self.template = settings.chat_template or ChatTemplate(DEFAULT_TEMPLATE, BOS, EOS)
        self.metrics = Metrics(self.engine_stats)
        self.loaded: Loaded | None = None
        self._load, self._on_load_error = load, on_load_error
        self._closing = False
        self._lock = threading.Lock()

    def start_loading(self) -> None:
        threading.Thread(target=self._load_in_background, name="hilt-load", daemon=True).start()

    def _load_in_background(self) -> None:
        try:
            loaded = self._load()
        except BaseException as e:  # noqa: BLE001 - reported to the runner, which stops the server
            log.error("loading the model failed: %s", e)
            if self._on_load_error is not None:
                self._on_load_error(e)
            return
        with self._lock:
            if not self._closing:
                self.loaded = loaded
                log.info("model %s loaded: ready", self.settings.served_model_name)
                return
        loaded.engine.shutdown(timeout=0)  # the server stopped while the model was loading

    def drain(self, timeout: float) -> None:
        """Shutting down: no new requests (503); those running get ``timeout`` seconds to finish, then the
        engine cancels them and their streams end with an error event."""
        with self._lock:
            self._closing = True
            loaded = self.loaded
        if loaded is not None:
            loaded.engine.shutdown(timeout=timeout)

    def close(self) -> None:
        with self._lock:
            self._closing = True
            loaded, self.loaded = self.loaded, None
        if loaded is not None:
            loaded.engine.shutdown(
                timeout=0
            )  # uvicorn's grace period is over: whatever still runs is cancelled

    def engine_stats(self) -> dict | None:
        loaded = self.loaded
        return loaded.engine.stats() if loaded is not None else None

    def ready(self) -> Loaded:
        loaded = self.loaded
        if self._closing:
            raise overloaded("the server is shutting down", code="shutting_down")
        if loaded is None:
            raise overloaded("the model is still loading", retry_after=5, code="model_loading")
        return loaded

    @property
    def context(self) -> int:
        return self.ready().info["max_model_len"]

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.served_model_name:
            raise APIError(
                404,
                f"model '{name}' does not exist; this server serves '{self.settings.served_model_name}'",
                param="model",
                code="model_not_found",
            )


async def read_body(request: Request, schema: type[BaseModel], limit: int):
    """The body parsed into ``schema``, read no further than ``limit`` bytes."""
    length = request.headers.get("content-length", "")
    too_big = APIError(
        413, f"the request body is larger than this server accepts ({limit} bytes)", code="too_large"
    )
    if length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "the client closed the connection before sending the whole body") from None
    try:
        return schema.model_validate_json(b"".join(chunks))
    except ValidationError as e:
        raise from_validation(e) from None


def create_app(settings: AppSettings, load: Callable[[], Loaded], on_load_error=None) -> FastAPI:
    state = State(settings, load, on_load_error)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start_loading()
        yield
        state.close()

    # no /docs or /openapi.json: the API is OpenAI's, documented in docs/serving.md
    app = FastAPI(title="HILT", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.hilt = state
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )

    async def authorize(request: Request) -> None:  # async: no thread-pool hop per request
        key = settings.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest takes the same time wherever the strings differ: no guessing the key byte by byte
        if not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())):
            raise APIError(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    api = APIRouter(dependencies=[Depends(authorize)])

    # --- errors: every one in OpenAI's shape, never a traceback ---

    def error_response(error: APIError) -> JSONResponse:
        state.metrics.errors.labels(str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError):
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, error: HTTPException):
        if error.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see docs/serving.md for the endpoints"
            return error_response(APIError(404, message, code="unknown_route"))
        return error_response(APIError(error.status_code, str(error.detail), headers=error.headers))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError):
        return error_response(APIError(400, str(error.errors()[0].get("msg", "invalid request"))))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, "internal server error (the server's log has the details)"))

    # --- open routes ---
    # every GET answers HEAD too (uvicorn sends the headers only): monitors and link checkers ask with HEAD

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        state.ready()
        return {"status": "ok", "model": settings.served_model_name}

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # --- guarded routes ---

    def model_card() -> ModelCard:
        loaded = state.ready()
        return ModelCard(
            id=settings.served_model_name,
            created=loaded.created,
            max_model_len=loaded.info["max_model_len"],
            hilt=loaded.info,
        )

    @api.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models():
        return ModelList(data=[model_card()])

    @api.api_route("/v1/models/{name:path}", methods=["GET", "HEAD"])
    async def model(name: str):
        state.check_model(name)
        return model_card()

    @api.post("/v1/completions")
    async def create_completion(request: Request):
        body = await read_body(request, completions.CompletionRequest, settings.max_body_bytes)
        return await completions.complete(state, body, request)

    @api.post("/v1/chat/completions")
    async def create_chat_completion(request: Request):
        body = await read_body(request, completions.ChatCompletionRequest, settings.max_body_bytes)
        return await completions.chat(state, body, request)

    @api.post("/tokenize")
    async def tokenize(request: Request):
        body = await read_body(request, TokenizeRequest, settings.max_body_bytes)
        state.check_model(body.model)
        tokenizer = state.ready().tokenizer
        ids = tokenizer.encode(body.text)
        if body.add_bos:
            ids = [tokenizer.bos_id, *ids]
        return {"tokens": ids, "count": len(ids), "max_model_len": state.context}

    @api.post("/detokenize")
    async def detokenize(request: Request):
        body = await read_body(request, DetokenizeRequest, settings.max_body_bytes)
        state.check_model(body.model)
        tokenizer = state.ready().tokenizer
        vocab = tokenizer.vocab_size
        bad = [t for t in body.tokens if t >= vocab]
        if bad:
            raise APIError(
                400, f"token ids must be below the vocabulary size {vocab}, got {bad[0]}", param="tokens"
            )
        return {"text": tokenizer.decode(body.tokens, skip_special_tokens=False)}

    @api.api_route("/metrics", methods=["GET", "HEAD"])
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app.include_router(api)
    return app
