"""The training loss: next-token cross-entropy straight from the final hidden states, in chunks of tokens, so the
(tokens x vocab) logits never exist all at once.

With GPT-2's 50,260-token vocabulary the LM head dominates a small model: at batch 16 x 128 its fp32 logits are
412 MB, and autograd keeps them, their log-softmax and its gradient alive together. Here each chunk of n tokens
computes its logits ``h W^T`` (in the autocast dtype), one softmax, the loss from the targets' probabilities, and
at once the gradients ``dh = (softmax - onehot) W`` and ``dW += (softmax - onehot)^T h``; backward then only
scales what was stored. Same three matmuls as autograd's, one chunk of logits in memory.

Without gradients (training's validation, `hilt eval`), ``HeadLoss`` gives the exact loss: one matmul and an fp32
log-softmax per chunk, summed in float64, in buffers kept for a whole pass over the data.
"""

from __future__ import annotations

import torch
from torch import nn

from hilt import memory
from hilt.model import HierarchicalTransformer, linear

# Logits per chunk at most (128 MB in fp32; 512 tokens of GPT-2's vocabulary). Larger chunks run a little faster
# (each chunk pays a (V x C) weight-gradient conversion and add), smaller ones use less memory: this size keeps
# a default train.py run (batch 32 x 128) under 2 GB peak RSS (benchmarks/bench.py measures it).
CHUNK_ELEMENTS = 2**25

# Logits per chunk of the exact loss without gradients (16 MB in fp32; 83 tokens of GPT-2's vocabulary). Its
# buffers then stay under glibc's 32 MB ceiling for mapping a block afresh, so a new HeadLoss (one per evaluation
# pass) reuses heap memory instead of page-faulting 200 MB in; nor does the log-softmax's temporary get mapped at
# every call. A 2,048-token bf16 batch of a 64-wide model, one new HeadLoss per batch: 115-117 -> 54-60 ms and
# 49,000 -> 0 page faults; with the HeadLoss reused, 55-62 vs 54-55 ms (2 threads; docs/performance.md).
EVAL_CHUNK_ELEMENTS = 2**22


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


