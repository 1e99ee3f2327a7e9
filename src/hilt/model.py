"""The Hierarchical Transformer: a decoder-only transformer whose consecutive layers are mixed by small
Inter-Layer Transformers (ILTs).

Read bottom-up: positions -> attention -> feed-forward -> layer -> ILT -> whole model.

Shape legend: B batch, T tokens in this call, S tokens attended to (cache + new), C d_model,
H heads, D head size (C // H), W layer window of an ILT, E ilt_dim, V vocab_size.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from hilt.kv_cache import KVCache

# --- the design's ILT constants (defaults of ModelConfig; every one is a CLI flag too) -----------------------
ILT_DIM = 128
NHEAD_ILT = 2
N_LAYERS_ILT = 2
ILT_DROPOUT = 0.1
ILT_WINDOW = 2
MODULATION_SCALE_START = 0.01
MODULATION_SCALE_END = 0.1

DROPOUT = 0.1


@dataclass(kw_only=True)
class ModelConfig:
    """Everything needed to rebuild a model; saved inside every checkpoint."""

    vocab_size: int
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 8
    d_ff: int | None = None  # None -> 4 * d_model
    dropout: float = DROPOUT
    max_seq_len: int = 1024
    tie_weights: bool = True
    n_layers_ilt: int = N_LAYERS_ILT  # 0 -> plain transformer, no ILT parameters at all
    ilt_dim: int = ILT_DIM
    nhead_ilt: int = NHEAD_ILT
    ilt_dropout: float = ILT_DROPOUT
    ilt_window: int = ILT_WINDOW  # how many of the latest layer outputs an ILT sees
    # the curriculum: training ramps modulation_scale from start to end; evaluation and generation use end
    modulation_scale_start: float = MODULATION_SCALE_START
    modulation_scale_end: float = MODULATION_SCALE_END
    # ILT variants compared in benchmarks/ablation.py; all off = the design's ILT
    ilt_zero_init: bool = (
        False  # zero the ILTs' output projection: training starts from an exact plain transformer
    )
    ilt_gate: bool = False  # a learned scale per ILT (from modulation_scale_start) replaces the curriculum
    ilt_embed: bool = False  # each ILT also sees the token embedding, first in its layer window

    def __post_init__(self) -> None:
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        positive = (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "d_ff",
            "max_seq_len",
            "ilt_dim",
            "nhead_ilt",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.n_layers_ilt < 0:
            raise ValueError(f"ModelConfig.n_layers_ilt must be >= 0, got {self.n_layers_ilt}")
        if self.ilt_window < 2:
            raise ValueError(
                f"ModelConfig.ilt_window must be >= 2 (previous + current layer), got {self.ilt_window}"
            )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.ilt_dim % self.nhead_ilt:
            raise ValueError(
                f"ModelConfig.ilt_dim ({self.ilt_dim}) must be divisible by nhead_ilt ({self.nhead_ilt})"
            )
        for name in ("dropout", "ilt_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ModelConfig.{name} must be in [0, 1), got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {', '.join(unknown)}")
        return cls(**values)


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


class Dropout(nn.Dropout):
    """nn.Dropout with a cheaper keep-mask on CPU, where the random numbers are most of dropout's cost (a default
    model runs 48 dropouts per training step). torch's CPU dropout makes one Mersenne-Twister draw per element
    (bernoulli_); here each 64-bit draw gives four 16-bit uniforms (measured on 524,288 elements: mask 3.1 ->
    0.7 ms; the whole step -5%). p is rounded to a multiple of 1/65536 and the scale follows it, so the expected
    output still equals the input. The comparison writes the mask straight into a tensor of x's dtype: a bool mask
    is slow to multiply with (torch casts it element by element; 0.5M bf16 values: x * bool 352 us, x * bf16 55
    us, and the bf16 compare 66 us against 129 for the bool one), and the backward reuses the same mask. Elsewhere
    (CUDA) torch's fused kernel stays."""

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


