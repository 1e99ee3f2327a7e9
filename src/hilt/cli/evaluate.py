"""`hilt eval`, `hilt plot` and `hilt inspect`: a checkpoint's loss on a text, training curves, what the ILTs do."""

from __future__ import annotations

import argparse

from hilt.errors import UserError


def add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_path", required=True, help="checkpoint to evaluate, e.g. runs/x/best_model.pt")
    p.add_argument(
        "--text_file", default=None, help="text to score (default with --split: the training file)"
    )
    p.add_argument(
        "--split",
        choices=["all", "train", "val"],
        default="all",
        help="all = the whole file; train/val = the training run's split of it (default %(default)s)",
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
    from hilt.evaluation.evaluate import run_eval

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
    from hilt.evaluation.plot import run_plot

    run_plot(args.runs, args.out)
    return 0


def add_inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model_path", required=True, help="checkpoint whose ILTs to inspect")
    p.add_argument(
        "--prompt",
        default="To be, or not to be, that is the question:",
        help="text to run through the model (default: a line of Hamlet)",
    )
    p.add_argument("--out", default="ilt_inspect.png", help="heat-map PNG (default %(default)s)")
    p.add_argument(
        "--modulation_scale",
        type=float,
        default=None,
        help="ILT scale (default: the model's modulation_scale_end)",
    )
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else CPU), cpu, cuda, cuda:N")


def cmd_inspect(args: argparse.Namespace) -> int:
    import math

    from hilt.evaluation.inspect import run_inspect

    if args.modulation_scale is not None and not math.isfinite(args.modulation_scale):
        raise UserError(f"--modulation_scale must be a finite number, got {args.modulation_scale}")
    run_inspect(args.model_path, args.prompt, args.out, args.device, args.modulation_scale)
    return 0
