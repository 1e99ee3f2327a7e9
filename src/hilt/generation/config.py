"""``GenerationConfig``: the settings of ``hilt generate``, checked on creation. Plain Python without torch, so
that the CLI finds a mistake in the flags or in a prompts file in milliseconds, before torch (seconds) imports
and the model loads; ``hilt.generation.generate`` re-exports it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hilt.errors import UserError


@dataclass(kw_only=True)
class GenerationConfig:
    """How to generate (the model comes from the checkpoint). Field names are the CLI's flags."""

    # each field's help is its flag's (hilt.cli.flags builds `hilt generate`'s flags from these fields)
    model_path: str = field(metadata={"help": "checkpoint to sample from, e.g. runs/x/best_model.pt"})
    prompt: str = field(
        default="The quick brown", metadata={"help": 'text to continue; "" starts from the <BOS> token'}
    )
    max_len: int = field(default=50, metadata={"help": "new tokens at most; <EOS> stops earlier"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature; 0 = greedy argmax"})
    top_k: int | None = field(
        default=None, metadata={"help": "sample from the k most likely tokens", "default_help": "all"}
    )
    top_p: float | None = field(
        default=None,
        metadata={
            "help": "nucleus sampling: the fewest tokens whose probability reaches p, 0 < p <= 1",
            "default_help": "off",
        },
    )
    use_beam_search: bool = field(
        default=False,
        metadata={
            "help": "beam search instead of sampling (deterministic; ignores --temperature/--top_k/--top_p)"
        },
    )
    beam_width: int = field(default=5, metadata={"help": "beams kept by --use_beam_search"})
    use_cache: bool = field(
        default=False,
        metadata={
            "help": "KV cache for beam search: same output, several times faster (sampling always uses the "
            "engine's cache)"
        },
    )
    seed: int | None = field(
        default=None,
        metadata={"help": "sampling seed; same seed + flags = same text", "default_help": "random"},
    )
    num_samples: int = field(default=1, metadata={"help": "independent samples to print"})
    stream: bool = field(
        default=False, metadata={"help": "print text as it is produced (beam search prints when done)"}
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
            "default_help": "bf16 matmuls where the hardware supports it, as in training",
        },
    )
    model_dim: int | None = field(
        default=None,
        metadata={
            "help": "accepted for compatibility; the checkpoint sets the architecture, a different value is an "
            "error",
            "default_help": "the checkpoint's",
        },
    )
    # batch mode (the engine): a file of prompts
    prompts_file: str | None = field(
        default=None,
        metadata={
            "help": "generate for every prompt of a file: one per line (.txt) or JSON records with their own "
            "sampling settings (.jsonl); needs --out",
            "default_help": "none",
        },
    )
    out: str | None = field(
        default=None, metadata={"help": "results file (JSON lines, in input order)", "default_help": "none"}
    )
    resume: bool = field(default=False, metadata={"help": "keep the finished rows of --out and run the rest"})
    max_slots: int = field(default=16, metadata={"help": "sequences decoded together by the engine"})
    reproducible: bool = field(
        default=False,
        metadata={
            "help": "decode one row at a time, so that a resumed or repeated run writes the same file byte for "
            "byte (several times slower; off: a row's text may depend on the rows decoded with it)"
        },
    )
    # torch's CPU threads; None = the decode thread picks (hilt.generation.threads). Its flag is hilt.cli.serve's
    # add_threads, shared with `hilt serve`
    threads: int | None = None

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
