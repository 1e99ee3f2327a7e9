"""`hilt serve`: settings, the model loader and uvicorn, with a clean exit on SIGTERM.

Shutting down (SIGTERM or Ctrl+C): uvicorn stops listening at once, lets the requests in flight finish for up to
``shutdown_grace`` seconds, then cancels the rest (their engine requests with them); the engine stops and the
process exits 0 on SIGTERM.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading
from pathlib import Path

import uvicorn

from hilt.errors import UserError
from hilt.serve.config import ServeConfig  # noqa: F401 (re-exported)


class _Server(uvicorn.Server):
    """uvicorn, with HILT's shutdown.

    When told to stop, uvicorn closes its sockets and waits for the requests in flight; meanwhile ``drain`` lets
    the engine finish them for up to the grace period and then cancels the rest, so that each stream still ends
    properly (an error event and ``data: [DONE]``) instead of being cut by uvicorn's own timeout, which stays as
    a backstop. And uvicorn re-raises a captured SIGTERM after shutting down, so the process would die by the
    signal (status 143); a server told to stop has stopped cleanly, so it exits 0 instead. Ctrl+C keeps its
    KeyboardInterrupt (the CLI prints "interrupted" and exits 130)."""

    def __init__(self, config: uvicorn.Config, drain):
        super().__init__(config)
        self._drain = drain

    async def shutdown(self, sockets=None) -> None:
        threading.Thread(target=self._drain, name="hilt-drain", daemon=True).start()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]


def load_engine(cfg: ServeConfig):
    """What the app's background loader runs: model, tokenizer and a started engine."""
    from hilt.checkpoint.store import load_model_and_tokenizer
    from hilt.device import autocast_dtype, resolve_device, set_cpu_threads
    from hilt.generation.engine import Engine
    from hilt.serve.app import Loaded

    set_cpu_threads(cfg.threads)  # an explicit --threads holds for the whole server process
    device = resolve_device(cfg.device)
    model, tokenizer, _ = load_model_and_tokenizer(cfg.model_path, device)
    dtype = autocast_dtype(device, cfg.amp)
    engine = Engine(
        model,
        tokenizer,
        max_slots=cfg.max_batch,
        compute_dtype=dtype,
        max_queue=cfg.max_queue,
        threads=cfg.threads or "auto",  # no --threads: the decode thread picks (hilt.generation.threads)
    )
    engine.start()
    c = model.config
    info = {
        "architecture": c.to_dict(),
        "parameters": model.num_parameters(),
        "max_model_len": c.max_seq_len,
        "device": str(device),
        "dtype": str(dtype or model.head.weight.dtype).removeprefix("torch."),
        "slots": engine.n_slots,
    }
    created = int(Path(cfg.model_path).stat().st_mtime)
    return Loaded(engine=engine, tokenizer=tokenizer, info=info, created=created)


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def run_server(cfg: ServeConfig) -> None:
    if not Path(cfg.model_path).exists():
        raise UserError(f"--model_path not found: {cfg.model_path}")
    from hilt.data.tokenizer import SPECIAL_TOKENS
    from hilt.serve.app import AppSettings, create_app
    from hilt.serve.chat import ChatTemplate

    _, bos, eos = SPECIAL_TOKENS
    template = ChatTemplate.load(cfg.chat_template, bos, eos)
    origins = [o.strip() for o in (cfg.cors_origins or "").split(",") if o.strip()]
    settings = AppSettings(
        served_model_name=cfg.model_name,
        api_key=cfg.api_key,
        cors_origins=origins,
        chat_template=template,
        max_body_bytes=cfg.max_body_bytes,
        max_n=cfg.max_n,
        max_tokens_cap=cfg.max_tokens_cap,
        request_timeout=cfg.request_timeout,
    )
    sock = _listen(cfg.host, cfg.port)
    failure: list[BaseException] = []
    server: _Server | None = None

    def on_load_error(error: BaseException) -> None:
        failure.append(error)
        if server is not None:
            server.should_exit = True

    app = create_app(settings, lambda: load_engine(cfg), on_load_error)
    config = uvicorn.Config(
        app,
        log_level=cfg.log_level,
        timeout_graceful_shutdown=cfg.shutdown_grace + 5,  # a backstop: drain ends the requests by then
        # a slow client must not pin a connection forever; 5 s is uvicorn's default keep-alive
        timeout_keep_alive=5,
    )
    server = _Server(config, drain=lambda: app.state.hilt.drain(cfg.shutdown_grace))
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    if cfg.host not in ("127.0.0.1", "localhost", "::1") and cfg.api_key is None:
        print(
            f"warning: listening on {cfg.host} without --api_key: anyone who can reach this port can use the model",
            file=sys.stderr,
        )
    print(
        f"Serving {settings.served_model_name} at http://{shown}:{port} (playground: /, API: /v1)", flush=True
    )
    server.run(sockets=[sock])
    if failure:
        raise failure[0]  # a UserError (bad checkpoint) becomes the CLI's one line and status 2
