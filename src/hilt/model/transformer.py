"""The Hierarchical Transformer: a decoder-only transformer whose main layers are followed by Inter-Layer
Transformers (ILTs), small modules that mix the layer history at each token.

The pieces are in ``layers.py``; each ILT kind is one file (``ilt_design.py`` is the seed's ILT), behind the
contract of ``ilt.py`` and registered by name in ``ilts.py``.

Shape legend: B batch, T tokens in this call, C d_model, V vocab_size.

This module imports only torch: the export copies the model's folder as it is.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import ModelConfig, modulation_scale
from .ilt import History
from .ilts import ilt_class
from .kernels import Paths, paths_for
from .kv_cache import KVCache
from .layers import PositionalEncoding, layer_class

# --- the whole model -----------------------------------------------------------------------------------------


class HierarchicalTransformer(nn.Module):
    """Token embedding + sinusoidal positions -> n_layers TransformerLayers, each followed by the ILT of
    ``config.ilt_kind`` where that kind puts one -> final LayerNorm -> LM head.

    ``cpu_kernels`` picks the modules it builds: True (the default) the speed paths of ``kernels.py`` (same
    maths), False the reference, or a ``kernels.Paths`` (a decoding copy's)."""

    def __init__(self, config: ModelConfig, cpu_kernels: bool | Paths = True):
        super().__init__()
        self.config = c = config
        self.paths = paths = paths_for(cpu_kernels)
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.embed_scale = math.sqrt(c.d_model)
        self.pos = PositionalEncoding(c.d_model, c.max_seq_len)
        self.drop = paths.dropout(c.dropout)
        self.layers = nn.ModuleList(
            layer_class(paths)(c.d_model, c.n_heads, c.d_ff, c.dropout, paths=paths)
            for _ in range(c.n_layers)
        )
        # none at all for the plain-transformer baseline (n_layers_ilt = 0)
        kind = ilt_class(c.ilt_kind, paths)
        kind.validate(c)
        self.ilt_layers = kind.follows(c) if c.n_layers_ilt else []  # the main layer each ILT follows
        self.ilts = nn.ModuleList(kind.build(c, layer, paths) for layer in self.ilt_layers)
        self._ilt_index = {layer: j for j, layer in enumerate(self.ilt_layers)}
        self.ln_f = nn.LayerNorm(c.d_model)
        self.head = paths.linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_weights:
            self.head.weight = self.embed.weight
        self.apply(self._init_weights)
        # GPT-2's scaling: residual projections shrink with depth so the residual stream's variance stays put
        for name, p in self.named_parameters():
            if name.endswith("proj.weight") and name.startswith("layers."):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layers))
        for ilt in self.ilts:
            ilt.reset_parameters()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

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
        history = History(x0=x, scale=modulation_scale)
        for i, layer in enumerate(self.layers):
            x = layer(x, cache, i, attn_mask)
            if i in self._ilt_index:
                x, history = self.ilts[self._ilt_index[i]](x, history)
            history.states.append(x)
        if cache is not None:
            cache.advance(T)
        return self.ln_f(x)

    @torch.no_grad()
    def ilt_stats(self, idx: torch.Tensor, modulation_scale: float | None = None) -> dict:
        """What each ILT does on the tokens of ``idx`` (B, T), in eval mode, at ``modulation_scale`` (None: the
        config's final value), as its kind reports it (``ILT.stats``: its ``ratio``, the modulation's size next to
        the layer output, and what else the kind knows). Lists indexed by ILT, one per entry, and
        ``after_layer``: the main layer (0-based) each ILT follows. Draws no random numbers; the model's mode is
        restored. ``hilt inspect`` prints them, and training logs them every ``--ilt_stats_every`` steps."""
        if not self.ilts:
            raise ValueError("this model has no ILTs (n_layers_ilt = 0)")
        per_ilt: dict[int, dict] = {}
        # each ILT reports on its own call, before the model appends its output to the history it was given
        hooks = [
            ilt.register_forward_hook(lambda m, args, out, i=i: per_ilt.__setitem__(i, m.stats(*args)))
            for i, ilt in enumerate(self.ilts)
        ]
        was_training = self.training
        self.eval()
        try:
            # eager even when the layers are compiled (--compile): a compiled graph does not call the hooks
            with torch.compiler.set_stance("force_eager"):
                self(idx, modulation_scale)
        finally:
            for h in hooks:
                h.remove()
            self.train(was_training)
        stats = {key: [per_ilt[i][key] for i in range(len(self.ilts))] for key in per_ilt[0]}
        stats["after_layer"] = list(self.ilt_layers)
        return stats

    def num_parameters(self, ilt_only: bool = False) -> int:
        params = self.ilts.parameters() if ilt_only else self.parameters()
        return sum(p.numel() for p in params)
