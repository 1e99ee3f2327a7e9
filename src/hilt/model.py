"""The Hierarchical Transformer: a decoder-only transformer whose consecutive layers are mixed by small
Inter-Layer Transformers (ILTs).

Read bottom-up: positions -> attention -> feed-forward -> layer -> ILT -> whole model.

Shape legend: B batch, T tokens in this call, S tokens attended to (cache + new), C d_model,
H heads, D head size (C // H), W layer window of an ILT, E ilt_dim, V vocab_size. In the history kinds'
modules (depth, depth_multiway, dense, x0) S is instead the number of sources (embedding + layers so far),
r ilt_rank, w streams.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .config import (  # noqa: F401 (re-exported: hilt.model is where users look for them)
    DROPOUT,
    ILT_DIM,
    ILT_DROPOUT,
    ILT_WINDOW,
    MODULATION_SCALE_END,
    MODULATION_SCALE_START,
    N_LAYERS_ILT,
    NHEAD_ILT,
    ModelConfig,
    modulation_scale,
)
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

    def __init__(self, d_model: int, n_heads: int, dropout: float, short: bool = False):
        super().__init__()
        self.n_heads = n_heads
        self.short = short
        self.qkv = nn.Linear(d_model, 3 * d_model)  # one fused projection for q, k and v
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)
        self.cpu_kernels = True  # hilt.kernels.use_cpu_kernels sets it

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
        same maths where one fits (hilt/kernels.py), else the reference ``attend``."""
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

    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.proj = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

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

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        layer_idx: int = 0,
        attn_mask: torch.Tensor | None = None,
        attn_input: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``attn_input``: what the attention reads instead of x (ilt_kind depth_multiway); the residual is x."""
        x = x + self.attn(self.ln1(x if attn_input is None else attn_input), cache, layer_idx, attn_mask)
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
        self.proj_in = nn.Linear(d_model, ilt_dim)
        self.ln = nn.LayerNorm(ilt_dim)
        self.layers = nn.ModuleList(
            TransformerLayer(ilt_dim, n_heads, 4 * ilt_dim, dropout, short=True) for _ in range(n_layers)
        )
        self.dropout = nn.Dropout(dropout)
        self.proj_out = nn.Linear(ilt_dim, d_model)

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


# --- ILT kinds that read the whole layer history (ilt_kind != "design") -----------------------------------------
# One module follows every main layer. Its "sources" are what the residual stream is a sum of: the embedding x0
# and each main layer's contribution so far (layer output - layer input). Every module returns
# (modulations, keys): one modulation (B, T, C) per stream it feeds, and the keys of all sources so far, so each
# source is keyed once, by the module after the layer that made it, and the key is reused by every later module.
# All of them start at exactly 0, so step 0 is the plain transformer; no fixed scale shrinks them.


class DepthAttentionILT(nn.Module):
    """ilt_kind "depth": per token, a single-head low-rank attention over the layer history plus a static weight
    per source, added to the residual stream after main layer i (S = i + 2 sources, r = ilt_rank).

    For every token position independently (positions are never mixed, so a KV cache stays exact)::

        sources: x0 (embedding), d_0 .. d_i (each main layer's contribution)       (B,T,S,C)
           │ each new one: RMSNorm ─> Linear C→r ─> key ───────────┐                (B,T,S,r)
           │                                                      ▼
        h (B,T,C), state after layer i ─> RMSNorm ─> Linear C→r ─> query ─> softmax over sources of
           │                                        (zero init)          query·key / sqrt(r) = a (B,T,S)
           ▼
        modulation = gate ⊙ Σ_s a_s source_s  +  Σ_s static_s ⊙ source_s                (B,T,C)
                     └ per token, dynamic ┘      └ per channel: a direct path to x0 from step 0 ┘
        h' = h + modulation               (gate and static start at 0: exactly the plain transformer)

    The static part is x0 mixing (modded-nanogpt) and DenseFormer generalised to every source; the dynamic part
    is Attention Residuals' input-dependent query (keys RMS-normed) at low rank.
    """

    def __init__(self, d_model: int, rank: int, n_sources: int, streams: int = 1):
        super().__init__()
        self.rank, self.streams = rank, streams
        self.key = nn.Linear(d_model, rank, bias=False)  # keys the sources that are new to this module
        self.query = nn.Linear(d_model, streams * rank, bias=False)
        self.gate = nn.Parameter(torch.zeros(streams, d_model))
        self.static = nn.Parameter(torch.zeros(streams, n_sources, d_model))
        self.cpu_kernels = True  # hilt.kernels.use_cpu_kernels sets it

    def reset_parameters(self) -> None:
        """Zero query, gate and static weights (called after the model's own init, which draws every Linear)."""
        for p in (self.query.weight, self.gate, self.static):
            nn.init.zeros_(p)

    def keys(self, sources: list[torch.Tensor], keys: list[torch.Tensor]) -> list[torch.Tensor]:
        """The keys of all sources: those already made, then this module's keys of the new ones, each (B, T, r)."""
        return keys + [self.key(F.rms_norm(s, s.shape[-1:])) for s in sources[len(keys) :]]

    def queries(self, h: torch.Tensor) -> torch.Tensor:
        """Each stream's query from the state after this module's layer, (B, T, streams, r)."""
        B, T, C = h.shape
        return self.query(F.rms_norm(h, (C,))).view(B, T, self.streams, self.rank)

    def weights(self, h: torch.Tensor, keys: list[torch.Tensor]) -> torch.Tensor:
        """The attention of each stream over the sources, (B, T, streams, S)."""
        k = torch.stack(keys, dim=3)  # (B, T, r, S)
        return (self.queries(h) @ k * self.rank**-0.5).softmax(dim=-1, dtype=torch.float32)  # (B, T, w, S)

    def forward(
        self, h: torch.Tensor, sources: list[torch.Tensor], keys: list[torch.Tensor]
    ) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
        keys = self.keys(sources, keys)
        if self.cpu_kernels and h.device.type == "cpu" and torch.is_grad_enabled():
            # a CPU speed path with the same maths (hilt/kernels.py)
            modulation = kernels.depth_mix(self.queries(h), keys, sources, self.gate, self.static)
            return modulation.unbind(dim=2), keys
        stacked = torch.stack(sources, dim=2)  # (B, T, S, C)
        # in the keys' dtype: what autocast computes, and what generation's bf16 copy (bf16 matrices, fp32
        # residual stream: hilt.decoding.lowered_copy) computes too
        dtype = keys[0].dtype
        dynamic = self.weights(h, keys).to(dtype) @ stacked.to(dtype)  # (B, T, w, C)
        static = (stacked.unsqueeze(2) * self.static).sum(dim=3)  # (B, T, w, C)
        modulation = self.gate * dynamic + static  # (B, T, w, C)
        return modulation.unbind(dim=2), keys


class DepthMultiwayILT(DepthAttentionILT):
    """ilt_kind "depth_multiway": DepthAttentionILT with two streams, as MUDDFormer feeds separate mixtures to
    attention and residual: one query, gate and static weight set for the residual stream, one more for the next
    main layer's attention input (its q, k and v read it; its residual and feed-forward do not)::

        sources, keys (as in DepthAttentionILT) ──┬─ stream 0: residual       ─> h' = h + modulation_0
        h, state after layer i ───────────────────┴─ stream 1: next attention ─> h' + modulation_1
                                                                                  ▼
        next layer:  h'' = h' + attn(LN(h' + modulation_1));  h'' + ff(LN(h''))

    With stream 1 at 0 it is the depth kind. The module after the last layer has no next attention to feed, so
    it keeps only the residual stream.
    """

    def __init__(self, d_model: int, rank: int, n_sources: int, last: bool = False):
        super().__init__(d_model, rank, n_sources, streams=1 if last else 2)


class StaticMixILT(nn.Module):
    """ilt_kinds "x0" and "dense": no attention, no per-token weights, the baselines the depth kinds must beat.
    A learned per-channel multiple of each of the first S sources, added to the residual stream after main layer
    i: "x0" reads the embedding alone (modded-nanogpt's x0 mixing, S = 1), "dense" every source so far
    (DenseFormer's depth-weighted average, S = i + 2; the depth kinds' static part without their query)::

        x0, d_0 .. d_i ─> first S of them ─> Σ_s lambda_s ⊙ source_s ─> modulation
        h' = h + modulation                                           (every lambda starts at 0)
    """

    streams = 1

    def __init__(self, d_model: int, n_sources: int):
        super().__init__()
        # (streams, S, C), like the depth kinds
        self.static = nn.Parameter(torch.zeros(1, n_sources, d_model))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.static)

    def forward(
        self, h: torch.Tensor, sources: list[torch.Tensor], keys: list[torch.Tensor]
    ) -> tuple[tuple[torch.Tensor, ...], list[torch.Tensor]]:
        weights = self.static[0]  # (S, C)
        modulation = weights[0] * sources[0]
        for w, source in zip(weights[1:], sources[1 : len(weights)], strict=True):
            modulation = torch.addcmul(modulation, w, source)
        return (modulation,), keys


def history_ilt(kind: str, c: ModelConfig, layer: int) -> nn.Module:
    """The module of ``kind`` that follows main layer ``layer`` (0-based)."""
    if kind == "x0":
        return StaticMixILT(c.d_model, 1)
    if kind == "dense":
        return StaticMixILT(c.d_model, layer + 2)
    if kind == "depth":
        return DepthAttentionILT(c.d_model, c.ilt_rank, layer + 2)
    return DepthMultiwayILT(c.d_model, c.ilt_rank, layer + 2, last=layer == c.n_layers - 1)


# --- the whole model -----------------------------------------------------------------------------------------


class HierarchicalTransformer(nn.Module):
    """Token embedding + sinusoidal positions -> n_layers TransformerLayers with an ILT between each
    consecutive pair -> final LayerNorm -> LM head.

    ``cpu_kernels`` picks the speed paths of ``hilt/kernels.py`` (same maths; see ``use_cpu_kernels``)."""

    def __init__(self, config: ModelConfig, cpu_kernels: bool = True):
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.embed_scale = math.sqrt(c.d_model)
        self.pos = PositionalEncoding(c.d_model, c.max_seq_len)
        self.drop = nn.Dropout(c.dropout)
        self.layers = nn.ModuleList(
            TransformerLayer(c.d_model, c.n_heads, c.d_ff, c.dropout) for _ in range(c.n_layers)
        )
        # design: ILT i sits between main layers i and i + 1; the other kinds: one module after every main layer;
        # none at all for the plain-transformer baseline (n_layers_ilt = 0)
        if c.n_layers_ilt == 0:
            self.ilts = nn.ModuleList()
        elif c.ilt_kind == "design":
            self.ilts = nn.ModuleList(
                InterLayerTransformer(
                    c.d_model,
                    c.ilt_dim,
                    c.nhead_ilt,
                    c.n_layers_ilt,
                    c.ilt_dropout,
                    gate=c.modulation_scale_start if c.ilt_gate else None,
                )
                for _ in range(c.n_layers - 1)
            )
        else:
            self.ilts = nn.ModuleList(history_ilt(c.ilt_kind, c, i) for i in range(c.n_layers))
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
        if c.ilt_kind != "design":
            for ilt in self.ilts:
                ilt.reset_parameters()
        self.use_cpu_kernels(cpu_kernels)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def use_cpu_kernels(self, enabled: bool = True) -> None:
        """The one switch between the reference layers above and the speed paths of ``hilt/kernels.py``."""
        kernels.use_cpu_kernels(self, enabled)

    def modulation_scale_at(self, progress: float) -> float:
        """The ILT curriculum: the modulation scale at ``progress`` (fraction of training done, 0 -> 1)."""
        return modulation_scale(
            progress, self.config.modulation_scale_start, self.config.modulation_scale_end
        )

    def forward(
        self,
        idx: torch.Tensor,
        modulation_scale: float | None = None,
        cache: KVCache | None = None,
        *,
        progress: float | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) in, next-token logits (B, T, V) out. See ``features`` for the arguments."""
        hidden = self.features(
            idx, modulation_scale, cache, progress=progress, positions=positions, attn_mask=attn_mask
        )
        return self.head(hidden)

    def features(
        self,
        idx: torch.Tensor,
        modulation_scale: float | None = None,
        cache: KVCache | None = None,
        *,
        progress: float | None = None,
        positions: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token ids (B, T) in, the final hidden states (B, T, C) out: what the LM head turns into logits (the
        training loss applies the head itself, in chunks, so the full logits never exist at once).

        ``modulation_scale`` weighs the ILTs' output. Training passes ``progress`` instead and the curriculum
        picks the scale; with neither, the trained model's final value (``config.modulation_scale_end``), which
        is what evaluation and generation use.

        With a ``cache`` the ids continue the sequence the cache holds: positions start at ``cache.length``,
        every layer's keys/values are appended, and the cache advances by T.

        For rows that do not all start at position 0 (left padding, or a batch of caches of different lengths):
        ``positions`` (B, T) gives each token's index in its own sequence, and ``attn_mask`` (B, 1, T, S), True
        where a query may attend to a key, replaces the causal mask (S: the keys after the cache's update).
        """
        if modulation_scale is None:
            modulation_scale = (
                self.config.modulation_scale_end if progress is None else self.modulation_scale_at(progress)
            )
        B, T = idx.shape
        if positions is None:
            pos = self.pos(cache.length if cache is not None else 0, T)  # (T, C)
        else:
            pos = self.pos.at(positions)  # (B, T, C)
        # sqrt(d_model) keeps token identity from drowning in the unit-amplitude sinusoids (Vaswani et al.)
        x = self.drop(self.embed(idx) * self.embed_scale + pos)  # (B, T, C)
        if self.config.ilt_kind != "design" and self.ilts:
            x = self.history_layers(x, cache, attn_mask)
        else:
            x = self.design_layers(x, cache, attn_mask, modulation_scale)
        if cache is not None:
            cache.advance(T)
        return self.ln_f(x)

    def design_layers(
        self, x: torch.Tensor, cache: KVCache | None, attn_mask: torch.Tensor | None, modulation_scale: float
    ) -> torch.Tensor:
        """The main layers with the design's ILT between each consecutive pair (none for a plain transformer):
        embedded input (B, T, C) -> last layer's state (B, T, C), modulated."""
        embedded = x  # what the ilt_embed variant puts first in every ILT's window
        window: list[torch.Tensor] = []  # the latest main-layer outputs, oldest first
        for i, layer in enumerate(self.layers):
            x = layer(x, cache, i, attn_mask)
            if i > 0 and self.ilts:
                ilt = self.ilts[i - 1]
                seen = [embedded, *window, x] if self.config.ilt_embed else [*window, x]
                scale = modulation_scale if ilt.gate is None else ilt.gate
                x = x + scale * ilt(seen)
            window = [*window, x][-(self.config.ilt_window - 1) :]
        return x

    def history_layers(
        self, x: torch.Tensor, cache: KVCache | None, attn_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The main layers with the modules of a history kind (depth, depth_multiway, dense, x0) between them:
        embedded input (B, T, C) -> last layer's state (B, T, C), modulated. The kinds ignore modulation_scale."""
        sources, keys = [x], []  # x0, then each layer's contribution; their keys
        attn_input = None  # depth_multiway: the next attention's own input
        for i, (layer, ilt) in enumerate(zip(self.layers, self.ilts, strict=True)):
            y = layer(x, cache, i, attn_mask, attn_input)
            sources.append(y - x)
            modulations, keys = ilt(y, sources, keys)
            x = y + modulations[0]
            attn_input = x + modulations[1] if len(modulations) > 1 else None
        return x

    def num_parameters(self, ilt_only: bool = False) -> int:
        params = self.ilts.parameters() if ilt_only else self.parameters()
        return sum(p.numel() for p in params)
