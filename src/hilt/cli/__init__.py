"""The `hilt` command: one subcommand, one function. The root scripts train.py, inference.py and build_vocab.py
call ``main`` with their subcommand.

Mistakes a user can make end in one line on stderr and exit status 2; nothing on disk is touched.

Importing torch takes seconds, and `hilt --help`, `hilt vocab` and `hilt prepare` do not need it: this module and
every ``add_*`` flag builder import nothing heavy at module level, ``main`` adds the flags of the chosen subcommand
only, and each ``cmd_*`` function imports what it runs (tests/test_cli.py checks that `hilt --help` stays
torch-free).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Collection

from hilt.cli.data import add_prepare, add_vocab, cmd_prepare, cmd_vocab
from hilt.cli.evaluate import add_eval, add_inspect, add_plot, cmd_eval, cmd_inspect, cmd_plot
from hilt.cli.export import add_export, cmd_export
from hilt.cli.generate import add_generate, cmd_generate
from hilt.cli.serve import add_serve, cmd_serve
from hilt.cli.train import add_train, cmd_train
from hilt.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


# --- subcommands ---------------------------------------------------------------------------------------------


# name -> (add flags, run, help). Other modules add rows here as the toolkit grows; a subpackage keeps its own
# flags (hilt/cli/serve.py).
COMMANDS: dict[str, tuple[Callable, Callable, str]] = {
    "train": (add_train, cmd_train, "train a model on a text file"),
    "vocab": (add_vocab, cmd_vocab, "print the tokenizer's vocabulary facts"),
    "generate": (add_generate, cmd_generate, "generate text from a checkpoint"),
    "eval": (add_eval, cmd_eval, "loss, perplexity and bits per byte of a checkpoint on a text"),
    "plot": (add_plot, cmd_plot, "draw training curves of one or more runs as a PNG"),
    "inspect": (add_inspect, cmd_inspect, "print what each ILT does on a prompt and save a heat map"),
    "prepare": (add_prepare, cmd_prepare, "tokenize an input into the token cache ahead of training"),
    "export": (add_export, cmd_export, "write a checkpoint as a Hugging Face transformers folder"),
    "serve": (add_serve, cmd_serve, "serve a model over HTTP: OpenAI-compatible API and a web playground"),
}


def _build(with_flags: Collection[str] | None) -> tuple[argparse.ArgumentParser, dict]:
    parser = _Parser(prog="hilt", description="Hierarchical Transformer with Inter-Layer Transformers")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    parsers = {}
    for name, (add_flags, _, help_text) in COMMANDS.items():
        parsers[name] = sub.add_parser(name, help=help_text, description=help_text)
        if with_flags is None or name in with_flags:
            add_flags(parsers[name])
    return parser, parsers


def build_parser(with_flags: Collection[str] | None = None) -> argparse.ArgumentParser:
    """The `hilt` parser, with the flags of the subcommands named in ``with_flags`` (default: all of them)."""
    return _build(with_flags)[0]


def subcommand_parsers() -> dict[str, argparse.ArgumentParser]:
    """Each subcommand's parser with all its flags, by name (tests/test_docs.py checks them against docs/)."""
    return _build(None)[1]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # the top-level parser has no options but --help, so the first other word names the subcommand; only its
    # flags are built, so that no other subcommand's flag builder (which may import torch) runs
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(with_flags=[command]).parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:
        # a full disk is never a bug: one line, even for a write that does not name its file (a log line)
        from hilt.files import DISK_FULL, os_error_behind

        cause = os_error_behind(e)
        if cause is None or cause.errno not in DISK_FULL:
            raise
        where = f" writing {cause.filename}" if cause.filename else ""
        print(f"error: {cause.strerror}{where}; free some space or write elsewhere", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
