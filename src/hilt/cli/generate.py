"""`hilt generate`: its flags, built from ``GenerationConfig`` (hilt.cli.flags), and the call into
``hilt.generation``: a prompts file checked before torch is imported, or one prompt through the engine.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from hilt.cli.flags import add_fields, values
from hilt.cli.serve import add_threads
from hilt.generation.config import GenerationConfig  # plain Python, no torch

BATCH_FIELDS = ("prompts_file", "out", "resume", "max_slots", "reproducible")


def add_generate(p: argparse.ArgumentParser) -> None:
    add_fields(p, GenerationConfig, exclude=BATCH_FIELDS)
    batch = p.add_argument_group("batch mode (hilt.generation.engine; docs/generation.md#batched-engine)")
    add_fields(batch, GenerationConfig, only=BATCH_FIELDS)
    add_threads(p)


def cmd_generate(args: argparse.Namespace) -> int:
    cfg = GenerationConfig(**values(args, [f.name for f in fields(GenerationConfig)]))
    if cfg.prompts_file is not None:
        from hilt.generation.prompts_file import run_prompts_file

        run_prompts_file(cfg)  # checks the file and --out before it imports torch
        return 0
    from hilt.generation.run import run_generation

    run_generation(cfg)
    return 0
