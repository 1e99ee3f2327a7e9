"""``hilt train``: the glue from its settings (``TrainConfig``, config.py) to a running ``Trainer`` (trainer.py):
tokenizer, data, model, resume, DDP under torchrun, the lock on ``--out_dir`` (out_dir.py), and signals.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from hilt.checkpoint.store import (
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
from hilt.training.config import TrainConfig  # noqa: F401 (re-exported: hilt train's settings)
from hilt.training.loss import LanguageModelLoss
from hilt.training.out_dir import check_out_dir, hold_out_dir  # noqa: F401 (re-exported)
from hilt.training.trainer import Trainer, TrainingDiverged, TrainingInterrupted, build_optimizer  # noqa: F401 (re-exported)

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
