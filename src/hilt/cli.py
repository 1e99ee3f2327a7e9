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

from hilt.errors import UserError
from hilt.serve.cli import add_serve, add_threads, cmd_serve


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line instead of usage + error
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


# --- shared flag groups --------------------------------------------------------------------------------------

# flag -> (ModelConfig field, type, help). The "(default ...)" of each help text comes from ModelConfig itself.
# The flags' own defaults are None, so that a flag given on --resume can be checked against the checkpoint;
# ModelConfig fills in the real defaults.
MODEL_FLAGS = {
    "--model_dim": ("d_model", int, "model width d_model"),
    "--n_layers": ("n_layers", int, "main transformer layers"),
    "--n_heads": ("n_heads", int, "attention heads"),
    "--d_ff": ("d_ff", int, "feed-forward width (default 4 * model_dim)"),
    "--dropout": ("dropout", float, "dropout of the main layers"),
    "--max_seq_len": ("max_seq_len", int, "longest context the positional encoding covers"),
    "--tie_weights": ("tie_weights", bool, "share the token embedding with the LM head"),
    "--n_layers_ilt": ("n_layers_ilt", int, "layers inside each ILT; 0 = plain transformer"),
    "--ilt_dim": ("ilt_dim", int, "ILT width ILT_DIM"),
    "--nhead_ilt": ("nhead_ilt", int, "ILT attention heads NHEAD_ILT"),
    "--ilt_dropout": ("ilt_dropout", float, "ILT dropout ILT_DROPOUT"),
    "--ilt_window": ("ilt_window", int, "layer outputs each ILT sees"),
    "--modulation_scale_start": ("modulation_scale_start", float, "curriculum start"),
    "--modulation_scale_end": (
        "modulation_scale_end",
        float,
        "curriculum end, used for eval and generation",
    ),
    "--ilt_zero_init": (
        "ilt_zero_init",
        bool,
        "ILT variant: zero-initialised output projection, so training starts as an exact plain transformer",
    ),
    "--ilt_gate": (
        "ilt_gate",
        bool,
        "ILT variant: a learned scale per ILT, starting at modulation_scale_start, replaces the curriculum",
    ),
    "--ilt_embed": ("ilt_embed", bool, "ILT variant: each ILT also sees the token embedding"),
    "--ilt_kind": (
        "ilt_kind",
        str,
        "inter-layer module: design (the seed's ILT), depth (attention over the embedding and every earlier "
        "layer), depth_multiway (depth + a stream into the next attention), dense (static weights over the "
        "same sources) or x0 (x0 mixing)",
    ),
    "--ilt_rank": ("ilt_rank", int, "query/key rank of the depth kinds' attention over layers"),
}


