"""HiltForCausalLM: the HierarchicalTransformer of ``hilt/model/`` behind transformers' ``PreTrainedModel`` and
``GenerationMixin``, so ``from_pretrained``, ``generate()`` and ``pipeline("text-generation")`` work with it.

The wrapper adds no maths of its own. It turns transformers' inputs into the model's: a 2-D ``attention_mask``
(1 = real token, 0 = padding) becomes per-row ``positions`` and a boolean ``attn_mask``, and transformers' own
cache classes stand in for HILT's ``KVCache`` through a three-method view. Works with transformers 4.57 (which
calls the cache ``past_key_values``) and 5.x (which calls it ``cache``).

Exported folders carry this file beside the files of ``hilt/model/`` (copied
from the package unchanged), so ``trust_remote_code=True`` needs neither HILT nor this package installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

# Every file the model needs is imported here by name, because transformers copies a folder's remote code by
# reading its relative imports: 4.x follows only this file's own (not the model's), and neither version
# recognises `from . import kernels`. In the flat exported folder these import the model files beside it.
from ..model.config import ModelConfig  # noqa: F401
from ..model.ilt import ILT  # noqa: F401
from ..model.ilt_dense import DenseILT  # noqa: F401
from ..model.ilt_depth import DepthILT  # noqa: F401
from ..model.ilt_design import DesignILT  # noqa: F401
from ..model.ilt_x0 import X0ILT  # noqa: F401
from ..model.ilts import KINDS  # noqa: F401
from ..model.kernels import Paths  # noqa: F401
from ..model.kv_cache import KVCache  # noqa: F401
from ..model.layers import PositionalEncoding
from ..model.linear import OneDNNLinear  # noqa: F401
from ..model.transformer import HierarchicalTransformer
from .configuration_hilt import HiltConfig

# transformers 5 renamed the outputs' and forward's past_key_values to cache (the old name still works there,
# with a deprecation warning); 4.x knows only the old one
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class _CacheView:
    """What HierarchicalTransformer asks of a cache (``update(layer_idx, k, v)``, ``advance(n)``, ``length``),
    over a transformers Cache, whose ``update`` takes ``(k, v, layer_idx)`` and which counts its own length."""

    def __init__(self, cache: Cache):
        self.cache = cache
        self.length = cache.get_seq_length()

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(k, v, layer_idx)  # (B, H, S, D) each

    def advance(self, n: int) -> None:
        self.length += n


def padding_inputs(attention_mask: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D mask (B, S) over the cached and the T new tokens (1 = real, 0 = padding) -> each new token's position
    in its own row (B, T), counting real tokens only, and the boolean mask (B, 1, T, S) the model attends with:
    causal, never onto padding. A padding query sees itself, so its softmax has something to normalise."""
    real = attention_mask.bool()  # (B, S)
    S = real.size(1)
    positions = (real.long().cumsum(1) - 1).clamp_min(0)[:, S - T :]  # (B, T)
    causal = torch.ones(T, S, dtype=torch.bool, device=real.device).tril(
        diagonal=S - T
    )  # query i: keys <= S-T+i
    itself = torch.zeros(T, S, dtype=torch.bool, device=real.device)
    itself[:, S - T :] = torch.eye(T, dtype=torch.bool, device=real.device)
    return positions, ((causal & real[:, None, :]) | itself)[:, None]  # (B, T), (B, 1, T, S)


class HiltForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = HiltConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["TransformerLayer"]
    # transformers 5 reads a dict {tied parameter: the parameter it shares}; with tie_word_embeddings it saves
    # one copy to model.safetensors and re-ties on loading
    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}

    def __init__(self, config: HiltConfig):
        super().__init__(config)
        self.model = HierarchicalTransformer(config.to_model_config())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        if isinstance(module, HierarchicalTransformer):
            return  # HierarchicalTransformer initialised itself; from_pretrained overwrites every weight
        if isinstance(module, PositionalEncoding):
            # a buffer, not a weight: transformers may build the model on the meta device, where it is empty
            fresh = PositionalEncoding(module.pe.size(1), module.pe.size(0)).pe
            if module.pe.is_meta:
                module.pe = fresh
            else:
                module.pe.copy_(fresh)

    def generate(self, *args, modulation_scale: float | None = None, **kwargs):
        """transformers' ``generate``; ``modulation_scale`` overrides generation_config.json's for this call.
        (Passed on as a plain keyword, transformers would set it on its per-call copy of the generation config,
        which ``forward`` never sees.)"""
        self._call_modulation_scale = modulation_scale
        try:
            return super().generate(*args, **kwargs)
        finally:
            self._call_modulation_scale = None

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.head

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        modulation_scale: float | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids (B, T) -> logits (B, T, V) (the last ``logits_to_keep`` positions when > 0), with the
        next-token cross-entropy when ``labels`` (B, T) are given (shifted here; -100 is ignored).

        ``attention_mask`` (B, S) covers the cached and the new tokens; rows may be left-padded. Without
        ``modulation_scale`` the ILTs use ``generate``'s, else the one in generation_config.json (the trained
        model's final scale, which HILT uses too), else ``config.modulation_scale_end``."""
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("HiltForCausalLM takes input_ids, not inputs_embeds")
        if kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            raise ValueError("HiltForCausalLM returns no attentions or hidden states")
        cache = cache if cache is not None else past_key_values
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True)
        if not use_cache:
            cache = None
        elif cache is None:
            cache = DynamicCache()
        T = input_ids.size(1)
        positions, mask = position_ids, None
        if attention_mask is not None and not bool(attention_mask.all()):
            S = (cache.get_seq_length() if cache is not None else 0) + T
            if attention_mask.size(1) != S:
                raise ValueError(
                    f"attention_mask covers {attention_mask.size(1)} tokens; cache + input_ids: {S}"
                )
            from_mask, mask = padding_inputs(attention_mask, T)
            positions = from_mask if positions is None else positions
        if modulation_scale is None:
            modulation_scale = getattr(self, "_call_modulation_scale", None)
        if modulation_scale is None:
            modulation_scale = getattr(self.generation_config, "modulation_scale", None)
        hidden = self.model.features(
            input_ids,
            modulation_scale,
            _CacheView(cache) if cache is not None else None,
            positions=positions,
            attn_mask=mask,
        )  # (B, T, C)
        loss = None
        if labels is not None:
            logits = self.model.head(hidden)  # (B, T, V)
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        else:
            logits = self.model.head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})
