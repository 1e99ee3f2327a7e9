"""The training loop: AdamW, mixed precision, gradient accumulation and clipping, the LR schedule, per-epoch
validation, and checkpoints that resume exactly.

The ``Trainer`` knows nothing about tokenizers or files: it gets a model (optionally wrapped, e.g. in DDP), two
``TokenBatches`` and a ``TrainConfig``. Nor does it know how ILTs train: it passes the model its training progress,
as it passes the LR schedule its step, and the model's curriculum turns that into a modulation scale. Its one
look at the ILTs is a diagnostic, logging ``HierarchicalTransformer.ilt_stats`` every ``--ilt_stats_every`` steps.
``hilt.training.run.run_training`` is the glue the CLI calls.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm import tqdm

from hilt import memory
from hilt.checkpoint.store import (
    atomic_save,
)
from hilt.data.batches import TokenBatches
from hilt.device import autocast_dtype
from hilt.errors import UserError
from hilt.model import HierarchicalTransformer
from hilt.training.distributed import any_rank, mean_over_ranks
from hilt.training.loss import HeadLoss, LanguageModelLoss
from hilt.training.metrics import MetricsLog, perplexity
from hilt.training.schedule import lr_factor
from hilt.training.state import restore_trainer, trainer_state

if TYPE_CHECKING:
    from hilt.training.config import TrainConfig


class TrainingDiverged(UserError):
    """A non-finite loss or gradient norm: training stops and the last good checkpoints stay as they are."""


class TrainingInterrupted(UserError):
    """SIGINT/SIGTERM: the current step finished and last_model.pt was written; exit status 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


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
        data_digest: str | None = None,
        net: nn.Module | None = None,
        is_main: bool = True,
    ):
        self.model = model
        self.net = net if net is not None else LanguageModelLoss(model)
        self.cfg = cfg
        self.train_data = train_data
        self.val_data = val_data
        self.device = device
        self.tokenizer_name = tokenizer_name
        self.data_digest = data_digest
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
        self.data_start_epoch = 0  # the epoch at which this data's first epoch began (> 0 after --new_data)
        self.global_step = 0  # optimizer steps taken
        self.best_loss = math.inf
        self.last_val_loss = math.nan
        self.epoch_stats = _new_epoch_stats()
        self.history: list[dict] = []
        self.epochs_without_improvement = 0
        self.stop_signal: int | None = None  # set by a signal handler; honoured between optimizer steps

    @property
    def data_epoch(self) -> int:
        """Which epoch of the training data the current epoch is (its shuffled order's seed)."""
        return self.epoch - self.data_start_epoch

    # --- one step ---------------------------------------------------------------------------------------

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def loss(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, progress: float) -> torch.Tensor:
        """Mean next-token loss through ``net`` (the LanguageModelLoss, or its DDP wrapper) at training
        ``progress`` (0 -> 1)."""
        with self.autocast():
            return net(x.to(self.device), y.to(self.device), progress=progress)

    def train_step(self, order: torch.Tensor) -> None:
        """One optimizer step over the next ``gradient_accumulation_steps`` batches of this epoch."""
        n_batches = len(self.train_data)
        first = self.batch_in_epoch
        last = min(first + self.cfg.gradient_accumulation_steps, n_batches)
        progress = (self.epoch + first / n_batches) / self.cfg.epochs  # the model's curriculum reads it
        losses = []
        for i in range(first, last):
            x, y = self.train_data.batch(self.data_epoch, i, order)
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
        """What the ILTs do right now (see HierarchicalTransformer.ilt_stats), on the first few validation windows: one forward pass
        in eval mode, no gradients, no random numbers drawn, so training is unaffected."""
        batch = next(self.val_data.eval_batches(), None)
        if not self.model.ilts or batch is None:
            return
        stats = self.model.ilt_stats(batch[0][:4].to(self.device), self.model.modulation_scale_at(progress))
        del stats["labels"]
        epoch = self.epoch + self.batch_in_epoch / max(1, len(self.train_data))
        self.metrics.write(kind="ilt", step=self.global_step, epoch=epoch, **stats)

    # --- evaluation -------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean next-token loss over every validation window, at the final modulation scale: the final hidden
        states through ``HeadLoss``, exactly as `hilt eval` scores them, so its ``--split val`` reproduces it."""
        was_training = self.model.training
        self.model.eval()
        # one per call (a snapshot of the head's weight): its logits buffer serves every batch, then goes
        head_loss = HeadLoss(self.model.head.weight, self.amp_dtype or self.model.head.weight.dtype)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss sum, tokens)
        for x, y in self.val_data.eval_batches():
            with self.autocast():
                hidden = self.model.features(x.to(self.device))  # (B, T, C)
            total[0] += head_loss(hidden.flatten(0, 1), y.to(self.device).flatten())
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
        order = self.train_data.window_order(self.data_epoch)
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
        return trainer_state(self, train_loss)

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
        """Restores everything a resume needs (``state.restore_trainer``)."""
        restore_trainer(self, ckpt)


def _new_epoch_stats() -> dict:
    return {"loss_sum": 0.0, "batches": 0, "grad_norm_sum": 0.0, "steps": 0}
