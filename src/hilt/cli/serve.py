"""`hilt serve`'s flags and the function the CLI calls; imports nothing heavy until the server runs (hilt.cli
builds these flags for `hilt serve --help`)."""

from __future__ import annotations

import argparse


def add_threads(p: argparse.ArgumentParser) -> None:
    """--threads, shared with `hilt generate`: both decode through the engine."""
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads for the process, the decode thread included (default: the decode thread picks "
        "its count from the free cores and its step times, again as the load changes; see "
        "docs/generation.md#threads)",
    )


def add_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model_path",
        required=True,
        help="checkpoint or exported folder to serve, e.g. runs/x/best_model.pt",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 = every interface (default 127.0.0.1)",
    )
    p.add_argument(
        "--port", type=int, default=8000, help="port to listen on; 0 = any free one (default 8000)"
    )
    p.add_argument(
        "--served_model_name",
        default=None,
        help="the model's name in the API (default: the checkpoint's folder name)",
    )
    p.add_argument(
        "--api_key",
        default=None,
        help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize, /detokenize and /metrics (default: "
        "$HILT_API_KEY, else no key)",
    )
    p.add_argument(
        "--cors_origins",
        default=None,
        help="comma-separated origins allowed to call the API from a browser (default: CORS off)",
    )
    p.add_argument(
        "--chat_template", default=None, metavar="FILE", help="Jinja chat template file (default: built in)"
    )
    p.add_argument("--max_batch", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument(
        "--max_queue",
        type=int,
        default=64,
        help="requests waiting beyond --max_batch; more get 503 (default 64)",
    )
    p.add_argument(
        "--max_body_bytes", type=int, default=1_000_000, help="largest request body (default 1000000)"
    )
    p.add_argument("--max_n", type=int, default=8, help="largest n (choices per prompt) (default 8)")
    p.add_argument(
        "--max_tokens_cap",
        type=int,
        default=0,
        help="largest max_tokens a request may ask for; 0 = the model's context (default 0)",
    )
    p.add_argument(
        "--request_timeout",
        type=float,
        default=600.0,
        help="seconds a request may take from arrival to its last token (default 600)",
    )
    p.add_argument(
        "--shutdown_grace",
        type=float,
        default=10.0,
        help="seconds SIGTERM lets running requests finish before cancelling them (default 10)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    add_threads(p)
    p.add_argument(
        "--no_amp", action="store_true", help="fp32 throughout (default: bf16 matmuls where supported)"
    )
    p.add_argument(
        "--log_level",
        choices=["critical", "error", "warning", "info", "debug"],
        default="info",
        help="server log level (default info)",
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from hilt.serve.run import ServeConfig, run_server

    settings = {f.name: getattr(args, f.name) for f in fields(ServeConfig) if f.name != "amp"}
    run_server(ServeConfig(**settings, amp=not args.no_amp))
    return 0
