"""Linear layers on oneDNN: CPU speed paths with the same maths as ``nn.Linear``, measured faster on CPU.

    MixedDtypeLinear        bf16 weights under fp32 activations, packed  a decoding copy (hilt.generation.decoding)
    onednn_packed           a weight packed for oneDNN, bf16 or fp32     the exact loss's LM head; decoding's copy
    OneDNNLinear            fp32 linear layers on oneDNN, fwd and bwd    fp32 training and evaluation, CPU

The model builds them where ``kernels.Paths`` says; ``tests/test_kernels.py`` checks each against ``F.linear``.
This module imports only torch: the export copies it beside the model.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

# --- mixed-dtype linear --------------------------------------------------------------------------------------


class MixedDtypeLinear(nn.Linear):
    """nn.Linear that also runs with weights narrower than its input, computing in the weights' dtype as autocast
    would. Generation keeps bf16 copies of the matrices (``hilt.generation.decoding.lowered_copy``) while the residual
    stream, the norms and the embedding stay fp32: decoding then computes what bf16 training computed without
    casting every weight at every token (batch-1 decoding 118 -> 210 tokens/s with bf16 weights).

    ``pack()`` also keeps a bf16 weight in oneDNN's own blocked layout. torch's bf16 matmul through oneDNN
    re-lays the plain weight out at every call; the packed one skips that and gives the same bits (one thread:
    the LM head at 16 rows 6.6 -> 3.4 ms, a 256 x 1024 layer 90 -> 75 us, from
    `git show ab15cea:benchmarks/packed_linear_bench.py`; a decoding step of the default model at 4 rows -20%,
    at 16 rows -5 to -18% in three of four contended runs and +2% in the fourth). It follows
    ``torch.backends.mkldnn.enabled``, so the single-row steps that
    ``hilt.generation.decoding.without_onednn`` runs on torch's own GEMV stay there: with the weights out of cache after a
    whole step, that GEMV beats the packed weight (a step 8.5 vs 12.4 ms). ``pack(single_row=True)`` keeps the
    packed weight there too: for an fp32 LM head, whose single-row product torch gives to MKL (a 256 x 50,260 head:
    3.8 ms, packed 1.0 ms; fp32 decoding at batch 1 127 -> 193 tokens/s), and the fp32 main layers
    (``hilt.generation.decoding.lowered_copy``). A packed layer must be packed again after its weight changes: the decoding
    copy never changes, it is rebuilt."""

    packed: torch.Tensor | None = None
    packed_single_row = False

    def pack(self, single_row: bool = False) -> None:
        self.packed = onednn_packed(self.weight)
        self.packed_single_row = single_row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        autocast = torch.is_autocast_enabled(x.device.type)
        if x.dtype != self.weight.dtype and not autocast:
            x = x.to(self.weight.dtype)
        onednn = torch.backends.mkldnn.enabled or self.packed_single_row
        packed = self.packed is not None and onednn and not autocast
        if packed and x.dtype == self.weight.dtype and x.device.type == "cpu":
            return onednn_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)


def onednn_packed(weight: torch.Tensor, rows: int = 16) -> torch.Tensor | None:
    """A bf16 or fp32 CPU weight (out, in) in oneDNN's blocked layout for ``onednn_linear``, laid out for calls of
    about ``rows`` rows (every other count runs on it too), or None where that path is missing (another dtype or
    device, a torch without oneDNN or with it switched off, a CPU oneDNN cannot run the dtype on).

    fp32 too: torch's fp32 matmul on CPU is MKL's, which runs AVX2 code on AMD CPUs, while oneDNN's uses AVX-512
    where there is one. Two threads of an AVX-512 AMD EPYC, an LM head of GPT-2's vocabulary at 83 rows: 64-wide
    80 -> 20 us a row, 256-wide 203 -> 63; with both libraries capped at AVX2, 64-wide 50 -> 28; a 2048^3 matmul
    200 -> 474 GFLOP/s (docs/performance.md)."""
    if not onednn_serves(weight.dtype, weight.device):
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
        onednn_linear(weight.new_zeros(1, weight.size(1)), packed)
    except (AttributeError, RuntimeError):  # private ops (inductor's): a torch without them keeps F.linear
        return None
    return packed


def onednn_serves(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether this module sends products of ``dtype`` on ``device`` to oneDNN: bf16 on a CPU, fp32 on an x86 one,
    with oneDNN in torch and switched on."""
    return (
        device.type == "cpu"
        and (dtype == torch.bfloat16 or (dtype == torch.float32 and _x86_with_avx()))
        and torch.backends.mkldnn.enabled
        and torch.backends.mkldnn.is_available()
    )


@functools.cache
def _x86_with_avx() -> bool:
    """Where the fp32 paths apply: x86 CPUs, whose fp32 matmul torch gives to MKL. Elsewhere (ARM: Apple's
    Accelerate, OpenBLAS) torch's own choice stays; nothing there was measured."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX")


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through oneDNN, in x's dtype: the weight (out, in) plain, with any strides (a
    transposed view too), or packed by ``onednn_packed``."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


# --- fp32 linear layers -------------------------------------------------------------------------------------


def onednn_fp32(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether this product can take the oneDNN fp32 path: fp32 on an x86 CPU, no autocast (whose bf16 matmuls are
    oneDNN's already), not inside a compiled graph (inductor picks its own kernels)."""
    return (
        # first: inside a graph dynamo traces, the checks below would each break it
        not torch.compiler.is_compiling()
        and x.dtype == weight.dtype == torch.float32
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and onednn_serves(x.dtype, x.device)
    )


def weight_gradient(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad^T @ x for grad (N, O) and x (N, I): the (O, I) gradient of a linear layer's weight. oneDNN runs the
    product faster with the larger of O and I on its weight side, so for O >= I it computes the transpose and
    returns it as a view."""
    if grad.size(1) >= x.size(1):
        return onednn_linear(x.t(), grad.t()).t()
    return onednn_linear(grad.t(), x.t())


class _OneDNNLinear(torch.autograd.Function):
    """F.linear with all three products (output, input gradient, weight gradient) through oneDNN."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        y = onednn_linear(x.reshape(-1, x.size(-1)), weight, bias)
        return y.view(*x.shape[:-1], weight.size(0))

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.size(-1))  # (N, O)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = onednn_linear(g, weight.t()).view(x.shape)  # g @ W
        if ctx.needs_input_grad[1]:
            grad_weight = weight_gradient(g, x.reshape(-1, x.size(-1)))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = g.sum(dim=0)
        return grad_x, grad_weight, grad_bias


class OneDNNLinear(nn.Linear):
    """nn.Linear whose fp32 CPU products, forward and backward, run on oneDNN instead of torch's MKL matmul.

    MKL runs AVX2 code on AMD CPUs; oneDNN's fp32 kernels use AVX-512 where there is one. Two threads of an
    AVX-512 AMD EPYC, 2,048 rows of the default model's layers: the output 175-224 -> 438-495 GFLOP/s, the input
    gradient 222-226 -> 355-513, the weight gradient 209-218 -> 309-441 (docs/performance.md). Everything else
    (bf16 autocast, other devices, compiled graphs) is F.linear's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if onednn_fp32(x, self.weight):
            return _OneDNNLinear.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)
