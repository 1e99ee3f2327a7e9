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
from hilt.cli.serve import add_serve, add_threads, cmd_serve
from hilt.cli.train import add_train, cmd_train, model_args  # noqa: F401 (model_args: generate's)
from hilt.errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


# --- subcommands ---------------------------------------------------------------------------------------------


def add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_path", required=True, help="checkpoint to sample from, e.g. runs/x/best_model.pt")
    p.add_argument(
        "--prompt",
        default="The quick brown",
        help='text to continue; "" starts from the <BOS> token (default "The quick brown")',
    )
    p.add_argument(
        "--max_len", type=int, default=50, help="new tokens at most; <EOS> stops earlier (default 50)"
    )
    p.add_argument(
        "--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy argmax (default 1.0)"
    )
    p.add_argument(
        "--top_k", type=int, default=None, help="sample from the k most likely tokens (default: all)"
    )
    p.add_argument(
        "--top_p",
        type=float,
        default=None,
        help="nucleus sampling: the fewest tokens whose probability reaches p, 0 < p <= 1 (default: off)",
    )
    p.add_argument(
        "--use_beam_search",
        action="store_true",
        help="beam search instead of sampling (deterministic; ignores --temperature/--top_k/--top_p)",
    )
    p.add_argument("--beam_width", type=int, default=5, help="beams kept by --use_beam_search (default 5)")
    p.add_argument(
        "--use_cache",
        action="store_true",
        help="KV cache for beam search: same output, several times faster (sampling always uses the engine's "
        "cache; default off)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="sampling seed; same seed + flags = same text (default: random)",
    )
    p.add_argument("--num_samples", type=int, default=1, help="independent samples to print (default 1)")
    p.add_argument(
        "--stream", action="store_true", help="print text as it is produced (beam search prints when done)"
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    p.add_argument(
        "--no_amp",
        action="store_true",
        help="fp32 throughout (default: bf16 matmuls where the hardware supports it, as in training)",
    )
    p.add_argument(
        "--model_dim",
        type=int,
        default=None,
        help="accepted for compatibility; the checkpoint sets the architecture, a different value is an error",
    )
    g = p.add_argument_group("batch mode (hilt.generation.engine; docs/generation.md#batched-engine)")
    g.add_argument(
        "--prompts_file",
        default=None,
        help="generate for every prompt of a file: one per line (.txt) or JSON records with their own "
        "sampling settings (.jsonl); needs --out",
    )
    g.add_argument("--out", default=None, help="results file (JSON lines, in input order)")
    g.add_argument("--resume", action="store_true", help="keep the finished rows of --out and run the rest")
    g.add_argument(
        "--max_slots", type=int, default=16, help="sequences decoded together by the engine (default 16)"
    )
    g.add_argument(
        "--reproducible",
        action="store_true",
        help="decode one row at a time, so that a resumed or repeated run writes the same file byte for byte "
        "(several times slower; default off: a row's text may depend on the rows decoded with it)",
    )
    add_threads(p)


def cmd_generate(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from hilt.generation.config import GenerationConfig

    settings = {f.name: getattr(args, f.name) for f in fields(GenerationConfig) if f.name != "amp"}
    cfg = GenerationConfig(**settings, amp=not args.no_amp)
    if cfg.prompts_file is not None:
        from hilt.generation.prompts_file import run_prompts_file

        run_prompts_file(cfg)  # checks the file and --out before it imports torch
        return 0
    from hilt.generation.run import run_generation

    run_generation(cfg)
    return 0


def add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model_path",
        required=True,
        help="checkpoint to export, e.g. runs/x/best_model.pt (or an exported folder)",
    )
    p.add_argument("--out_dir", required=True, help="the Hugging Face folder to write, e.g. hf/x")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing non-empty --out_dir (default off)"
    )


def cmd_export(args: argparse.Namespace) -> int:
    from hilt.hf.export import export

    out = export(args.model_path, args.out_dir, overwrite=args.overwrite)
    print(f"Exported {args.model_path} to {out} (docs/huggingface.md shows how to load it)")
    return 0


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
