"""``TrainConfig``: the settings of ``hilt train``, checked on creation and saved in every checkpoint as
``train_config``. Plain Python without torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hilt.errors import UserError
from hilt.training.schedule import SCHEDULERS


@dataclass(kw_only=True)
class TrainConfig:
    """How to train (the model's shape lives in ModelConfig). Saved in every checkpoint as ``train_config``."""

    text_file: str
    max_tokens: int = 100_000  # 0 = the whole file
    batch_size: int = 32
    seq_len: int = 128
    epochs: int = 10
    lr: float = 5e-4
    clip_grad: float = 1.0  # 0 = no clipping
    gradient_accumulation_steps: int = 1
    amp: bool = True  # bf16/fp16 autocast where the hardware supports it
    scheduler: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.1
    val_fraction: float = 0.1
    out_dir: str = "."
    seed: int = 1337
    device: str = "auto"
    save_every: int = 0  # also write last_model.pt every N optimizer steps (0 = only at epoch ends)
    resume: str | None = None
    new_data: bool = False  # on --resume: other data on purpose (its first epoch next, the best model afresh)
    compile: bool = False  # torch.compile the layers (slow first step; pays off on long runs, mostly in bf16)
    patience: int = 0  # stop early after this many epochs without a better validation loss (0 = never)
    overwrite: bool = False  # allow a fresh run to replace checkpoints already in out_dir
    tokenizer: str | None = None  # a local Hugging Face tokenizer folder; None = the shipped GPT-2
    cache_dir: str | None = None  # token cache folder; None = .hilt_cache in the folder that holds the input
    doc_separator: str | None = (
        None  # "blank", "line" or a literal string between documents; None = file = doc
    )
    text_field: str = "text"  # the text field of .jsonl records, the text column of .parquet files
    epoch_tokens: int = 0  # an epoch's token budget when smaller than the corpus; 0 = one pass per epoch
    tensorboard: bool = False  # also write the metrics as TensorBoard scalars to out_dir/tensorboard
    ilt_stats_every: int = 50  # log ILT statistics every N optimizer steps and at epoch ends (0 = never)

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
