"""The decoding copy of a model: its matrices in the compute dtype (bf16 where training autocasts), kept between
calls and rebuilt when the weights change, and the oneDNN switch for single-row steps. Speed only: what the copy
computes is what training's autocast computed.
"""

from __future__ import annotations

import copy
import json
import threading
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from hilt.model import kernels, linear
from hilt.model.ilt_design import DesignILT
from hilt.model.layers import MultiHeadAttention, TransformerLayer
from hilt.model.linear import MixedDtypeLinear
from hilt.model.transformer import HierarchicalTransformer


class DecodingAttention(MultiHeadAttention):
    """Attention in the decoding copy: the batched decoding step (one new token per row, a cache, a per-row
    mask) takes the kernel ``hilt.model.kernels.decode_attention_kernel`` picks; every other call is the
    reference ``attend``. Only the copy is built of it, so training and the model itself never see it."""

    def attend(self, qkv, cache, layer_idx, attn_mask, attn_dropout):
        if attn_mask is None or cache is None or attn_dropout or not self.cpu_kernels:
            # no kernel for these (a single sequence's step has no mask), and no head views made twice
            return super().attend(qkv, cache, layer_idx, attn_mask, attn_dropout)
        B, T, C3 = qkv.shape
        C, H = C3 // 3, self.n_heads
        q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in qkv.split(C, dim=2))  # (B, H, T, D)
        kernel = kernels.decode_attention_kernel(q, attn_mask)
        if kernel is None:
            return super().attend(qkv, cache, layer_idx, attn_mask, attn_dropout)
        k, v = cache.update(layer_idx, k, v)  # (B, H, S, D)
        return kernel(q, k, v, attn_mask).transpose(1, 2).reshape(B, T, C)


def _norm(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return torch.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)  # what nn.LayerNorm computes


class DecodingLayer(TransformerLayer):
    """A main layer or an ILT's layer in the decoding copy: the reference ``TransformerLayer`` step for step, in
    one function that calls its pieces' computations directly. The reference goes through nine module calls and
    two identity dropouts per layer; next to an ILT's ~53 small operators that bookkeeping is a quarter of its time
    (one row, fp32: an ILT 217 -> 160 us). Eval mode only: training takes the reference."""

    def forward(self, x, cache=None, layer_idx=0, attn_mask=None):
        if self.training:
            return super().forward(x, cache, layer_idx, attn_mask)
        attn, ff = self.attn, self.ff
        qkv = attn.qkv.forward(_norm(self.ln1, x))
        x = x + attn.proj.forward(attn.attention(qkv, cache, layer_idx, attn_mask))
        return x + ff.proj.forward(F.gelu(ff.fc.forward(_norm(self.ln2, x))))


class DecodingILT(DesignILT):
    """The design's ILT in the decoding copy: the reference ``modulation`` without its module calls and its
    identity dropout (see ``DecodingLayer``). Eval mode only."""

    def modulation(self, window: list[torch.Tensor]) -> torch.Tensor:
        if self.training:
            return super().modulation(window)
        B, T, C = window[-1].shape
        x = _norm(self.ln, self.proj_in.forward(torch.stack(window, dim=2).reshape(B * T, len(window), C)))
        for layer in self.layers:
            x = layer.forward(x)
        return self.proj_out.forward(x.mean(dim=1)).view(B, T, C)


