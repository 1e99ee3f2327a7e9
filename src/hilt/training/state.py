"""A ``Trainer``'s checkpoint: what it writes (``trainer_state``) and how a resume puts it back
(``restore_trainer``): model, optimizer, schedule, scaler, position in the data, best loss, history, RNG.
Both take the ``Trainer`` as ``self``: they are its methods, kept apart to keep trainer.py readable in one sitting
(and this module apart from the class it serves, so neither imports the other).
"""

from __future__ import annotations

import math
from dataclasses import asdict

from hilt.checkpoint.store import FORMAT_VERSION, capture_rng_state, data_fingerprint, resume_position
from hilt.training.metrics import perplexity
from hilt.training.schedule import lr_factor


def trainer_state(self, train_loss: float | None = None) -> dict:
    """Everything a resume needs, as one checkpoint dict (see hilt.checkpoint.store for the keys)."""
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
        "data_digest": self.data_digest,
        "data_start_epoch": self.data_start_epoch,
        "best_loss": self.best_loss,
        "epochs_without_improvement": self.epochs_without_improvement,
        "train_loss": train_loss,
        "val_loss": self.last_val_loss,
        "perplexity": perplexity(self.last_val_loss),
        "history": list(self.history),
        "rng_state": capture_rng_state(),
    }


def restore_trainer(self, ckpt: dict) -> None:
    """Restores everything a resume needs. If the batching changed since the checkpoint, training continues
    from the start of the next epoch instead of mid-epoch (the old position means nothing). With
    ``--new_data`` that next epoch is the new data's first, and the best validation loss is forgotten: it was
    measured on other validation data."""
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
    self.data_start_epoch = int(ckpt.get("data_start_epoch", 0))
    if self.cfg.new_data:
        epoch, batch = int(ckpt["epoch"]), int(ckpt["batch_in_epoch"])
        self.epoch, self.batch_in_epoch = (epoch + 1 if batch else epoch), 0
        self.data_start_epoch = self.epoch
        self.best_loss = math.inf
        self.epochs_without_improvement = 0
        self.last_val_loss = math.nan
        stats = None
    else:
        self.epoch, self.batch_in_epoch, stats = resume_position(ckpt, self.train_data)
    if stats is not None:
        self.epoch_stats = stats
    elif self.epoch > int(ckpt["epoch"]) and self.is_main and not self.cfg.new_data:
        print(
            f"note: the data or batch settings changed since the checkpoint; starting epoch {self.epoch + 1} afresh"
        )
    # the schedule is a pure function of the step: put the rate where it belongs for this (new) total
    for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
        group["lr"] = base * lr_factor(
            self.global_step, self.total_steps, self.cfg.scheduler, self.cfg.warmup_steps
        )
