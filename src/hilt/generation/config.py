"""``GenerationConfig``: the settings of ``hilt generate``, checked on creation. Plain Python without torch, so
that the CLI finds a mistake in the flags or in a prompts file in milliseconds, before torch (seconds) imports
and the model loads; ``hilt.generation.generate`` re-exports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hilt.errors import UserError


@dataclass(kw_only=True)
class GenerationConfig:
    """How to generate (the model comes from the checkpoint). Field names are the CLI's flags."""

    model_path: str
    prompt: str = "The quick brown"  # "" starts from the <BOS> token
    max_len: int = 50  # new tokens at most
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    use_beam_search: bool = False
    beam_width: int = 5
    use_cache: bool = False  # beam search only: sampling always runs through the engine's cache
    seed: int | None = None  # None = a fresh random seed
    num_samples: int = 1
    stream: bool = False
    device: str = "auto"
    amp: bool = True  # matmuls in bf16 where the hardware has it (as training's autocast); False = fp32
    model_dim: int | None = None  # accepted for compatibility; must match the checkpoint
    prompts_file: str | None = None  # batch mode: one prompt per line (.txt) or record (.jsonl)
    out: str | None = None  # batch mode: the results, one JSON record per prompt
    resume: bool = False  # batch mode: keep the finished rows of --out and run the rest
    max_slots: int = 16  # sequences decoded together
    # batch mode: decode one row at a time, so that no row's text depends on which rows share its batch
    reproducible: bool = False
    threads: int | None = (
        None  # torch's CPU threads; None = the decode thread picks (hilt.generation.threads)
    )

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < math.inf:  # also refuses NaN
            raise UserError(f"--temperature must be >= 0 (0 = greedy) and finite, got {self.temperature}")
        # a prompts file's row i draws with seed + i: torch takes seeds up to 2**64 - 1
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise UserError(f"--seed must fit in 64 bits (-2**63 to 2**63 - 1), got {self.seed}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top_p must be in (0, 1], got {self.top_p}")
        for name in ("top_k", "beam_width", "max_len", "num_samples", "max_slots", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name} must be >= 1, got {value}")
        if self.use_beam_search and self.num_samples > 1:
            raise UserError("--num_samples needs sampling; beam search gives one deterministic result")
        if self.prompts_file is None and (self.out is not None or self.resume or self.reproducible):
            raise UserError("--out, --resume and --reproducible belong to --prompts_file")
        if self.prompts_file is not None:
            if self.out is None:
                raise UserError("--prompts_file needs --out (the results file)")
            if self.use_beam_search or self.num_samples > 1:
                raise UserError(
                    "--prompts_file samples one continuation per prompt (no beam search, no --num_samples)"
                )