def add_model_flags(p: argparse.ArgumentParser) -> None:
    from dataclasses import fields

    from hilt.config import ModelConfig  # plain Python, no torch

    defaults = {f.name: f.default for f in fields(ModelConfig)}
    g = p.add_argument_group(
        "model (ignored on --resume: the checkpoint's config rules; a contradicting flag is an error)"
    )
    for flag, (field, typ, help_text) in MODEL_FLAGS.items():
        default = defaults[field]
        if default is not None:
            help_text += f" (default {('on' if default else 'off') if typ is bool else default})"
        if typ is bool:  # --flag / --no-flag; None when absent, like every model flag
            g.add_argument(
                flag, dest=field, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            g.add_argument(flag, dest=field, type=typ, default=None, help=help_text)


def model_args(args: argparse.Namespace) -> dict:
    return {field: getattr(args, field) for field, _, _ in MODEL_FLAGS.values()}


def add_data_flags(p: argparse.ArgumentParser) -> None:
    """How the input is read and cached (train and prepare share these, so they find the same cache)."""
    g = p.add_argument_group("data")
    g.add_argument(
        "--cache_dir",
        default=None,
        metavar="DIR",
        help="folder for the token cache (default: .hilt_cache in the folder that holds the input)",
    )
    g.add_argument(
        "--doc_separator",
        default=None,
        metavar="SEP",
        help="split text files into documents, with <EOS> between them: 'blank' (blank lines), 'line' (each "
        "line) or a literal string such as '<|endoftext|>' (default: a file is one document; .jsonl/.parquet "
        "rows always are)",
    )
    g.add_argument(
        "--text_field",
        default="text",
        help="the text field of .jsonl records / text column of .parquet files (default text)",
    )


# --- subcommands ---------------------------------------------------------------------------------------------


def add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--text_file",
        required=True,
        help="training text: a UTF-8 text file, a folder or glob of .txt/.jsonl/.parquet files, a .jsonl or a "
        ".parquet file",
    )
    p.add_argument(
        "--max_tokens",
        type=int,
        default=100_000,
        help="use the first N tokens; 0 = all of them (default 100000)",
    )
    p.add_argument("--batch_size", type=int, default=32, help="sequences per batch (default 32)")
    p.add_argument("--seq_len", type=int, default=128, help="tokens per training sequence (default 128)")
    p.add_argument(
        "--epochs", type=int, default=10, help="total epochs; on --resume, the new total (default 10)"
    )
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of AdamW (default 5e-4)")
    p.add_argument(
        "--clip_grad", type=float, default=1.0, help="clip the gradient norm to this; 0 = off (default 1.0)"
    )
    p.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="batches per optimizer step (default 1)"
    )
    p.add_argument(
        "--no_amp", action="store_true", help="train in fp32 (default: bf16/fp16 autocast where supported)"
    )
    p.add_argument(
        "--scheduler",
        choices=["cosine", "step", "none"],
        default="cosine",
        help="LR schedule (default cosine)",
    )
    p.add_argument("--warmup_steps", type=int, default=0, help="linear LR warm-up steps (default 0)")
    p.add_argument(
        "--weight_decay", type=float, default=0.1, help="AdamW weight decay on matrices (default 0.1)"
    )
    p.add_argument(
        "--val_fraction",
        type=float,
        default=0.1,
        help="validation share, held out from the end, by whole documents when they are known (default 0.1)",
    )
    p.add_argument(
        "--resume", default=None, metavar="PATH", help="continue from a checkpoint up to --epochs in total"
    )
    p.add_argument(
        "--new_data",
        action="store_true",
        help="with --resume: continue on data other than the checkpoint's (refused otherwise), from its first "
        "epoch, with the best model judged afresh on its validation part (default off)",
    )
    p.add_argument("--out_dir", default=".", help="where checkpoints and metrics go (default .)")
    p.add_argument(
        "--overwrite", action="store_true", help="let a fresh run replace checkpoints already in --out_dir"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the layers: ~25 s start-up, faster steps (default off)",
    )
    p.add_argument(
        "--patience",
        type=int,
        default=0,
        help="stop after N epochs without a better val loss (default 0 = never)",
    )
    p.add_argument("--seed", type=int, default=1337, help="random seed (default 1337)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")
    p.add_argument(
        "--save_every",
        type=int,
        default=0,
        help="also write last_model.pt every N optimizer steps (default 0 = epoch ends only)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR",
        help="a local Hugging Face tokenizer folder (default: shipped GPT-2)",
    )
    p.add_argument(
        "--tensorboard",
        action="store_true",
        help="also log the metrics to TensorBoard in OUT_DIR/tensorboard (needs tensorboard; default off)",
    )
    p.add_argument(
        "--ilt_stats_every",
        type=int,
        default=50,
        help="log ILT statistics (see hilt inspect) every N optimizer steps and at epoch ends; 0 = never "
        "(default 50)",
    )
    p.add_argument(
        "--epoch_tokens",
        type=int,
        default=0,
        help="an epoch's token budget for corpora larger than that: the shuffled order then runs on across "
        "epochs; keep it on --resume (default 0 = one pass over the data per epoch)",
    )
    add_data_flags(p)
    add_model_flags(p)


def cmd_train(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from hilt.train import TrainConfig, run_training

    # every TrainConfig field is a flag of the same name (test_cli checks it), so the two cannot drift apart
    settings = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "amp"}
    run_training(TrainConfig(**settings, amp=not args.no_amp), model_args(args))
    return 0