def _future_mask(T: int, device: torch.device) -> torch.Tensor:
    """(T, T) True above the diagonal: what a causal query must not see."""
    if torch.compiler.is_compiling():  # a compiled graph bakes it in; the cache below would only warn there
        return torch.ones(T, T, dtype=torch.bool, device=device).triu(diagonal=1)
    return _cached_future_mask(T, device)


@functools.cache
def _cached_future_mask(T: int, device: torch.device) -> torch.Tensor:
    # eager decoding asks for the same tiny mask for every ILT layer at every token
    return torch.ones(T, T, dtype=torch.bool, device=device).triu(diagonal=1)


# torch's CPU flash-attention backward is slow on short bf16 sequences: fwd + bwd at B16 x H8 x T128 x D32 took
# 24 ms against 8 ms for the explicit softmax(q k^T) v, while from T = 256 on flash wins (and needs no T x T
# weights). fp32 flash wins at every length.
EXPLICIT_ATTENTION_MAX_LEN = 128


def _explicit_attention_is_faster(q: torch.Tensor) -> bool:
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.bfloat16, torch.float16)
        and torch.is_grad_enabled()
        and q.size(-2) <= EXPLICIT_ATTENTION_MAX_LEN
    )


class Linear(nn.Linear):
    """nn.Linear that also runs with weights narrower than its input, computing in the weights' dtype as autocast
    would: generation keeps bf16 copies of the matrices (``hilt.generate``) while the residual stream, the norms
    and the embedding stay fp32, so decoding computes what bf16 training computed without casting every weight
    at every token."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.weight.dtype)
        return F.linear(x, self.weight, self.bias)


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention through torch's fused SDPA kernel, with an optional KV cache.

    ``short=True`` is for sequences of a handful of positions (an ILT's window of layers), where SDPA's
    per-problem overhead dominates: a window of two is attended in closed form (``causal_pair_attention``),
    longer ones by two small batched matmuls and a softmax. The main layers take that explicit path too for short
    bf16 sequences in CPU training (``EXPLICIT_ATTENTION_MAX_LEN``).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float, short: bool = False):
        super().__init__()
        self.n_heads = n_heads
        self.short = short
        self.qkv = Linear(d_model, 3 * d_model)  # one fused projection for q, k and v
        self.proj = Linear(d_model, d_model)
        self.dropout = dropout
        self.resid_dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer_idx: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        H = self.n_heads
        qkv = self.qkv(x)
        if self.short and T == 2 and cache is None:
            # q, k, v as (B, T, H, D) views and the result in that layout too: no transposes, no copies
            y = self.causal_pair_attention(*qkv.view(B, T, 3, H, C // H).unbind(2))
            return self.resid_dropout(self.proj(y.reshape(B, T, C)))
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in qkv.split(C, dim=2))  # (B, H, T, D)
        if cache is None and (self.short or _explicit_attention_is_faster(q)):
            weights = self.causal_weights(q, k)  # (B, H, T, T)
            if self.short:  # the ILTs keep the design's dropout on attention weights (main layers: see below)
                weights = F.dropout(weights, self.dropout, self.training)
            y = (weights @ v).transpose(1, 2).reshape(B, T, C)
            return self.resid_dropout(self.proj(y))
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # (B, H, S, D): everything seen so far
        S = k.size(2)
        mask, is_causal = None, S > 1
        if S != T:
            # SDPA's is_causal aligns the mask top-left; T new queries after S - T cached keys need it
            # bottom-right: query i sees keys 0 .. S - T + i.
            is_causal = False
            if T > 1:
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=S - T)
        # No dropout on the attention weights (dropout stays on the residual branch): with dropout_p > 0 torch's
        # CPU SDPA falls back to its unfused path and keeps every (T x T) weight matrix for backward (measured:
        # peak RSS of a default run 2.72 -> 2.36 GB).
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.proj(y))

    def causal_pair_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention over exactly two positions (an ILT's default window), in closed form: position 0 sees
        only itself (weight 1), and position 1's softmax over two scores is a sigmoid of their difference.
        q, k, v and the result are (B, 2, H, D). The same as ``causal_weights`` applied to v (dropout included)
        in a few elementwise ops, where the generic path pays for a softmax over rows of two and batched 2 x 2
        matmuls."""
        q1, (k0, k1), (v0, v1) = q[:, 1], k.unbind(1), v.unbind(1)  # each (B, H, D)
        score_gap = (q1 * (k1 - k0)).sum(-1, keepdim=True) * q.size(-1) ** -0.5  # (B, H, 1): s11 - s10
        a = torch.sigmoid(score_gap)  # query 1's weight on v1
        if not (self.training and self.dropout):
            return torch.stack([v0, torch.lerp(v0, v1, a)], dim=1)
        # dropout on the three non-zero weights (1; 1 - a, a), as F.dropout would drop them in the 2 x 2 matrix
        keep = F.dropout(q.new_ones(*a.shape[:-1], 3), self.dropout)  # (B, H, 3): 0 or 1 / (1 - p)
        y0 = v0 * keep[..., 0:1]
        y1 = v0 * ((1 - a) * keep[..., 1:2]) + v1 * (a * keep[..., 2:3])
        return torch.stack([y0, y1], dim=1)

    @staticmethod
    def causal_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The causal softmax attention weights (B, H, T, T) of queries/keys (B, H, T, D); rows are queries."""
        scores = q @ k.transpose(-2, -1) * q.size(-1) ** -0.5
        return scores.masked_fill(_future_mask(q.size(-2), q.device), float("-inf")).softmax(dim=-1)


class FeedForward(nn.Module):
    """Position-wise MLP: Linear -> GELU -> Linear, with dropout."""

    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.fc = Linear(d_model, d_ff)
        self.proj = Linear(d_ff, d_model)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(ln(x)), then x + ff(ln(x)). Causal over the sequence axis,
    which for an ILT is the axis of layers."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, short: bool = False):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, n_heads, dropout, short)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, d_ff, dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer_idx: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, layer_idx)
        return x + self.ff(self.ln2(x))


# --- the new idea --------------------------------------------------------------------------------------------


class InterLayerTransformer(nn.Module):
    """Mixes the latest main-layer outputs at each token position into a modulation of the current one.

    For every token position independently (positions are never mixed, so a KV cache stays exact)::

        h_prev (B,T,C) ──┐                     "layer sequence" of length W (default 2)
                         ├─ stack ─> (B·T, W, C) ─> Linear C→E ─> LayerNorm
        h_cur  (B,T,C) ──┘                          │
                                                    ▼
                          N_LAYERS_ILT x TransformerLayer(E, NHEAD_ILT), causal over layers:
                          h_cur attends to h_prev and itself, h_prev only to itself
                                                    │
                                                    ▼
                          dropout ─> mean over W ─> Linear E→C ─> modulation (B,T,C)

        h_cur' = h_cur + modulation_scale * modulation        (done by the caller, HierarchicalTransformer)

    ``modulation_scale`` follows a curriculum during training (small at first, so the ILTs start as a gentle
    perturbation of a plain transformer) and is held at its final value for validation and generation.

    Variants (ModelConfig flags, all off by default): ``ilt_zero_init`` zeroes Linear E→C so the model starts as
    an exact plain transformer, ``ilt_gate`` replaces modulation_scale by a learned scalar per ILT, and
    ``ilt_embed`` puts the token embedding first in the window (W + 1 rows).
    """

    def __init__(
        self,
        d_model: int,
        ilt_dim: int,
        n_heads: int,
        n_layers: int,
        dropout: float,
        gate: float | None = None,
    ):
        super().__init__()
        # the ilt_gate variant: a learned scalar that the caller uses instead of modulation_scale
        self.gate = nn.Parameter(torch.tensor(float(gate))) if gate is not None else None
        self.proj_in = Linear(d_model, ilt_dim)
        self.ln = nn.LayerNorm(ilt_dim)
        self.layers = nn.ModuleList(
            TransformerLayer(ilt_dim, n_heads, 4 * ilt_dim, dropout, short=True) for _ in range(n_layers)
        )
        self.dropout = Dropout(dropout)
        self.proj_out = Linear(ilt_dim, d_model)

    def forward(self, window: list[torch.Tensor]) -> torch.Tensor:
        """window: the latest layer outputs, oldest first, each (B, T, C). Returns the modulation (B, T, C)."""
        B, T, C = window[-1].shape
        x = torch.stack(window, dim=2).reshape(
            B * T, len(window), C
        )  # (B·T, W, C): a batch of layer sequences
        x = self.ln(self.proj_in(x))  # (B·T, W, E)
        for layer in self.layers:
            x = layer(x)
        x = self.dropout(x).mean(dim=1)  # (B·T, E)
        return self.proj_out(x).view(B, T, C)


# --- the whole model -----------------------------------------------------------------------------------------


class HierarchicalTransformer(nn.Module):
    """Token embedding + sinusoidal positions -> n_layers TransformerLayers with an ILT between each
    consecutive pair -> final LayerNorm -> LM head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.embed_scale = math.sqrt(c.d_model)
        self.pos = PositionalEncoding(c.d_model, c.max_seq_len)
        self.drop = Dropout(c.dropout)
        self.layers = nn.ModuleList(
            TransformerLayer(c.d_model, c.n_heads, c.d_ff, c.dropout) for _ in range(c.n_layers)
        )
        # ILT i sits between main layers i and i + 1; none at all for the plain-transformer baseline
        n_ilts = c.n_layers - 1 if c.n_layers_ilt > 0 else 0
        self.ilts = nn.ModuleList(
            InterLayerTransformer(
                c.d_model,
                c.ilt_dim,
                c.nhead_ilt,
                c.n_layers_ilt,
                c.ilt_dropout,
                gate=c.modulation_scale_start if c.ilt_gate else None,
            )
            for _ in range(n_ilts)
        )
        self.ln_f = nn.LayerNorm(c.d_model)
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_weights:
            self.head.weight = self.embed.weight
        self.apply(self._init_weights)
        # GPT-2's scaling: residual projections shrink with depth so the residual stream's variance stays put
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") and name.startswith("layers."):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layers))
        if c.ilt_zero_init:  # ReZero / DenseFormer style: every modulation is exactly 0 at step 0
            for ilt in self.ilts:
                nn.init.zeros_(ilt.proj_out.weight)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, idx: torch.Tensor, modulation_scale: float | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """Token ids (B, T) in, next-token logits (B, T, V) out. See ``features`` for the arguments."""
        return self.head(self.features(idx, modulation_scale, cache))

    def features(
        self, idx: torch.Tensor, modulation_scale: float | None = None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """Token ids (B, T) in, the final hidden states (B, T, C) out: what the LM head turns into logits (the
        training loss applies the head itself, in chunks, so the full logits never exist at once).

        ``modulation_scale`` weighs the ILTs' output; None means the trained model's final value
        (``config.modulation_scale_end``), which is what evaluation and generation use.

        With a ``cache`` the ids continue the sequence the cache holds: positions start at ``cache.length``,
        every layer's keys/values are appended, and the cache advances by T.
        """
        if modulation_scale is None:
            modulation_scale = self.config.modulation_scale_end
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        # sqrt(d_model) keeps token identity from drowning in the unit-amplitude sinusoids (Vaswani et al.)
        x = self.drop(self.embed(idx) * self.embed_scale + self.pos(start, T))  # (B, T, C)
        embedded = x  # what the ilt_embed variant puts first in every ILT's window
        window: list[torch.Tensor] = []  # the latest main-layer outputs, oldest first
        for i, layer in enumerate(self.layers):
            x = layer(x, cache, i)
            if i > 0 and self.ilts:
                ilt = self.ilts[i - 1]
                seen = [embedded, *window, x] if self.config.ilt_embed else [*window, x]
                scale = modulation_scale if ilt.gate is None else ilt.gate
                x = x + scale * ilt(seen)
            window = [*window, x][-(self.config.ilt_window - 1) :]
        if cache is not None:
            cache.advance(T)
        return self.ln_f(x)

    def num_parameters(self, ilt_only: bool = False) -> int:
        params = self.ilts.parameters() if ilt_only else self.parameters()
        return sum(p.numel() for p in params)
