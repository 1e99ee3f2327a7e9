"""The training loop: AdamW, mixed precision, gradient accumulation and clipping, the LR schedule and the ILT
curriculum, per-epoch validation, and checkpoints that resume exactly.

The ``Trainer`` knows nothing about tokenizers or files: it gets a model (optionally wrapped, e.g. in DDP),
two ``TokenBatches`` and a ``TrainConfig``. ``run_training`` is the glue the CLI calls.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from hilt import distributed, memory
from hilt.checkpoint import (
    CHECKPOINT_NAMES,
    FORMAT_VERSION,
    atomic_save,
    capture_rng_state,
    check_compatible,
    data_fingerprint,
    load_checkpoint,
    model_from_checkpoint,
    remove_stale_temporaries,
    resume_position,
)
from hilt.data import TokenBatches, train_val_tokens
from hilt.device import autocast_dtype
from hilt.distributed import any_rank, mean_over_ranks
from hilt.errors import UserError
from hilt.ilt_stats import ilt_stats
from hilt.loss import LanguageModelLoss
from hilt.metrics import MetricsLog, perplexity
from hilt.model import HierarchicalTransformer, ModelConfig
from hilt.schedule import SCHEDULERS, lr_factor
from hilt.tokenizer import Tokenizer


class TrainingDiverged(UserError):
    """A non-finite loss or gradient norm: training stops and the last good checkpoints stay as they are."""


class TrainingInterrupted(UserError):
    """SIGINT/SIGTERM: the current step finished and last_model.pt was written; exit status 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


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
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
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
        if self.clip_grad < 0 or self.weight_decay < 0:
            raise UserError("--clip_grad and --weight_decay must be >= 0")
        if not 0 < self.val_fraction < 1:
            raise UserError(f"--val_fraction must be between 0 and 1, got {self.val_fraction}")
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # weight decay on matrices only: decaying biases, norms and (tied) embeddings' rows hurts small models
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel updates every tensor in one pass (measured: 3% of a default bf16 step on CPU)
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=fused or None)