def add_prepare(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text_file", required=True, help="the input, as for train")
    p.add_argument(
        "--max_tokens", type=int, default=0, help="stop after the first N tokens; 0 = all (default 0)"
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR",
        help="a local Hugging Face tokenizer folder (default: shipped GPT-2)",
    )
    p.add_argument("--threads", type=int, default=None, help="encoder threads (default: one per core)")
    add_data_flags(p)


def cmd_prepare(args: argparse.Namespace) -> int:
    from hilt.token_cache import open_cache
    from hilt.tokenizer import Tokenizer

    if args.max_tokens < 0:
        raise UserError(f"--max_tokens must be >= 0, got {args.max_tokens}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    cache = open_cache(
        args.text_file,
        Tokenizer.load(args.tokenizer),
        tokenizer_dir=args.tokenizer,
        cache_dir=args.cache_dir,
        doc_separator=args.doc_separator,
        text_field=args.text_field,
        max_tokens=args.max_tokens,
        threads=args.threads,
    )
    print(f"{'Built' if cache.built else 'Up to date'}: {cache.meta_path}")
    return 0


def add_vocab(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR",
        help="a local Hugging Face tokenizer folder (default: shipped GPT-2)",
    )
    p.add_argument("--text", default="Hello world! To be, or not to be.", help="example for the round trip")


def cmd_vocab(args: argparse.Namespace) -> int:
    from hilt.tokenizer import SPECIAL_TOKENS, Tokenizer

    tok = Tokenizer.load(args.tokenizer)
    print(f"Tokenizer: {tok.name}")
    print(f"Vocabulary size: {tok.vocab_size} (including special tokens)")
    for t in SPECIAL_TOKENS:
        print(f"  {t}: {tok._tok.token_to_id(t)}")
    ids = tok.encode(args.text)
    print(f"Round trip: {args.text!r}")
    print(f"  ids:    {ids}")
    print(f"  tokens: {[tok.id_to_token(i) for i in ids]}")
    back = tok.decode(ids)
    print(f"  decode: {back!r} ({'identical' if back == args.text else 'DIFFERENT'})")
    return 0


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
    g = p.add_argument_group("batch mode (hilt.engine; docs/generation.md#batched-engine)")
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

    from hilt.generation_config import GenerationConfig

    settings = {f.name: getattr(args, f.name) for f in fields(GenerationConfig) if f.name != "amp"}
    cfg = GenerationConfig(**settings, amp=not args.no_amp)
    if cfg.prompts_file is not None:
        from hilt.prompts_file import run_prompts_file

        run_prompts_file(cfg)  # checks the file and --out before it imports torch
        return 0
    from hilt.generate import run_generation

    run_generation(cfg)
    return 0


def add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_path", required=True, help="checkpoint to evaluate, e.g. runs/x/best_model.pt")
    p.add_argument(
        "--text_file", default=None, help="text to score (default with --split: the training file)"
    )
    p.add_argument(
        "--split",
        choices=["all", "train", "val"],
        default="all",
        help="all = the whole file; train/val = the training run's split of it (default all)",
    )
    p.add_argument(
        "--seq_len", type=int, default=None, help="window length (default: the training --seq_len)"
    )
    p.add_argument(
        "--stride",
        type=int,
        default=None,
        help="tokens between window starts; < seq_len gives each scored token more context (default seq_len)",
    )
    p.add_argument(
        "--batch_size", type=int, default=None, help="windows per forward pass (default: training's)"
    )
    p.add_argument(
        "--max_tokens",
        type=int,
        default=None,
        help="first N tokens of the file; 0 = all (default: all, or training's with --split)",
    )
    p.add_argument(
        "--modulation_scale",
        type=float,
        default=None,
        help="ILT scale (default: the model's modulation_scale_end, as in validation)",
    )
    p.add_argument("--no_amp", action="store_true", help="fp32 instead of bf16/fp16 autocast")
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")


def cmd_eval(args: argparse.Namespace) -> int:
    from hilt.evaluate import run_eval

    run_eval(
        args.model_path,
        args.text_file,
        split=args.split,
        seq_len=args.seq_len,
        stride=args.stride,
        batch_size=args.batch_size,
        max_tokens=args.max_tokens,
        modulation_scale=args.modulation_scale,
        amp=not args.no_amp,
        device=args.device,
    )
    return 0


def add_plot(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "runs", nargs="+", metavar="RUN_DIR", help="training --out_dir folders (with metrics.jsonl)"
    )
    p.add_argument(
        "--out", default=None, help="PNG to write (default RUN_DIR/metrics.png for one run, else runs.png)"
    )


def cmd_plot(args: argparse.Namespace) -> int:
    from hilt.plot import run_plot

    run_plot(args.runs, args.out)
    return 0


def add_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_path", required=True, help="checkpoint whose ILTs to inspect")
    p.add_argument(
        "--prompt",
        default="To be, or not to be, that is the question:",
        help="text to run through the model (default: a line of Hamlet)",
    )
    p.add_argument("--out", default="ilt_inspect.png", help="heat-map PNG (default ilt_inspect.png)")
    p.add_argument(
        "--modulation_scale",
        type=float,
        default=None,
        help="ILT scale (default: the model's modulation_scale_end)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")


def cmd_inspect(args: argparse.Namespace) -> int:
    import math

    from hilt.ilt_stats import run_inspect

    if args.modulation_scale is not None and not math.isfinite(args.modulation_scale):
        raise UserError(f"--modulation_scale must be a finite number, got {args.modulation_scale}")
    run_inspect(args.model_path, args.prompt, args.out, args.device, args.modulation_scale)
    return 0


def add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model_path",
        required=True,
        help="checkpoint to export, e.g. runs/x/best_model.pt (or an exported folder)",
    )
    p.add_argument("--out_dir", required=True, help="the Hugging Face folder to write, e.g. hf/x")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --out_dir when it holds an earlier export and nothing else (default off)",
    )


def cmd_export(args: argparse.Namespace) -> int:
    from hilt.hf.export import Terminated, export

    try:
        out = export(args.model_path, args.out_dir, overwrite=args.overwrite)
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143  # 128 + SIGTERM, the status a shell gives a process the signal ended
    print(f"Exported {args.model_path} to {out} (docs/huggingface.md shows how to load it)")
    return 0


# name -> (add flags, run, help). Other modules add rows here as the toolkit grows; a subpackage keeps its own
# flags (hilt/serve/cli.py).
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