class HeadLoss:
    """The exact next-token loss, without gradients: what training's validation and `hilt eval` report. Summed over
    final hidden states under the LM head ``weight`` (V, C): logits ``h W^T`` in the compute ``dtype``, an exact
    fp32 log-softmax per token, summed in float64, one chunk of at most ``chunk_elements`` logits at a time. The
    weight in the compute dtype and the logits buffers are made once and reused for every call: a fresh
    vocabulary-sized tensor per batch costs a page fault per 4 KB. Make one per pass over the data (the weight is
    a snapshot); its buffers are freed with it."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, chunk_elements: int = EVAL_CHUNK_ELEMENTS):
        self.weight = weight.detach().to(dtype)  # (V, C)
        self.chunk = max(1, chunk_elements // weight.size(0))
        # on CPU the head goes through oneDNN with the weight packed once (hilt.model.linear.onednn_packed: fp32 2.7-4x
        # faster than torch's matmul on AMD CPUs, bf16 1.1-1.3x); its logits come in a new tensor each chunk
        # (heap memory at this size, reused), so only torch's matmul elsewhere writes into a kept buffer
        self.packed = linear.onednn_packed(self.weight, rows=self.chunk)
        if self.packed is not None:
            # those new blocks would otherwise come and go as fresh mappings in a process that has not freed a
            # larger one yet (a fresh `hilt eval`: fp32, 64-wide, 61% of wall time in page faults, 6.4M of them);
            # process-wide, as the engine does, and what glibc's own adjustment reaches anyway
            memory.large_blocks_from_the_heap()
        self.rows = 0
        self.logits = self.fp32 = None

    def _grow(self, rows: int) -> None:
        # as many rows as a call needs, up to a chunk (a tiny vocabulary would otherwise get 2**25-element buffers)
        self.rows = rows
        V, device = self.weight.size(0), self.weight.device
        if self.packed is None:
            self.logits = torch.empty(rows, V, dtype=self.weight.dtype, device=device)
        # the log-softmax runs in place on fp32 logits: a second buffer when the matmul gives bf16/fp16
        if self.weight.dtype != torch.float32:
            self.fp32 = torch.empty(rows, V, dtype=torch.float32, device=device)

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """hidden (N, C), targets (N,) -> sum over the N tokens of -log softmax(logits)[target], float64."""
        if self.rows < min(self.chunk, hidden.size(0)):
            self._grow(min(self.chunk, hidden.size(0)))
        h = hidden.to(self.weight.dtype)
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for start in range(0, h.size(0), self.chunk):
            h_c, t_c = h[start : start + self.chunk], targets[start : start + self.chunk]
            n = h_c.size(0)
            if self.packed is not None:
                logits = linear.onednn_linear(h_c, self.packed)  # (n, V) in the compute dtype
            else:
                logits = torch.mm(h_c, self.weight.T, out=self.logits[:n])
            x = logits if self.fp32 is None else self.fp32[:n].copy_(logits)  # (n, V) fp32
            # one kernel, row by row while the row is in cache: 2x faster than amax, exp and sum over the chunk
            log_probs = torch.log_softmax(x, dim=1, out=x)
            total -= log_probs.gather(1, t_c[:, None]).double().sum()
        return total


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Sum over tokens of -log softmax(hidden @ weight^T)[target]; hidden (N, C), weight (V, C), targets (N,)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, dtype: torch.dtype, chunk: int):
        h, w = hidden.to(dtype), weight.to(dtype)
        grad_h, grad_w = torch.empty_like(h), torch.zeros_like(w)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # fp32 on CPU: the three products through oneDNN (hilt.model.linear.OneDNNLinear's reason; a 512-token chunk
        # of the default head, 2 threads: 226 -> 146 ms). Their results come in new tensors, which training's
        # hilt.memory.freed_memory_kept serves from the heap.
        onednn = linear.onednn_fp32(h, w)
        # Elsewhere one buffer holds every chunk's logits, and the softmax overwrites them in place: a fresh 50 MB
        # tensor comes from the OS as pages that fault in on first touch, which cost more than the work itself
        # (measured per 512-token bf16 chunk on CPU: logits matmul 51 -> 37 ms, softmax 30 -> 9 ms).
        buffer = None if onednn else h.new_empty(min(chunk, h.size(0)), w.size(0))
        for start in range(0, h.size(0), chunk):
            h_c, t_c = h[start : start + chunk], targets[start : start + chunk]
            if onednn:
                logits = linear.onednn_linear(h_c, w)  # (n, V)
            else:
                logits = torch.mm(h_c, w.T, out=buffer[: h_c.size(0)])  # (n, V) in the compute dtype
            # One softmax kernel (fp32 inside, even for bf16 logits) instead of upcast + log-sum-exp + exp:
            # measured 4.8x faster per chunk, and the softmax is the gradient we need.
            probs = torch.softmax(logits, dim=-1, out=logits)
            p_target = probs.gather(1, t_c[:, None]).squeeze(1).float()
            if (p_target > torch.finfo(torch.float32).tiny).all():
                total -= p_target.log().sum()  # bf16 p: within 2**-9 nats of exact per token
            else:  # a probability too small to take its log: this chunk's loss the exact way, from new logits
                total += HeadLoss(w, dtype)(h_c, t_c).float()
            probs[torch.arange(len(t_c), device=probs.device), t_c] -= 1.0  # d loss / d logits
            if onednn:
                grad_h[start : start + chunk] = linear.onednn_linear(probs, w.t())
                grad_w += linear.weight_gradient(probs, h_c)
                del logits, probs  # before the next chunk's logits exist: one chunk in memory, not two
            else:
                grad_h[start : start + chunk] = probs @ w
                # accumulated in the compute dtype: an fp32 running sum costs a (V x C) conversion per chunk
                torch.addmm(grad_w, probs.T, h_c, out=grad_w)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        return (
            # scaled after the cast (in the wider dtype, no intermediate (V x C) tensor), on a copy: the saved
            # gradients must survive a second backward (retain_graph)
            grad_h.to(ctx.hidden_dtype, copy=True).mul_(grad_total),
            grad_w.to(ctx.weight_dtype, copy=True).mul_(grad_total),
            None,
            None,
            None,
        )


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token loss of hidden (N, C) under the LM head ``weight`` (V, C); equals
    ``F.cross_entropy(hidden @ weight.T, targets, reduction="sum")`` computed in the autocast dtype."""
    n_chunks = -(-hidden.size(0) * weight.size(0) // CHUNK_ELEMENTS)  # ceil
    chunk = -(-hidden.size(0) // n_chunks)  # equal chunks rather than a short last one
    # forward computes the gradients too, so it must know here whether anyone will ask (needs_input_grad inside
    # forward stays True under no_grad); nobody asks: the exact loss alone, as validation computes it
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        return HeadLoss(weight, _compute_dtype(hidden))(hidden, targets).float()
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, _compute_dtype(hidden), chunk)


class LanguageModelLoss(nn.Module):
    """The model plus its loss, as one module: what the trainer calls (and what DDP wraps, since DDP only syncs
    gradients for work done inside a wrapped module's forward)."""

    def __init__(self, model: HierarchicalTransformer):
        super().__init__()
        self.model = model

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor,
        modulation_scale: float | None = None,
        reduction: str = "mean",
        *,
        progress: float | None = None,
    ) -> torch.Tensor:
        hidden = self.model.features(idx, modulation_scale, progress=progress)  # (B, T, C)
        total = chunked_cross_entropy(hidden.flatten(0, 1), self.model.head.weight, targets.flatten())
        return total / targets.numel() if reduction == "mean" else total