def lowered_copy(
    model: HierarchicalTransformer, dtype: torch.dtype, decoding_layers: bool = True
) -> HierarchicalTransformer:
    """An eval-mode copy of ``model`` whose main and ILT layers hold their matrices in ``dtype`` (e.g. bf16): what
    training's autocast computes (``MixedDtypeLinear`` casts the fp32 activations), without casting every weight
    at every token; each matrix also gets a oneDNN-packed twin where there is one (in the model's own dtype the
    matrices are shared and only the twins are new). The embedding, norms and positions stay the model's own
    tensors, shared, not copied. It is built of ``DecodingAttention``, ``DecodingLayer`` and ``DecodingILT``: the
    same parameters and maths, a faster decoding step (``decoding_layers=False`` keeps the reference's layer and
    ILT classes: what the tests compare it with). Building one takes ~35 ms at the default size:
    ``decoding_weights`` keeps it between calls."""
    paths = replace(model.paths, linear=MixedDtypeLinear, attention=DecodingAttention)
    if decoding_layers:
        paths = replace(paths, layer=DecodingLayer, ilts={DesignILT.kind: DecodingILT})
    # plain tensors even when called under inference mode: the copy outlives this call in the cache
    with torch.inference_mode(False), torch.no_grad():
        lowered = copy.deepcopy(_skeleton(model.config, paths))
        copied = {
            id(m)
            for part in (lowered.layers, lowered.ilts)
            for m in part.modules()
            if isinstance(m, nn.Linear)
        }
        # the same config builds the same modules in the same order: each takes the model's own tensors, the
        # main and ILT layers' matrices (and biases) in ``dtype``
        for source, target in zip(model.modules(), lowered.modules(), strict=True):
            for name, param in source.named_parameters(recurse=False):
                if id(target) in copied:
                    param = nn.Parameter(param.detach().to(dtype), requires_grad=False)
                setattr(target, name, param)
            for name, buffer in source.named_buffers(recurse=False):
                setattr(target, name, buffer)
        lowered.eval()
        main_layers = {id(m) for m in lowered.layers.modules()}
        for module in (*lowered.layers.modules(), *lowered.ilts.modules()):
            if isinstance(module, MixedDtypeLinear):
                # fp32 single-row steps too for the main layers: with the weights out of cache after a whole
                # step, MKL's GEMV reads them at half oneDNN's speed (fp32 batch-1 decoding 202 -> 238 tokens/s;
                # capped at AVX2 172 -> 193). Not the ILTs' small matrices (-5%), nor bf16, where torch's own
                # GEMV wins (see without_onednn).
                module.pack(single_row=dtype == torch.float32 and id(module) in main_layers)
    return lowered


_skeletons: dict[tuple, HierarchicalTransformer] = {}
_skeletons_lock = threading.Lock()  # not _cache_lock: decoding_weights holds that one while it builds a copy


def _skeleton(config, paths) -> HierarchicalTransformer:
    """A model of ``paths``' modules on the meta device: the copy's structure without memory or initialisation,
    built once per config and set of classes (building it costs more than copying it: ~37 vs ~11 ms)."""
    classes = (
        paths.kernels,
        paths.linear,
        paths.dropout,
        paths.layer,
        paths.attention,
        tuple(paths.ilts.items()),
    )
    key = (json.dumps(config.to_dict(), sort_keys=True), *classes)
    with _skeletons_lock:
        if key not in _skeletons:
            with torch.device("meta"):
                _skeletons[key] = HierarchicalTransformer(config, paths)
        return _skeletons[key]


# --- the decoding copy, kept between calls -------------------------------------------------------------------
# Whoever decodes (hilt.generation.engine.Engine, hilt.generation.generate) asks for the copy with ``decoding_weights``; it is kept per
# model and dtype while the model's matrices keep their values. How a stale copy is noticed, without torch's
# private Tensor._version and without any process-wide hook:
# - load_state_dict on the model bumps the model's own counter (a post-hook registered on that model when it is
#   first decoded);
# - the identity of every copied matrix (object, data_ptr, shape, dtype, device) catches .to(), a reassigned
#   parameter or a new storage;
# - a sampled checksum (every n-th element of each copied matrix, ~64 per matrix, summed in fp64) catches
#   optimizer steps, which move every element of every trained matrix, and other in-place edits; it costs
#   ~0.5 ms, not the 80 MB read a full checksum would. A change to a few elements that the sample misses goes
#   unnoticed: call ``forget_decoding_weights(model)`` after such surgery.
# Comparing data_ptrs alone would miss every one of the usual changes: optimizer steps and load_state_dict
# write into the same storage.
_loads: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
_decoding_cache: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def _count_load(module: nn.Module, incompatible_keys) -> None:
    _loads[module] = _loads.get(module, 0) + 1


def _copied_matrices(model: HierarchicalTransformer) -> list[torch.Tensor]:
    linears = (*model.layers.modules(), *model.ilts.modules())
    return [m.weight for m in linears if isinstance(m, nn.Linear)] + [model.head.weight]