class Trainer:
    """Trains ``model`` on ``train_data``, validating on ``val_data`` after every epoch.

    ``net`` is what training steps go through: by default a ``LanguageModelLoss`` of the model; under torchrun a
    DistributedDataParallel wrapper of one.
    Only the main process (``is_main``) prints, logs and writes checkpoints.
    """

    def __init__(
        self,
        model: HierarchicalTransformer,
        cfg: TrainConfig,
        train_data: TokenBatches,
        val_data: TokenBatches,
        *,
        device: torch.device,
        tokenizer_name: str = "",
        net: nn.Module | None = None,
        is_main: bool = True,
    ):
        self.model = model
        self.criterion = LanguageModelLoss(model)
        self.net = net if net is not None else self.criterion
        self.cfg = cfg
        self.train_data = train_data
        self.val_data = val_data
        self.device = device
        self.tokenizer_name = tokenizer_name
        self.is_main = is_main
        self.out_dir = Path(cfg.out_dir)

        self.optimizer = build_optimizer(model, cfg)
        self.steps_per_epoch = math.ceil(len(train_data) / cfg.gradient_accumulation_steps)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        # the lambda reads self.total_steps, so resuming with a larger --epochs stretches the schedule
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.total_steps, cfg.scheduler, cfg.warmup_steps)
        )
        self.amp_dtype = autocast_dtype(device, cfg.amp)
        # fp16 needs loss scaling to keep small gradients from flushing to zero; bf16 and fp32 do not
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        tensorboard_dir = self.out_dir / "tensorboard" if cfg.tensorboard else None
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", tensorboard_dir) if is_main else None

        self.epoch = 0  # epochs completed
        self.batch_in_epoch = 0  # batches of the current epoch already trained
        self.global_step = 0  # optimizer steps taken
        self.best_loss = math.inf
        self.last_val_loss = math.nan
        self.epoch_stats = _new_epoch_stats()
        self.history: list[dict] = []
        self.epochs_without_improvement = 0
        self.stop_signal: int | None = None  # set by a signal handler; honoured between optimizer steps

    # --- one step ---------------------------------------------------------------------------------------

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def loss(
        self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float | None, reduction="mean"
    ):
        """Next-token loss through ``net`` (the LanguageModelLoss, or its DDP wrapper) at training ``progress``
        (0 -> 1; None: the trained model, as evaluation sees it)."""
        with self.autocast():
            return net(x.to(self.device), y.to(self.device), reduction=reduction, progress=progress)

    def train_step(self, order: torch.Tensor) -> None:
        """One optimizer step over the next ``gradient_accumulation_steps`` batches of this epoch."""
        n_batches = len(self.train_data)
        first = self.batch_in_epoch
        last = min(first + self.cfg.gradient_accumulation_steps, n_batches)
        progress = (self.epoch + first / n_batches) / self.cfg.epochs  # the model's curriculum reads it
        losses = []
        for i in range(first, last):
            x, y = self.train_data.batch(self.epoch, i, order)
            # under DDP only the last micro-step of an accumulation group all-reduces the gradients
            sync = (
                contextlib.nullcontext()
                if i == last - 1 or not hasattr(self.net, "no_sync")
                else self.net.no_sync()
            )
            with sync:
                loss = self.loss(self.net, x, y, progress)
                self.scaler.scale(loss / (last - first)).backward()
            losses.append(loss.detach())
        # averaged over ranks: every rank then logs the same number and agrees on a non-finite loss
        step_loss = mean_over_ranks(torch.stack(losses).mean().item(), self.device)
        self.scaler.unscale_(self.optimizer)
        max_norm = self.cfg.clip_grad if self.cfg.clip_grad > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).item()
        # with fp16 loss scaling an inf gradient is routine (the scaler skips the step); elsewhere it is fatal
        if not math.isfinite(step_loss) or (not self.scaler.is_enabled() and not math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(
                f"training diverged at step {self.global_step + 1} (loss {step_loss}, grad norm {grad_norm}); "
                f"the last good checkpoints in {self.out_dir} are unchanged - try a lower --lr"
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.global_step += 1
        self.batch_in_epoch = last
        stats = self.epoch_stats
        stats["loss_sum"] += step_loss * (last - first)
        stats["batches"] += last - first
        stats["grad_norm_sum"] += grad_norm
        stats["steps"] += 1
        if self.metrics:
            self.metrics.write(
                kind="step",
                step=self.global_step,
                epoch=self.epoch + last / n_batches,
                loss=step_loss,
                lr=self.current_lr(),
                grad_norm=grad_norm,
                modulation_scale=self.model.modulation_scale_at(progress),
            )
            if self.cfg.ilt_stats_every and self.global_step % self.cfg.ilt_stats_every == 0:
                self.log_ilt_stats(progress)

    def current_lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def log_ilt_stats(self, progress: float) -> None:
        """What the ILTs do right now (see hilt.ilt_stats), on the first few validation windows: one forward pass
        in eval mode, no gradients, no random numbers drawn, so training is unaffected."""
        batch = next(self.val_data.eval_batches(), None)
        if not self.model.ilts or batch is None:
            return
        stats = ilt_stats(self.model, batch[0][:4].to(self.device), self.model.modulation_scale_at(progress))
        del stats["labels"]
        epoch = self.epoch + self.batch_in_epoch / max(1, len(self.train_data))
        self.metrics.write(kind="ilt", step=self.global_step, epoch=epoch, **stats)

    # --- evaluation -------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss over every validation window, at the final modulation scale."""
        was_training = self.model.training
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss sum, tokens)
        for x, y in self.val_data.eval_batches():
            total[0] += self.loss(self.criterion, x, y, None, "sum").double()
            total[1] += y.numel()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
        self.model.train(was_training)
        return (total[0] / total[1]).item()

    # --- the loop ---------------------------------------------------------------------------------------

    def fit(self) -> list[dict]:
        self.model.train()
        # CPU: each step reuses the memory the step before freed instead of faulting in fresh pages
        # (hilt.memory); evaluation and the epoch's checkpoints run with the allocator's defaults
        keep_freed_memory = memory.freed_memory_kept if self.device.type == "cpu" else contextlib.nullcontext
        while self.epoch < self.cfg.epochs:
            with keep_freed_memory():
                self.train_epoch()
            self.end_epoch()
            # val loss is averaged over ranks, so every rank reaches the same decision here
            if (
                self.cfg.patience
                and self.epochs_without_improvement >= self.cfg.patience
                and self.epoch < self.cfg.epochs
            ):
                if self.is_main:
                    print(f"Early stop: no validation improvement for {self.cfg.patience} epochs")
                break
        return self.history

    def train_epoch(self) -> None:
        """The rest of the current epoch's steps (all of them, unless resuming mid-epoch), with a progress bar."""
        n_tokens_per_batch = self.cfg.batch_size * self.cfg.seq_len * self.train_data.world_size
        order = self.train_data.window_order(self.epoch)
        bar = tqdm(
            total=len(self.train_data),
            initial=self.batch_in_epoch,
            desc=f"Epoch {self.epoch + 1}/{self.cfg.epochs}",
            disable=not self.is_main,
            leave=False,
            dynamic_ncols=True,
        )
        while self.batch_in_epoch < len(self.train_data):
            if self.should_stop():
                bar.close()
                self.stop()
            before, t0 = self.batch_in_epoch, time.perf_counter()
            self.train_step(order)
            done = self.batch_in_epoch - before
            bar.update(done)
            tok_s = done * n_tokens_per_batch / (time.perf_counter() - t0)
            bar.set_postfix(
                loss=f"{self.epoch_stats['loss_sum'] / self.epoch_stats['batches']:.4f}",
                lr=f"{self.current_lr():.2e}",
                tok_s=f"{tok_s:,.0f}",
            )
            if (
                self.cfg.save_every
                and self.global_step % self.cfg.save_every == 0
                and self.batch_in_epoch < len(self.train_data)
            ):
                self.save("last_model.pt")
        bar.close()

    def request_stop(self, signum: int) -> None:
        self.stop_signal = signum

    def should_stop(self) -> bool:
        """True on every rank once any rank got a stop signal (torchrun forwards SIGTERM to all of them)."""
        stop = any_rank(self.stop_signal is not None, self.device)
        if stop and self.stop_signal is None:
            self.stop_signal = signal.SIGTERM  # another rank was signalled
        return stop

    def stop(self) -> None:
        """Writes last_model.pt at the current step and ends the run with a hint on how to continue."""
        path = self.out_dir / "last_model.pt"
        self.save("last_model.pt")
        name = signal.Signals(self.stop_signal).name
        raise TrainingInterrupted(
            f"{name} received: stopped after step {self.global_step} (epoch {self.epoch + 1}, batch "
            f"{self.batch_in_epoch}/{len(self.train_data)}) and saved {path}; to continue, run the same command "
            f"with --resume {path}",
            self.stop_signal,
        )

    def end_epoch(self) -> None:
        stats = self.epoch_stats
        train_loss = stats["loss_sum"] / max(1, stats["batches"])
        val_loss = self.evaluate()
        self.last_val_loss = val_loss
        record = {
            "epoch": self.epoch + 1,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "avg_grad_norm": stats["grad_norm_sum"] / max(1, stats["steps"]),
            "lr": self.current_lr(),
        }
        self.history.append(record)
        self.epoch += 1
        self.batch_in_epoch = 0
        self.epoch_stats = _new_epoch_stats()
        improved = val_loss < self.best_loss
        if improved:
            self.best_loss = val_loss
        self.epochs_without_improvement = 0 if improved else self.epochs_without_improvement + 1
        if not self.is_main:
            return
        print(f"\nEpoch {record['epoch']}/{self.cfg.epochs} Summary:")
        print(f"Train Loss: {train_loss:.4f} | Train Perplexity: {perplexity(train_loss):.2f}")
        print(f"Val Loss: {val_loss:.4f} | Val Perplexity: {perplexity(val_loss):.2f}")
        print(f"Avg Grad Norm: {record['avg_grad_norm']:.4f} | Learning Rate: {record['lr']:.6f}")
        if self.cfg.ilt_stats_every:
            self.log_ilt_stats(self.epoch / self.cfg.epochs)
        self.metrics.write(kind="epoch", step=self.global_step, **record)
        if improved:
            self.save("best_model.pt", train_loss=train_loss)
            print(f"✓ Saved best model with val loss: {val_loss:.4f}, perplexity: {perplexity(val_loss):.2f}")
        self.save("last_model.pt", train_loss=train_loss)

    # --- checkpoints ------------------------------------------------------------------------------------

    def state_dict(self, train_loss: float | None = None) -> dict:
        stats = self.epoch_stats
        if train_loss is None:
            train_loss = stats["loss_sum"] / stats["batches"] if stats["batches"] else math.nan
        return {
            "format_version": FORMAT_VERSION,
            "config": self.model.config.to_dict(),
            "train_config": asdict(self.cfg),
            "tokenizer": self.tokenizer_name,
            "model_state_dict": self.model.state_dict(),
            "optimizer_state_dict": self.optimizer.state_dict(),
            "scheduler_state_dict": self.scheduler.state_dict(),
            "scaler_state_dict": self.scaler.state_dict(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "epoch_stats": dict(stats),
            "data_fingerprint": data_fingerprint(self.train_data),
            "best_loss": self.best_loss,
            "epochs_without_improvement": self.epochs_without_improvement,
            "train_loss": train_loss,
            "val_loss": self.last_val_loss,
            "perplexity": perplexity(self.last_val_loss),
            "history": list(self.history),
            "rng_state": capture_rng_state(),
        }

    def save(self, name: str, train_loss: float | None = None) -> None:
        if not self.is_main:  # one writer: the main process
            return
        try:
            atomic_save(self.state_dict(train_loss), self.out_dir / name)
        except OSError as e:
            raise UserError(
                f"could not write {self.out_dir / name} ({e.strerror or e}); the previous file, if any, is intact"
            ) from None

    def load_state_dict(self, ckpt: dict) -> None:
        """Restores everything a resume needs. If the data or batching changed since the checkpoint, training
        continues from the start of the next epoch instead of mid-epoch (the old position means nothing)."""
        self.model.load_state_dict(ckpt["model_state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer_state_dict"])
        self.scheduler.load_state_dict(ckpt["scheduler_state_dict"])
        # --lr on the resume command wins over the checkpoint's (identical for an exact resume)
        self.scheduler.base_lrs = [self.cfg.lr for _ in self.scheduler.base_lrs]
        if ckpt.get("scaler_state_dict"):
            self.scaler.load_state_dict(ckpt["scaler_state_dict"])
        self.global_step = int(ckpt["global_step"])
        self.best_loss = float(ckpt["best_loss"])
        self.epochs_without_improvement = int(ckpt.get("epochs_without_improvement", 0))
        self.last_val_loss = float(ckpt["val_loss"])
        self.history = list(ckpt.get("history", []))
        self.epoch, self.batch_in_epoch, stats = resume_position(ckpt, self.train_data)
        if stats is not None:
            self.epoch_stats = stats
        elif self.epoch > int(ckpt["epoch"]) and self.is_main:
            print(
                f"note: the data or batch settings changed since the checkpoint; starting epoch {self.epoch + 1} afresh"
            )
        # the schedule is a pure function of the step: put the rate where it belongs for this (new) total
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * lr_factor(
                self.global_step, self.total_steps, self.cfg.scheduler, self.cfg.warmup_steps
            )


def _new_epoch_stats() -> dict:
    return {"loss_sum": 0.0, "batches": 0, "grad_norm_sum": 0.0, "steps": 0}


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
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    device = dist_info.device
    out_dir = Path(cfg.out_dir)
    check_out_dir(out_dir, resuming=cfg.resume is not None, overwrite=cfg.overwrite)
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
    if dist_info.is_main:
        out_dir.mkdir(exist_ok=True)  # only now: a run refused above leaves no trace
        remove_stale_temporaries(out_dir)
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
        net=net,
        is_main=dist_info.is_main,
    )
    if ckpt is not None:
        trainer.load_state_dict(ckpt)
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
