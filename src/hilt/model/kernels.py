"""CPU speed paths for the reference layers of ``layers.py``: the same maths, measured faster on CPU.

``transformer.py`` is the reference and reads without this file. The model picks these when it is built,
``HierarchicalTransformer(config, cpu_kernels=True)`` (the default; ``cpu_kernels=False`` builds the reference; see
``Paths``), and ``tests/test_kernels.py`` checks every path against the reference, forward and backward. The numbers quoted
at each choice are medians from the benchmarks named there; the full tables are in docs/performance.md.

    CheapDropout            dropout with a 16-bit keep-mask              training, CPU
    pair_attention          closed-form attention over two positions     an ILT's window of 2, no cache
    explicit_attention      softmax(q k^T) v as two batched matmuls      ILT windows; short bf16 training sequences
    decode_attention        one query per row over a cache, in fp32      the engine's batched bf16 decoding step
    linear.py               the linear layers on oneDNN (OneDNNLinear, MixedDtypeLinear, onednn_packed)
    depth_mix               the depth kinds' mixing, one fused backward  training the depth kinds, CPU
    greedy_tokens           argmax over the vocabulary in chunks         greedy decoding (generate, the engine)

This module imports only torch, so an exported model folder can carry it beside the model.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .linear import OneDNNLinear

# --- dropout -------------------------------------------------------------------------------------------------


class CheapDropout(nn.Dropout):
    """nn.Dropout with a cheaper keep-mask on CPU, where the random numbers are most of dropout's cost (a default
    model runs 48 dropouts per training step). torch's CPU dropout makes one Mersenne-Twister draw per element;
    here each 64-bit draw gives four 16-bit uniforms (524,288 elements: mask 3.1 -> 0.7 ms; the whole step -5%).
    p is rounded to a multiple of 1/65536 and the scale follows it, so the expected output still equals the input.
    The mask is written straight into x's dtype: torch casts a bool mask element by element at every multiply
    (0.5M bf16 values: x * bool 352 us, x * bf16 55 us). Elsewhere (CUDA) torch's fused kernel stays."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.p):
            return x  # evaluation and decoding: not even a call into torch
        if x.device.type != "cpu":
            return super().forward(x)
        n, dropped = x.numel(), round(self.p * 65536)  # dropped of every 65536 16-bit values
        bits = torch.randint(-(2**63), 2**63 - 1, (-(-n // 4),), dtype=torch.int64, device=x.device)
        keep = torch.ge(bits.view(torch.int16)[:n].view(x.shape), dropped - 32768, out=torch.empty_like(x))
        # the scale as a Python float: a scaled mask would round 1 / (1 - p) to x's dtype (bf16: 1.1094, not 1.1111)
        return torch.mul(x, keep).mul_(65536 / (65536 - dropped))


# --- attention -----------------------------------------------------------------------------------------------
# Every kernel takes the fused projection qkv (B, T, 3C), the head count and the attention-weight dropout
# probability (0 outside training), and returns the heads' outputs joined again, (B, T, C): what the reference
# MultiHeadAttention.attend returns for a causal sequence without cache or mask.

Kernel = Callable[[torch.Tensor, int, float], torch.Tensor]

# torch's CPU flash-attention backward is slow on short bf16 sequences: fwd + bwd at B16 x H8 x T128 x D32 took
# 24 ms against 8 ms for the explicit softmax(q k^T) v, while from T = 256 on flash wins (and needs no T x T
# weights). fp32 flash wins at every length.
EXPLICIT_ATTENTION_MAX_LEN = 128


def attention_kernel(qkv: torch.Tensor, short: bool, plain_causal: bool) -> Kernel | None:
    """The speed path for this attention call, or None for the reference (SDPA). ``short``: an ILT's window of
    layers, where SDPA's per-call overhead dominates. ``plain_causal``: no cache and no caller's mask."""
    if not plain_causal or qkv.device.type != "cpu":
        return None
    T = qkv.size(1)
    if short and T == 2:
        return pair_attention  # an ILT's default window: elementwise ops, no 2 x 2 softmax (-1% a step)
    if short:
        return explicit_attention  # longer ILT windows: two tiny batched matmuls, no SDPA set-up per call
    short_bf16_training = (
        qkv.dtype in (torch.bfloat16, torch.float16)
        and torch.is_grad_enabled()
        and T <= EXPLICIT_ATTENTION_MAX_LEN
    )
    return explicit_attention if short_bf16_training else None  # -6% a default bf16 step (batch 16 x 128)


def _heads(qkv: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T, C3 = qkv.shape
    C = C3 // 3
    return tuple(
        t.view(B, T, n_heads, C // n_heads).transpose(1, 2) for t in qkv.split(C, dim=2)
    )  # (B, H, T, D)


def causal_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The causal softmax attention weights (B, H, T, T) of queries/keys (B, H, T, D); rows are queries."""
    scores = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5
    return scores.masked_fill(_future_mask(q.size(-2), q.device), float("-inf")).softmax(dim=-1)


def explicit_attention(qkv: torch.Tensor, n_heads: int, dropout_p: float) -> torch.Tensor:
    B, T, _ = qkv.shape
    q, k, v = _heads(qkv, n_heads)
    weights = (
        F.dropout(causal_weights(q, k), dropout_p) if dropout_p else causal_weights(q, k)
    )  # (B, H, T, T)
    return (weights @ v).transpose(1, 2).reshape(B, T, -1)


def pair_attention(qkv: torch.Tensor, n_heads: int, dropout_p: float) -> torch.Tensor:
    """Causal attention over exactly two positions, in closed form: position 0 sees only itself (weight 1), and
    position 1's softmax over two scores is a sigmoid of their difference. q, k, v stay (B, 2, H, D) views of
    qkv, so nothing is transposed or copied."""
    B, T, C3 = qkv.shape
    q, k, v = qkv.view(B, T, 3, n_heads, C3 // (3 * n_heads)).unbind(2)  # each (B, 2, H, D)
    q1, (k0, k1), (v0, v1) = q[:, 1], k.unbind(1), v.unbind(1)  # each (B, H, D)
    score_gap = (q1 * (k1 - k0)).sum(-1, keepdim=True) * q.size(-1) ** -0.5  # (B, H, 1): s11 - s10
    a = torch.sigmoid(score_gap)  # query 1's weight on v1
    if not dropout_p:
        y = torch.stack([v0, torch.lerp(v0, v1, a)], dim=1)
    else:
        # dropout on the three non-zero weights (1; 1 - a, a), as F.dropout would drop them in the 2 x 2 matrix
        keep = F.dropout(q.new_ones(*a.shape[:-1], 3), dropout_p)  # (B, H, 3): 0 or 1 / (1 - p)
        y0 = v0 * keep[..., 0:1]
        y1 = v0 * ((1 - a) * keep[..., 1:2]) + v1 * (a * keep[..., 2:3])
        y = torch.stack([y0, y1], dim=1)
    return y.reshape(B, T, C3 // 3)


def _future_mask(T: int, device: torch.device) -> torch.Tensor:
    """(T, T) True above the diagonal: what a causal query must not see."""
    if torch.compiler.is_compiling():  # a compiled graph bakes it in; the cache below would only warn there
        return torch.ones(T, T, dtype=torch.bool, device=device).triu(diagonal=1)
    return _cached_future_mask(T, device)


@functools.cache
def _cached_future_mask(T: int, device: torch.device) -> torch.Tensor:
    # eager decoding asks for the same tiny mask for every ILT layer at every token. Made outside inference mode
    # whoever asks first: an inference tensor cannot be saved for a later training step's backward.
    with torch.inference_mode(False):
        return torch.ones(T, T, dtype=torch.bool, device=device).triu(diagonal=1)


# --- decoding attention --------------------------------------------------------------------------------------
# The engine's batched decoding step: each row's one new query over the keys its own cache holds, with a mask
# that hides the other rows' longer tails. These kernels take q (B, H, 1, D), k and v (B, H, S, D) after the
# cache's update and the mask (B, 1, 1, S), True where a query may attend, and return (B, H, 1, D).
# hilt.generation.decoding's lowered copy (the bf16 weights generation decodes with) is where they are used.

DecodeKernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def decode_attention_kernel(q: torch.Tensor, attn_mask: torch.Tensor | None) -> DecodeKernel | None:
    """The speed path for attention with a cache, or None for the reference (SDPA): one new token per row, a
    caller's boolean mask, bf16/fp16 on CPU."""
    one_query_masked = q.size(-2) == 1 and attn_mask is not None and attn_mask.dtype == torch.bool
    if not one_query_masked or q.device.type != "cpu" or q.dtype not in (torch.bfloat16, torch.float16):
        return None  # fp32: SDPA is as fast (16 rows x 400 keys: 0.93 vs 0.97 ms)
    # bf16, 8 heads of 32, one thread: 16 rows x 400 keys 3.16 -> 1.47 ms; 4 x 300 0.54 -> 0.19; 64 x 300
    # 12.3 -> 8.8 (`git show ab15cea:benchmarks/decode_attention_bench.py`; a 16-row decoding step of the
    # default model 54 -> 40 ms)
    return decode_attention


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D), masked) v for one query per row, computed in fp32 and rounded once at the end.

    torch's CPU SDPA is slow on one bf16 query per row (40-50% of a 16-row decoding step); two fp32 batched
    matrix-vector products, casts of k and v included, take half its time or less. fp32 is also what SDPA
    accumulates in, so the two differ by rounding only. A row whose mask hides every key would give NaN; the
    engine's rows always see at least their own new key."""
    D = q.size(-1)
    scores = q.float() @ k.float().transpose(-2, -1) * D**-0.5  # (B, H, 1, S)
    weights = scores.masked_fill_(attn_mask.logical_not(), float("-inf")).softmax(dim=-1)
    return (weights @ v.float()).to(q.dtype)  # (B, H, 1, D)


# --- the depth kinds' mixing -------------------------------------------------------------------------------


class _DepthMix(torch.autograd.Function):
    """DepthAttentionILT's mixing over N = B·T rows with a hand-written backward. Autograd's backward of the
    reference goes through per-token batched matmuls of shape (1 x C) @ (C x S) and broadcast products, tens
    of tiny calls per module; here each gradient is one or two passes over the stacked sources.

        a = softmax_s(q · k_s / sqrt(r))                                    q (N, w, r), k (N, S, r)
        out = gate ⊙ Σ_s a_s x_s + Σ_s static_s ⊙ x_s                         x (N, S, C) -> out (N, w, C)
    """

    @staticmethod
    def forward(ctx, q, k, x, gate, static):
        a = torch.bmm(q, k.transpose(1, 2)).mul_(q.size(-1) ** -0.5).softmax(dim=-1)  # (N, w, S)
        dynamic = torch.bmm(a, x)  # (N, w, C)
        out = dynamic * gate
        for w in range(static.size(0)):
            out[:, w] += (x * static[w]).sum(dim=1)
        ctx.save_for_backward(q, k, x, gate, static, a, dynamic)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, x, gate, static, a, dynamic = ctx.saved_tensors
        grad_gate = (grad * dynamic).sum(dim=0)  # (w, C)
        grad_dynamic = grad * gate  # (N, w, C)
        grad_static, grad_a, grad_x = torch.empty_like(static), torch.empty_like(a), None
        for w in range(static.size(0)):
            g, g_dynamic = grad[:, w].unsqueeze(1), grad_dynamic[:, w].unsqueeze(1)  # (N, 1, C)
            g_x = g * x  # (N, S, C): both the static weights' and the attention's gradient read it
            grad_static[w] = g_x.sum(dim=0)
            grad_a[:, w] = g_x @ gate[w]  # Σ_c g ⊙ gate ⊙ x
            term = a[:, w].unsqueeze(-1) * g_dynamic + static[w] * g  # (N, S, C)
            grad_x = term if grad_x is None else grad_x.add_(term)
        # through the softmax, then the scaled dot products
        grad_logits = a * (grad_a - (grad_a * a).sum(dim=-1, keepdim=True)) * q.size(-1) ** -0.5  # (N, w, S)
        grad_q = torch.bmm(grad_logits, k)  # (N, w, r)
        grad_k = (grad_logits.unsqueeze(-1) * q.unsqueeze(2)).sum(dim=1)  # (N, S, r)
        return grad_q, grad_k, grad_x, grad_gate, grad_static


def depth_mix(
    q: torch.Tensor,
    keys: list[torch.Tensor],
    sources: list[torch.Tensor],
    gate: torch.Tensor,
    static: torch.Tensor,
) -> torch.Tensor:
    """DepthAttentionILT's modulation (B, T, w, C) from its queries q (B, T, w, r), the sources' keys (S of
    (B, T, r)), the sources (S of (B, T, C)) and its gate (w, C) and static weights (w, S, C). Computed in the
    parameters' dtype (fp32 under autocast too: the weights over S <= n_layers + 1 sources are few; the
    sources are the fp32 residual stream's). Training only: decoding keeps the reference, which has no backward
    to pay for. The depth kind's training step against plain's (benchmarks/ablation.py --step_times, one thread):
    1.32x -> 1.26x at d_model 128 / 4 layers in fp32, 1.29x -> 1.10x at bench.py's model in bf16 (docs/performance.md)."""
    B, T, W, r = q.shape
    dtype = static.dtype
    with torch.autocast(q.device.type, enabled=False):
        k = torch.stack(keys, dim=2).to(dtype).view(B * T, -1, r)
        x = torch.stack(sources, dim=2).to(dtype).view(B * T, len(sources), -1)
        out = _DepthMix.apply(q.to(dtype).reshape(B * T, W, r), k, x, gate, static)
    return out.view(B, T, W, -1)


# --- greedy decoding -----------------------------------------------------------------------------------------


_GREEDY_CHUNK = 128


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` for (B, V) fp32 logits on CPU, ties and all: the first index of each row's maximum.

    torch's CPU argmax is a scalar loop carrying an index (16 x 50,260 logits: 0.66 ms, a greedy decoding step's
    largest single operator after the LM head). Here a vectorised ``amax`` finds each row's first chunk of 128
    holding the maximum, and argmax runs over that chunk only (0.11 ms; 64 rows 2.7 -> 0.36 ms, one thread)."""
    B, V = logits.shape
    n = V // _GREEDY_CHUNK
    if logits.device.type != "cpu" or logits.dtype != torch.float32 or n < 2:
        return logits.argmax(dim=-1)
    maxima = logits[:, : n * _GREEDY_CHUNK].unflatten(1, (n, _GREEDY_CHUNK)).amax(dim=-1)  # (B, n)
    if n * _GREEDY_CHUNK < V:
        maxima = torch.cat([maxima, logits[:, n * _GREEDY_CHUNK :].amax(dim=-1, keepdim=True)], dim=1)
    first = maxima.argmax(dim=-1, keepdim=True)  # (B, 1): the first chunk reaching the row's maximum
    # the last chunk may be short: its indices past V - 1 repeat V - 1, after it, so they never come first
    index = (first * _GREEDY_CHUNK + torch.arange(_GREEDY_CHUNK)).clamp_max_(V - 1)  # (B, chunk)
    return index.gather(1, logits.gather(1, index).argmax(dim=-1, keepdim=True)).squeeze(1)


# --- what the model builds ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Paths:
    """Which modules a model builds, chosen once when it is built: nothing changes a module's class afterwards.

    ``kernels`` turns on the attention kernels above and the depth kind's fused mixing; ``linear`` and ``dropout``
    are the classes of every Linear and Dropout in the model; ``layer``, ``attention`` and ``ilts`` (kind ->
    class) replace the reference's classes where set (a decoding copy's, ``hilt.generation.decoding``)."""

    kernels: bool
    linear: type[nn.Linear] = nn.Linear
    dropout: type[nn.Dropout] = nn.Dropout
    layer: type[nn.Module] | None = None
    attention: type[nn.Module] | None = None
    ilts: Mapping[str, type[nn.Module]] = field(default_factory=dict)


REFERENCE = Paths(kernels=False)
CPU_KERNELS = Paths(kernels=True, linear=OneDNNLinear, dropout=CheapDropout)


def paths_for(cpu_kernels: bool | Paths) -> Paths:
    """``HierarchicalTransformer``'s ``cpu_kernels`` argument as ``Paths``: True (the default) the speed paths,
    False the reference, or ``Paths`` as they are."""
    if isinstance(cpu_kernels, Paths):
        return cpu_kernels
    return CPU_KERNELS if cpu_kernels else REFERENCE
