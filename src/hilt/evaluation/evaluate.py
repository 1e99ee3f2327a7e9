"""``hilt eval``: loss, perplexity and bits per byte of a checkpoint on any text.

Texts longer than the context are scored with a sliding window: windows of ``seq_len + 1`` tokens start every
``stride`` tokens; the first window scores all its ``seq_len`` targets, every later one only its last ``stride``
targets (the ones no earlier window scored), each with ``seq_len - stride`` tokens of context before it. A tail
shorter than ``stride`` that fills no window is left out, exactly as in training's validation. With
``stride == seq_len`` the windows are the trainer's validation windows, so ``hilt eval --split val`` reproduces the
validation loss the training run recorded (same tokens, same modulation scale, same precision).

The loss comes from the final hidden states through ``hilt.training.loss.HeadLoss``, the exact loss training's validation
computes too: a few hundred tokens' logits at a time, in buffers reused for the whole run. The full (B, T, 50,260)
fp32 logits of a batch (412 MB at 32 x 64) were faulted in afresh every batch and then read and written twice more
by the log-softmax (docs/performance.md, "Evaluation speed").
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from hilt.checkpoint.store import load_model_and_tokenizer
from hilt.data.batches import tokenize_file, train_val_tokens
from hilt.data.tokenizer import Tokenizer
from hilt.device import autocast_dtype, resolve_device
from hilt.errors import UserError
from hilt.model import HierarchicalTransformer
from hilt.training.loss import HeadLoss
from hilt.training.metrics import perplexity

SPLITS = ("all", "train", "val")


def sliding_windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int]]:
    """(start, scored) per window: inputs tokens[start : start + seq_len], targets one further, of which the last
    ``scored`` count. A text shorter than one window is one window over all of it."""
    if n_tokens < 2:
        raise UserError(f"the text has {n_tokens} token(s); scoring needs at least 2")
    if not 1 <= stride <= seq_len:
        raise UserError(f"--stride must be between 1 and --seq_len ({seq_len}), got {stride}")
    if n_tokens < seq_len + 1:
        return [(0, n_tokens - 1)]
    starts = range(0, n_tokens - seq_len, stride)  # a window needs tokens start .. start + seq_len
    return [(s, seq_len if s == 0 else stride) for s in starts]


@dataclass
class EvalResult:
    loss: float  # mean next-token cross-entropy, nats
    perplexity: float
    bits_per_byte: float
    tokens: int  # target tokens scored
    bytes: int  # UTF-8 bytes of the scored text
    windows: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else math.inf


@torch.no_grad()
def evaluate_tokens(
    model: HierarchicalTransformer,
    tokens: np.ndarray,
    *,
    seq_len: int,
    stride: int | None = None,
    batch_size: int = 32,
    modulation_scale: float | None = None,
    amp_dtype: torch.dtype | None = None,
    tokenizer: Tokenizer | None = None,
) -> EvalResult:
    """Scores ``tokens`` (1-D ids) with the sliding window above. ``tokenizer`` is needed for bits per byte
    (NaN without it). Same arithmetic as the trainer's validation: the hidden states under ``amp_dtype``
    autocast, logits in that dtype, an fp32 log-softmax per token (``HeadLoss``), summed in float64."""
    stride = seq_len if stride is None else stride
    if seq_len > model.config.max_seq_len:
        raise UserError(f"--seq_len {seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    windows = sliding_windows(len(tokens), seq_len, stride)
    if modulation_scale is None:
        modulation_scale = model.config.modulation_scale_end
    device = next(model.parameters()).device
    width = min(seq_len, len(tokens) - 1) + 1
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    t0 = time.perf_counter()
    head_loss = HeadLoss(model.head.weight, amp_dtype or model.head.weight.dtype)
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        rows = np.stack([tokens[s : s + width] for s, _ in chunk]).astype(np.int64)
        batch = torch.from_numpy(rows).to(device)  # (B, T + 1)
        x, y = batch[:, :-1], batch[:, 1:]  # (B, T) each
        with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext():
            hidden = model.features(x, modulation_scale)  # (B, T, C)
        # only the targets this window is the first to score (its last `scored` positions) reach the head
        first_new = torch.tensor([y.size(1) - scored for _, scored in chunk], device=device)  # (B,)
        keep = torch.arange(y.size(1), device=device) >= first_new.unsqueeze(1)  # (B, T)
        total += head_loss(hidden[keep], y[keep])
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    model.train(was_training)

    n_scored = sum(scored for _, scored in windows)
    loss = (total / n_scored).item()
    last = windows[-1][0] + width - 1  # index of the last scored target; targets 1 .. last are all scored
    n_bytes = len(tokenizer.decode(tokens[1 : last + 1].tolist()).encode("utf-8")) if tokenizer else 0
    bpb = loss * n_scored / math.log(2) / n_bytes if n_bytes else math.nan
    ppl = perplexity(loss)
    return EvalResult(loss, ppl, bpb, n_scored, n_bytes, len(windows), seconds)


# --- hilt eval -----------------------------------------------------------------------------------------------


def select_tokens(
    ckpt: dict, tokenizer: Tokenizer, text_file: str | None, split: str, max_tokens: int | None
) -> tuple[np.ndarray, str]:
    """The ids to score and a description. ``split`` train/val cuts the file exactly as the training run did
    (with the settings its checkpoint records: max_tokens, val_fraction, document separator, ...); ``all``
    scores the whole file (the first ``max_tokens`` ids when > 0)."""
    if split not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    train_config = ckpt.get("train_config") or {}
    if text_file is None:
        if split == "all" or not train_config.get("text_file"):
            raise UserError("give --text_file (or --split train/val to use the checkpoint's training file)")
        text_file = train_config["text_file"]
    tc = train_config
    if split == "all":
        tokens = tokenize_file(
            text_file,
            tokenizer,
            max_tokens or 0,
            tokenizer_dir=tc.get("tokenizer"),
            text_field=tc.get("text_field", "text"),
        )
        return tokens, str(text_file)
    if "val_fraction" not in tc or "seq_len" not in tc:
        raise UserError("--split needs the training run's settings, which this checkpoint does not record")
    train, val = train_val_tokens(
        text_file,
        tokenizer,
        seq_len=tc["seq_len"],
        val_fraction=tc["val_fraction"],
        max_tokens=tc.get("max_tokens", 0) if max_tokens is None else max_tokens,
        tokenizer_dir=tc.get("tokenizer"),
        cache_dir=tc.get("cache_dir"),
        doc_separator=tc.get("doc_separator"),
        text_field=tc.get("text_field", "text"),
    )
    return (train if split == "train" else val), f"{text_file} ({split} split)"


def run_eval(
    model_path: str,
    text_file: str | None = None,
    *,
    split: str = "all",
    seq_len: int | None = None,
    stride: int | None = None,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    modulation_scale: float | None = None,
    amp: bool = True,
    device: str = "auto",
) -> EvalResult:
    # the flags are checked before the checkpoint loads; None means "the training run's value", never 0
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("stride", stride)):
        if value is not None and value < 1:
            raise UserError(f"--{name} must be at least 1, got {value}")
    if max_tokens is not None and max_tokens < 0:
        raise UserError(f"--max_tokens must be >= 0 (0 = all of them), got {max_tokens}")
    if modulation_scale is not None and not math.isfinite(modulation_scale):
        raise UserError(f"--modulation_scale must be a finite number, got {modulation_scale}")
    torch_device = resolve_device(device)
    model, tokenizer, ckpt = load_model_and_tokenizer(model_path, torch_device)
    train_config = ckpt.get("train_config") or {}
    if seq_len is None:
        seq_len = train_config.get("seq_len") or model.config.max_seq_len
    if batch_size is None:
        batch_size = train_config.get("batch_size") or 32
    tokens, source = select_tokens(ckpt, tokenizer, text_file, split, max_tokens)
    result = evaluate_tokens(
        model,
        tokens,
        seq_len=seq_len,
        stride=stride,
        batch_size=batch_size,
        modulation_scale=modulation_scale,
        amp_dtype=autocast_dtype(torch_device, amp),
        tokenizer=tokenizer,
    )
    stride = seq_len if stride is None else stride
    skipped = len(tokens) - 1 - result.tokens
    print(
        f"{source}: {len(tokens):,} tokens; scored {result.tokens:,} ({result.bytes:,} bytes) in {result.windows:,} "
        f"windows of {seq_len} at stride {stride}"
        + (f"; the last {skipped} fill no window" if skipped else "")
    )
    print(
        f"Loss: {result.loss:.4f} | Perplexity: {result.perplexity:.2f} | Bits per byte: {result.bits_per_byte:.4f}"
        f" | {result.tokens_per_second:,.0f} tokens/s"
    )
    return result
