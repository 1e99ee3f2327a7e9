"""``hilt train``: the run's settings (``TrainConfig``) and the glue from them to a running ``Trainer``
(hilt/training/trainer.py): tokenizer, data, model, resume, DDP under torchrun, the lock on ``--out_dir``, and signals.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from hilt.checkpoint.store import (
    CHECKPOINT_NAMES,
    check_compatible,
    check_same_data,
    load_checkpoint,
    model_from_checkpoint,
    remove_stale_temporaries,
)
from hilt.data.batches import TokenBatches, train_val_tokens
from hilt.data.token_cache import ids_digest
from hilt.data.tokenizer import Tokenizer
from hilt.errors import UserError
from hilt.model import HierarchicalTransformer, ModelConfig
from hilt.training import distributed
from hilt.training.loss import LanguageModelLoss
from hilt.training.schedule import SCHEDULERS
from hilt.training.trainer import Trainer, TrainingDiverged, TrainingInterrupted, build_optimizer  # noqa: F401 (re-exported)

try:
    import fcntl
except ImportError:  # Windows: no flock, so a second run on an --out_dir is not refused there
    fcntl = None


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


# --- glue: from settings to a running Trainer ----------------------------------------------------------------


def prepare_data(cfg: TrainConfig, tokenizer: Tokenizer, rank: int = 0, world_size: int = 1):
    """Train and validation batches from the token cache (tokenizing the input on first use)."""
    train_tokens, val_tokens = train_val_tokens(
        cfg.text_file,
        tokenizer,
        seq_len=cfg.seq_len,
        val_fraction=cfg.val_fraction,
        max_tokens=cfg.max_tokens,
        tokenizer_dir=cfg.tokenizer,
        cache_dir=cfg.cache_dir,
        doc_separator=cfg.doc_separator,
        text_field=cfg.text_field,
        rank=rank,
        world_size=world_size,
    )
    train = TokenBatches(
        train_tokens,
        cfg.seq_len,
        cfg.batch_size,
        shuffle=True,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        epoch_tokens=cfg.epoch_tokens,
    )
    val = TokenBatches(
        val_tokens, cfg.seq_len, cfg.batch_size, shuffle=False, rank=rank, world_size=world_size
    )
    return train, val


def compile_layers(model: HierarchicalTransformer) -> None:
    """``--compile``: torch.compile every main layer and ILT in place, one by one, so parameter names (and so
    checkpoints) stay those of the uncompiled model."""
    for module in [*model.layers, *model.ilts]:
        module.compile()


def run_training(cfg: TrainConfig, model_args: dict) -> Trainer:
    """Builds tokenizer, data, model and Trainer from the settings (resuming if asked) and trains. Under
    torchrun every rank runs this; the model is wrapped in DistributedDataParallel and rank 0 does all output."""
    dist_info = distributed.setup(cfg.device)
    try:
        return _run_training(cfg, model_args, dist_info)
    finally:
        distributed.teardown()


def _run_training(cfg: TrainConfig, model_args: dict, dist_info: distributed.DistInfo) -> Trainer:
    say = print if dist_info.is_main else (lambda *args, **kwargs: None)
    out_dir = Path(cfg.out_dir)
    check_out_dir(out_dir, resuming=cfg.resume is not None, overwrite=cfg.overwrite)
    with hold_out_dir(out_dir, dist_info, say):
        # again: a run that held the folder until a moment ago may have saved there
        check_out_dir(out_dir, resuming=cfg.resume is not None, overwrite=cfg.overwrite)
        if dist_info.is_main:
            remove_stale_temporaries(out_dir)
        return _train(cfg, model_args, dist_info, say)


def _train(cfg: TrainConfig, model_args: dict, dist_info: distributed.DistInfo, say) -> Trainer:
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    device = dist_info.device
    tokenizer = Tokenizer.load(cfg.tokenizer)
    ckpt = load_checkpoint(cfg.resume) if cfg.resume else None
    if ckpt is not None:
        model = model_from_checkpoint(ckpt, cfg.resume)
        check_compatible(ckpt, model.config, cfg.resume, tokenizer=tokenizer, requested=model_args)
    else:
        args = {k: v for k, v in model_args.items() if v is not None}
        try:
            model = HierarchicalTransformer(ModelConfig(vocab_size=tokenizer.vocab_size, **args))
        except ValueError as e:
            raise UserError(str(e)) from None
    if cfg.seq_len > model.config.max_seq_len:
        raise UserError(f"--seq_len {cfg.seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    train_data, val_data = prepare_data(cfg, tokenizer, dist_info.rank, dist_info.world_size)
    # the content of every id trained and validated on (the cache's own checksum when the run uses all of it)
    data_digest = ids_digest(train_data.tokens, val_data.tokens)
    if ckpt is not None:
        note = check_same_data(ckpt, data_digest, cfg.resume, new_data=cfg.new_data)
        if note:
            say(note)
    model.to(device)
    if cfg.compile:
        compile_layers(model)
    net = None
    if dist_info.enabled:
        device_ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(LanguageModelLoss(model), device_ids=device_ids)
    trainer = Trainer(
        model,
        cfg,
        train_data,
        val_data,
        device=device,
        tokenizer_name=tokenizer.name,
        data_digest=data_digest,
        net=net,
        is_main=dist_info.is_main,
    )
    if ckpt is not None:
        trainer.load_state_dict(ckpt)
        if cfg.new_data:
            say(
                f"Resumed from {cfg.resume} on new data: its first epoch is epoch {trainer.epoch + 1}, from step "
                f"{trainer.global_step}; best_model.pt is judged on the new validation data from now on"
            )
        else:
            say(
                f"Resumed from {cfg.resume}: epoch {trainer.epoch}, step {trainer.global_step}, "
                f"best val loss {trainer.best_loss:.4f}"
            )
    if dist_info.rank > 0:
        # distinct dropout masks per rank (rank 0 keeps the seeded or restored stream)
        torch.manual_seed(cfg.seed + 1_000_003 * dist_info.rank + trainer.global_step)
    n = model.num_parameters()
    say(
        f"Model: {n / 1e6:.2f}M parameters ({model.num_parameters(ilt_only=True) / 1e6:.2f}M in "
        f"{len(model.ilts)} ILTs) | device {device} | precision {trainer.amp_dtype or torch.float32} | "
        f"{len(train_data.tokens):,} train / {len(val_data.tokens):,} val tokens | "
        f"{len(train_data)} batches of {cfg.batch_size}x{cfg.seq_len} per epoch"
    )
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * dist_info.world_size
    say(
        f"Effective batch: {cfg.batch_size} x {cfg.gradient_accumulation_steps} accumulation x "
        f"{dist_info.world_size} process(es) = {per_step} sequences ({per_step * cfg.seq_len:,} tokens) per step"
    )
    if trainer.epoch >= cfg.epochs:
        say(f"Nothing to do: the checkpoint already completed {trainer.epoch} of --epochs {cfg.epochs}")
        return trainer
    with stop_on_signals(trainer):
        trainer.fit()
    return trainer


def check_out_dir(out_dir: Path, *, resuming: bool, overwrite: bool) -> None:
    """Fails before any work if checkpoints could not be written, or if a fresh run would replace old ones."""
    target = out_dir if out_dir.exists() else out_dir.parent
    if not target.is_dir():
        raise UserError(f"--out_dir {out_dir}: {target} is not an existing folder")
    if not os.access(target, os.W_OK | os.X_OK):
        raise UserError(f"--out_dir {out_dir}: {target} is not writable")
    existing = [n for n in CHECKPOINT_NAMES if (out_dir / n).exists()]
    if existing and not resuming and not overwrite:
        raise UserError(
            f"{out_dir} already holds {' and '.join(existing)}; continue with --resume {out_dir / existing[-1]}, "
            "start afresh there with --overwrite, or choose another --out_dir"
        )


# --- one run per --out_dir ----------------------------------------------------------------------------------

LOCK_NAME = ".hilt_train.lock"


@contextlib.contextmanager
def hold_out_dir(out_dir: Path, dist_info: distributed.DistInfo, say=print):
    """``out_dir_lock`` held by rank 0 for the whole run; under torchrun the other ranks learn whether it got it
    (an error there must not leave them waiting)."""
    verdict = [None]
    with contextlib.ExitStack() as stack:
        if dist_info.is_main:
            try:
                stack.enter_context(out_dir_lock(out_dir, say))
            except Exception as e:
                verdict = [str(e) if isinstance(e, UserError) else f"rank 0 could not lock {out_dir} ({e!r})"]
                if dist_info.enabled:
                    torch.distributed.broadcast_object_list(verdict, src=0)
                raise
        if dist_info.enabled:
            torch.distributed.broadcast_object_list(verdict, src=0)
        if verdict[0] is not None:
            raise UserError(verdict[0])
        yield


@contextlib.contextmanager
def out_dir_lock(out_dir: Path, say=print):
    """Holds ``out_dir`` (creating it) for one run: another ``hilt train`` there is refused, naming the PID that
    holds it, instead of interleaving its metrics and racing its checkpoints with this run's.

    An flock on ``out_dir/.hilt_train.lock``, which holds the owner's PID and host: the kernel drops the lock when
    its process dies, however it dies, so the file a killed run leaves behind is stale by construction and the
    next run takes it over. A folder this run created and left empty (a run refused before writing) is removed."""
    created = False
    with contextlib.suppress(FileExistsError):
        out_dir.mkdir()
        created = True
    try:
        fd = _lock(out_dir / LOCK_NAME, say)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise
    try:
        yield
    finally:
        if fd is not None:
            # unlinked while still locked: a run that opened the old file sees it gone and locks a new one
            with contextlib.suppress(OSError):
                (out_dir / LOCK_NAME).unlink()
            os.close(fd)
        if created:
            with contextlib.suppress(OSError):  # not empty: the run wrote something, which stays
                out_dir.rmdir()


def _lock(path: Path, say) -> int | None:
    """The descriptor holding the lock, or None where files cannot be locked (said once)."""
    if fcntl is None:
        say(f"note: cannot lock {path.parent} on this system; a second run there would not be refused")
        return None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            for _ in range(10):  # the holder writes its PID a moment after it takes the lock
                if holder != "unknown":
                    break
                time.sleep(0.1)
                holder = _lock_holder(fd)
            os.close(fd)
            raise UserError(
                f"--out_dir {path.parent} is in use by another hilt train ({holder}); wait for it to finish, "
                "or choose another --out_dir"
            ) from None
        except OSError as e:  # e.g. ENOLCK on some network filesystems
            os.close(fd)
            say(f"note: cannot lock {path.parent} ({e.strerror}); a second run there would not be refused")
            return None
        try:
            current = os.stat(path)
            mine = os.fstat(fd)
            if (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed the file between our open and our lock: lock the new one
    previous = _lock_holder(fd)
    if previous != "unknown":
        say(f"note: taking over {path} from {previous}, which is no longer running")
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    return fd


def _lock_holder(fd: int) -> str:
    """The holder a lock file names ("PID 123 on host h, since ..."; "unknown" when empty or unreadable)."""
    try:
        record = json.loads(os.pread(fd, 4096, 0))
        return f"PID {int(record['pid'])} on host {record['host']}, since {record['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"


@contextlib.contextmanager
def stop_on_signals(trainer: Trainer):
    """SIGINT/SIGTERM ask the trainer to stop after the current optimizer step (and save); a second SIGINT
    interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if trainer.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.request_stop(signum)
        if trainer.is_main:
            print(
                f"\n{signal.Signals(signum).name}: finishing the current step, then saving last_model.pt",
                file=sys.stderr,
            )

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
