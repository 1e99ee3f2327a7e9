"""`hilt export`: a checkpoint as a Hugging Face transformers folder (hilt.hf.export)."""

from __future__ import annotations

import argparse
import sys


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
