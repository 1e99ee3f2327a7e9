"""``TrainConfig``: the settings of ``hilt train``, checked on creation and saved in every checkpoint as
``train_config``. Plain Python without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hilt.errors import UserError
from hilt.training.schedule import SCHEDULERS


@dataclass(kw_only=True)
class TrainConfig:
    """How to train (the model's shape lives in ModelConfig). Saved in every checkpoint as ``train_config``."""

    # each field's help is its flag's (hilt.cli.flags builds `hilt train`'s flags from these fields)
    text_file: str = field(
        metadata={
            "help": "training text: a UTF-8 text file, a folder or glob of .txt/.jsonl/.parquet files, a .jsonl "
            "or a .parquet file"
        }
    )
    max_tokens: int = field(default=100_000, metadata={"help": "use the first N tokens; 0 = all of them"})
    batch_size: int = field(default=32, metadata={"help": "sequences per batch"})
    seq_len: int = field(default=128, metadata={"help": "tokens per training sequence"})
    epochs: int = field(default=10, metadata={"help": "total epochs; on --resume, the new total"})
    lr: float = field(default=5e-4, metadata={"help": "peak learning rate of AdamW"})
    clip_grad: float = field(default=1.0, metadata={"help": "clip the gradient norm to this; 0 = off"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "batches per optimizer step"})
    amp: bool = field(
        default=True,
        metadata={
            "help": "train in fp32",
            "flag": "--no_amp",
            "negate": True,
            "default_help": "bf16/fp16 autocast where supported",
        },
    )
    scheduler: str = field(default="cosine", metadata={"help": "LR schedule", "choices": SCHEDULERS})
    warmup_steps: int = field(default=0, metadata={"help": "linear LR warm-up steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay on matrices"})
    val_fraction: float = field(
        default=0.1,
        metadata={"help": "validation share, held out from the end, by whole documents when known"},
    )
    resume: str | None = field(
        default=None,
        metadata={"help": "continue from a checkpoint up to --epochs in total", "metavar": "PATH"},
    )
    new_data: bool = field(
        default=False,
        metadata={
            "help": "with --resume: continue on data other than the checkpoint's (refused otherwise), from its "
            "first epoch, with the best model judged afresh on its validation part"
        },
    )
    out_dir: str = field(default=".", metadata={"help": "where checkpoints and metrics go"})
    overwrite: bool = field(
        default=False, metadata={"help": "let a fresh run replace checkpoints already in --out_dir"}
    )
    compile: bool = field(
        default=False, metadata={"help": "torch.compile the layers: ~25 s start-up, faster steps"}
    )
    patience: int = field(
        default=0, metadata={"help": "stop after N epochs without a better val loss; 0 = never"}
    )
    seed: int = field(default=1337, metadata={"help": "random seed"})
    device: str = field(
        default="auto", metadata={"help": "auto (CUDA when present, else CPU), cpu, cuda, cuda:N"}
    )
    save_every: int = field(
        default=0,
        metadata={"help": "also write last_model.pt every N optimizer steps; 0 = at epoch ends only"},
    )
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "a local Hugging Face tokenizer folder",
            "metavar": "DIR",
            "default_help": "the shipped GPT-2",
        },
    )
    tensorboard: bool = field(
        default=False,
        metadata={"help": "also log the metrics to TensorBoard in OUT_DIR/tensorboard (needs tensorboard)"},
    )
    ilt_stats_every: int = field(
        default=50,
        metadata={
            "help": "log ILT statistics (see hilt inspect) every N optimizer steps and at epoch ends; 0 = never"
        },
    )
    epoch_tokens: int = field(
        default=0,
        metadata={
            "help": "an epoch's token budget for corpora larger than that: the shuffled order then runs on across "
            "epochs; keep it on --resume; 0 = one pass over the data per epoch"
        },
    )
    # how the input is read and cached: `hilt prepare` takes these flags too, so both find the same cache
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "folder for the token cache",
            "metavar": "DIR",
            "default_help": ".hilt_cache in the folder that holds the input",
        },
    )
    doc_separator: str | None = field(
        default=None,
        metadata={
            "help": "split text files into documents, with <EOS> between them: 'blank' (blank lines), 'line' (each "
            "line) or a literal string such as '<|endoftext|>'",
            "metavar": "SEP",
            "default_help": "a file is one document; .jsonl/.parquet rows always are",
        },
    )
    text_field: str = field(
        default="text", metadata={"help": "the text field of .jsonl records / text column of .parquet files"}
    )

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "epochs", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.lr < math.inf:  # also refuses NaN
            raise UserError(f"--lr must be positive and finite, got {self.lr}")
        for name in (
            "max_tokens",
            "save_every",
            "warmup_steps",
            "ilt_stats_every",
            "epoch_tokens",
            "patience",
        ):
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must be >= 0, got {getattr(self, name)}")
        # NaN or inf would show only later: as a diverged loss, or (a NaN --clip_grad) as no clipping at all
        for name in ("clip_grad", "weight_decay"):
            if not 0 <= getattr(self, name) < math.inf:
                raise UserError(f"--{name} must be >= 0 and finite, got {getattr(self, name)}")
        # the data order's seed is seed * 1_000_003 + epoch, which torch.Generator must still take
        if not 0 <= self.seed < 2**32:
            raise UserError(f"--seed must be from 0 to 2**32 - 1, got {self.seed}")
        if not 0 < self.val_fraction < 1:
            raise UserError(f"--val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if self.new_data and not self.resume:
            raise UserError("--new_data continues a checkpoint on other data; it needs --resume")
