"""The pieces of the model's layers, read bottom-up: positions -> attention -> feed-forward -> layer. The main layers
and the design ILT's inner layers are the same ``TransformerLayer``.

Shape legend: B batch, T tokens in this call, S tokens attended to (cache + new), C d_model,
H heads, D head size (C // H).

This module imports only torch: the export copies it beside the model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .kernels import Paths
from .kv_cache import KVCache

# --- pieces --------------------------------------------------------------------------------------------------


class PositionalEncoding(nn.Module):
    """Fixed sinusoidal positions (Vaswani et al.), precomputed up to max_seq_len."""

    def __init__(self, d_model: int, max_seq_len: int = 1024):
        super().__init__()
        position = torch.arange(max_seq_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_seq_len, d_model)
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term[: d_model // 2])
        # not a parameter and not saved: it is a pure function of the config
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, start: int, length: int) -> torch.Tensor:
        if start + length > self.pe.size(0):
            raise ValueError(
                f"positions {start}..{start + length - 1} exceed max_seq_len {self.pe.size(0)}; "
                "crop the input or use a sliding window"
            )
        return self.pe[start : start + length]  # (T, C)

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        """Each row's own positions (B, T) -> their encodings (B, T, C): left-padded rows, or rows whose caches
        hold different lengths."""
        if positions.numel() and int(positions.max()) >= self.pe.size(0):
            raise ValueError(
                f"position {int(positions.max())} exceeds max_seq_len {self.pe.size(0)}; "
                "crop the input or use a sliding window"
            )
        return self.pe[positions]


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention through torch's fused SDPA kernel, with an optional KV cache.

    ``short=True`` marks an ILT's attention over its window of layers, which keeps the design's dropout on the
    attention weights; the main layers drop out on the residual branch only (with dropout_p > 0 torch's CPU SDPA
    falls back to its unfused path and keeps every T x T weight matrix for backward: peak RSS of a default run
    2.72 -> 2.36 GB without it).
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        dropout: float,
        short: bool = False,
        paths: Paths = kernels.REFERENCE,
    ):
        super().__init__()
        self.n_heads = n_heads
        self.short = short
        self.qkv = paths.linear(d_model, 3 * d_model)  # one fused projection for q, k and v
        self.proj = paths.linear(d_model, d_model)
        self.dropout = dropout
        self.resid_dropout = paths.dropout(dropout)
        self.cpu_kernels = paths.kernels

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer_idx: int = 0,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        y = self.attention(self.qkv(x), cache, layer_idx, attn_mask)  # (B, T, C)
        return self.resid_dropout(self.proj(y))

    def attention(
        self,
        qkv: torch.Tensor,
        cache: KVCache | None,
        layer_idx: int,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The fused projection qkv (B, T, 3C) -> the heads' outputs joined (B, T, C): a CPU speed path with the
        same maths where one fits (kernels.py), else the reference ``attend``."""
        attn_dropout = self.dropout if self.short and self.training else 0.0
        plain_causal = cache is None and attn_mask is None
        kernel = kernels.attention_kernel(qkv, self.short, plain_causal) if self.cpu_kernels else None
        if kernel is not None:
            return kernel(qkv, self.n_heads, attn_dropout)
        return self.attend(qkv, cache, layer_idx, attn_mask, attn_dropout)

    def attend(
        self,
        qkv: torch.Tensor,
        cache: KVCache | None,
        layer_idx: int,
        attn_mask: torch.Tensor | None,
        attn_dropout: float,
    ) -> torch.Tensor:
        """The reference attention: qkv (B, T, 3C) -> the heads' outputs joined (B, T, C)."""
        B, T, C3 = qkv.shape
        C, H = C3 // 3, self.n_heads
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in qkv.split(C, dim=2))  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # (B, H, S, D): everything seen so far
            if k.dtype != q.dtype:  # a cache may keep keys wider than the queries: attend in its dtype
                q = q.to(k.dtype)
        S = k.size(2)
        is_causal = attn_mask is None and S > 1
        if attn_mask is None and S != T:
            # SDPA's is_causal aligns the mask top-left; T new queries after S - T cached keys need it
            # bottom-right: query i sees keys 0 .. S - T + i.
            is_causal = False
            if T > 1:
                attn_mask = torch.ones(T, S, dtype=torch.bool, device=qkv.device).tril(diagonal=S - T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask, attn_dropout, is_causal=is_causal)
        y = y.transpose(1, 2).reshape(B, T, C)
        return y if y.dtype == qkv.dtype else y.to(qkv.dtype)


class FeedForward(nn.Module):
    """Position-wise MLP: Linear -> GELU -> Linear, with dropout."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, paths: Paths = kernels.REFERENCE):
        super().__init__()
        self.fc = paths.linear(d_model, d_ff)
        self.proj = paths.linear(d_ff, d_model)
        self.dropout = paths.dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(ln(x)), then x + ff(ln(x)). Causal over the sequence axis,
    which for an ILT is the axis of layers."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float,
        short: bool = False,
        paths: Paths = kernels.REFERENCE,
    ):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = (paths.attention or MultiHeadAttention)(d_model, n_heads, dropout, short, paths)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, d_ff, dropout, paths)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer_idx: int = 0,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, layer_idx, attn_mask)
        return x + self.ff(self.ln2(x))


def layer_class(paths: Paths) -> type[TransformerLayer]:
    """The class of the main layers and of the design ILT's inner layers under ``paths``."""
    return paths.layer or TransformerLayer
