"""``ServeConfig``: the settings of `hilt serve`, checked on creation. Plain Python: the CLI builds its flags
from these fields without importing the server.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from hilt.errors import UserError


@dataclass(kw_only=True)
class ServeConfig:
    """The flags of `hilt serve` (field name = flag name)."""

    # each field's help is its flag's (hilt.cli.flags builds `hilt serve`'s flags from these fields)
    model_path: str = field(
        metadata={"help": "checkpoint or exported folder to serve, e.g. runs/x/best_model.pt"}
    )
    host: str = field(
        default="127.0.0.1", metadata={"help": "address to listen on; 0.0.0.0 = every interface"}
    )
    port: int = field(default=8000, metadata={"help": "port to listen on; 0 = any free one"})
    served_model_name: str | None = field(
        default=None,
        metadata={"help": "the model's name in the API", "default_help": "the checkpoint's folder name"},
    )
    api_key: str | None = field(
        default=None,
        metadata={
            "help": "require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize and /metrics",
            "default_help": "$HILT_API_KEY, else no key",
        },
    )
    cors_origins: str | None = field(
        default=None,
        metadata={
            "help": "comma-separated origins allowed to call the API from a browser",
            "default_help": "CORS off",
        },
    )
    chat_template: str | None = field(
        default=None,
        metadata={"help": "Jinja chat template file", "metavar": "FILE", "default_help": "built in"},
    )
    max_batch: int = field(default=16, metadata={"help": "requests decoded together"})
    max_queue: int = field(default=64, metadata={"help": "requests waiting beyond --max_batch; more get 503"})
    max_body_bytes: int = field(default=1_000_000, metadata={"help": "largest request body"})
    max_n: int = field(default=8, metadata={"help": "largest n (choices per prompt)"})
    max_tokens_cap: int = field(
        default=0, metadata={"help": "largest max_tokens a request may ask for; 0 = the model's context"}
    )
    request_timeout: float = field(
        default=600.0, metadata={"help": "seconds a request may take from arrival to its last token"}
    )
    shutdown_grace: float = field(
        default=10.0,
        metadata={"help": "seconds SIGTERM lets running requests finish before cancelling them"},
    )
    device: str = field(
        default="auto", metadata={"help": "auto (CUDA when present, else CPU), cpu, cuda, cuda:N"}
    )
    amp: bool = field(
        default=True,
        metadata={
            "help": "fp32 throughout",
            "flag": "--no_amp",
            "negate": True,
            "default_help": "bf16 matmuls where supported",
        },
    )
    log_level: str = field(
        default="info",
        metadata={"help": "server log level", "choices": ("critical", "error", "warning", "info", "debug")},
    )
    # torch's CPU threads; None = the decode thread picks (hilt.generation.threads). Its flag is hilt.cli.serve's
    # add_threads, shared with `hilt generate`
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be >= 1, got {self.threads}")
        for name in ("max_batch", "max_body_bytes", "max_n"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_queue", "max_tokens_cap", "shutdown_grace"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.max_queue < self.max_n:
            raise UserError(
                f"--max_queue ({self.max_queue}) must be at least --max_n ({self.max_n}): a request's n choices "
                "queue together"
            )
        if not self.request_timeout > 0:
            raise UserError(f"--request_timeout must be > 0, got {self.request_timeout}")
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port must be in 0-65535, got {self.port}")
        if self.api_key is None:
            self.api_key = os.environ.get("HILT_API_KEY") or None
        if self.api_key is not None and not self.api_key.strip():
            raise UserError("--api_key is empty")

    @property
    def model_name(self) -> str:
        if self.served_model_name:
            return self.served_model_name
        path = Path(self.model_path).resolve()
        # runs/shakespeare/best_model.pt -> "shakespeare"; an exported folder -> its name
        return path.name if path.is_dir() else (path.parent.name or path.stem)
