"""`hilt serve`'s flags and the function the CLI calls; imports nothing heavy until the server runs (hilt.cli
builds these flags for `hilt serve --help`)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from hilt.cli.flags import add_fields, values
from hilt.serve.config import ServeConfig  # plain Python: no server, no torch


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
    add_fields(p, ServeConfig)
    add_threads(p)


def cmd_serve(args: argparse.Namespace) -> int:
    from hilt.serve.run import run_server

    run_server(ServeConfig(**values(args, [f.name for f in fields(ServeConfig)])))
    return 0