def _fingerprint(model: HierarchicalTransformer) -> tuple:
    matrices = _copied_matrices(model)
    identity = tuple((id(w), w.data_ptr(), tuple(w.shape), w.dtype, w.device) for w in matrices)
    with torch.no_grad():
        sample = torch.stack(
            [w.detach().reshape(-1)[:: max(1, w.numel() // 64)].sum(dtype=torch.float64) for w in matrices]
        )
    return _loads.get(model, 0), identity, tuple(sample.tolist())


def decoding_weights(
    model: HierarchicalTransformer, compute_dtype: torch.dtype | None
) -> tuple[HierarchicalTransformer, nn.Linear]:
    """The module that decodes and the LM head that turns its hidden states (B, C) into logits (B, V):
    ``lowered_copy`` and a copy of the head in ``compute_dtype`` (a packed ``MixedDtypeLinear``, which casts the
    fp32 hidden states), built once per model and dtype and rebuilt when the model's weights change (see above).

    ``compute_dtype`` None keeps the model's precision. An fp32 model on CPU still gets a decoding copy, one that
    shares the model's matrices and adds oneDNN-packed twins of them (``linear.onednn_packed``: torch's fp32
    matmul is MKL's, slow on AMD CPUs; ``linear.onednn_serves`` says where); the LM head's twin serves single-row
    steps too. Elsewhere: the model itself and its head."""
    if compute_dtype is None:
        weight = model.head.weight
        if not (weight.dtype == torch.float32 and linear.onednn_serves(weight.dtype, weight.device)):
            return model, model.head
        compute_dtype = torch.float32
    fingerprint = _fingerprint(model)
    with _cache_lock:
        if model not in _decoding_cache:
            _decoding_cache[model] = {}
            model.register_load_state_dict_post_hook(_count_load)
        entry = _decoding_cache[model].get(compute_dtype)
        if entry is None or entry[0] != fingerprint:
            # Decoding one token reads every LM-head weight (12.9 M at GPT-2's vocabulary) for a matrix-vector
            # product: memory-bound, so a bf16 copy halves the bytes (measured 6.4 -> 1.7 ms per token on CPU).
            with torch.inference_mode(False), torch.no_grad():
                weight = model.head.weight.detach().to(compute_dtype)
                head = MixedDtypeLinear(weight.size(1), weight.size(0), bias=False, device="meta")
                head.weight = nn.Parameter(weight, requires_grad=False)
                head.pack(single_row=compute_dtype == torch.float32)
            entry = (fingerprint, lowered_copy(model, compute_dtype), head)
            _decoding_cache[model][compute_dtype] = entry
    return entry[1], entry[2]


def cache_dtype(compute_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """What a decoding KV cache stores: fp32 on CPU for bf16/fp16 compute, else the compute dtype. The keys and
    values are computed in bf16 and fp32 holds them exactly; attention then reads them without a cast and runs in
    fp32, where torch's CPU SDPA is much faster at one query (8 heads of 32 over 200 keys: 36 -> 12 us; over 600:
    99 -> 22 us; batch-1 decoding at a 600-token context 221 -> 256 tokens/s). Twice the cache's memory; the
    engine's batched steps read the cache from memory either way and run at the same speed (docs/generation.md)."""
    narrow = compute_dtype in (torch.bfloat16, torch.float16)
    return torch.float32 if narrow and torch.device(device).type == "cpu" else compute_dtype


def forget_decoding_weights(model: HierarchicalTransformer) -> None:
    """Drops the kept decoding copies of ``model`` (after weight surgery the checks above could miss)."""
    with _cache_lock:
        _decoding_cache.pop(model, None)


@contextmanager
def onednn_disabled() -> Iterator[None]:
    """torch's CPU matmuls without oneDNN until exit, when the previous setting comes back.

    Not thread-safe: ``torch.backends.mkldnn.enabled`` is one flag for the whole process, so every thread's
    matmuls run without oneDNN meanwhile, and two threads entering and leaving in an interleaved order can leave
    it off. Apply it only on the thread that owns the decoding loop (``hilt.generation.engine.Engine`` has one decode thread
    and applies it there), never around work another thread may be doing."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def without_onednn(device: torch.device, tokens: int) -> AbstractContextManager:
    """``onednn_disabled`` for a model call of one token in all, else nothing; same thread rules (not thread-safe).

    torch runs CPU bf16 matmuls through oneDNN, which spends ~50 us setting up each matrix-vector product,
    where torch's own GEMV kernel streams the weights at memory speed (decoding one sequence with bf16 weights,
    measured: 120 tokens/s with oneDNN, 205 without; the LM head alone 1.25 -> 0.96 ms). From a few rows on oneDNN
    is faster (4 rows: 35 vs 56 us; 1024 rows: 1.1 vs 14 ms), so only single-row steps go without it. The switch
    is process-wide: decoding in one thread while another trains in bf16 would slow that training down for the
    duration of each step."""
    return onednn_disabled() if device.type == "cpu" and tokens == 1 else nullcontext()
