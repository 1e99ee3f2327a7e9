"""The CPU speed paths of hilt/kernels.py against the reference layers of hilt/model.py: forward and backward, in
fp64 (agreement to 1e-10) on the shapes the model gives them, so a kernel can change without re-reading the
reference."""

import pytest
import torch
import torch.nn.functional as F

from hilt import kernels
from hilt.model import HierarchicalTransformer, MultiHeadAttention
from tests.conftest import tiny_config


def _qkv_grads(fn, qkv: torch.Tensor, grad: torch.Tensor):
    qkv = qkv.detach().clone().requires_grad_(True)
    out = fn(qkv)
    out.backward(grad)
    return out.detach(), qkv.grad


def _reference(attn: MultiHeadAttention):
    return lambda qkv: attn.attend(qkv, None, 0, None, 0.0)


@pytest.mark.parametrize(
    "kernel, B, T, C, H",
    [
        (kernels.pair_attention, 6 * 11, 2, 16, 2),  # an ILT at the default window: (B·T, W=2, ilt_dim)
        (kernels.explicit_attention, 6 * 11, 3, 16, 2),  # ilt_window 3
        (
            kernels.explicit_attention,
            4,
            5,
            32,
            4,
        ),  # ilt_embed with window 2, and a main layer's short sequence
        (kernels.explicit_attention, 2, 128, 64, 8),  # a main layer at EXPLICIT_ATTENTION_MAX_LEN
    ],
)
def test_every_attention_kernel_equals_the_reference_forward_and_backward_in_fp64(kernel, B, T, C, H):
    attn = MultiHeadAttention(C, H, dropout=0.0).double()
    qkv = torch.randn(B, T, 3 * C, dtype=torch.float64)
    grad = torch.randn(B, T, C, dtype=torch.float64)
    fast, fast_grad = _qkv_grads(lambda t: kernel(t, H, 0.0), qkv, grad)
    ref, ref_grad = _qkv_grads(_reference(attn), qkv, grad)
    assert (fast - ref).abs().max() < 1e-10
    assert (fast_grad - ref_grad).abs().max() < 1e-10


@pytest.mark.parametrize("kind", ["design", "window3+embed", "plain"])
def test_the_whole_model_with_and_without_kernels_agrees_in_fp64(kind):
    overrides = {
        "design": {},
        "window3+embed": {"ilt_window": 3, "ilt_embed": True},
        "plain": {"n_layers_ilt": 0},
    }
    torch.manual_seed(0)
    fast = HierarchicalTransformer(tiny_config(**overrides[kind])).double()
    reference = HierarchicalTransformer(tiny_config(**overrides[kind]), cpu_kernels=False).double()
    reference.load_state_dict(fast.state_dict())
    idx = torch.randint(0, 97, (3, 20))
    losses = [F.cross_entropy(m(idx).flatten(0, 1), idx.roll(-1, 1).flatten()) for m in (fast, reference)]
    for loss in losses:
        loss.backward()
    assert abs(losses[0].item() - losses[1].item()) < 1e-12
    for (name, p), q in zip(fast.named_parameters(), reference.parameters(), strict=True):
        assert (p.grad - q.grad).abs().max() < 1e-10, name


def test_the_switch_picks_the_kernels_on_cpu_and_the_reference_otherwise():
    model = HierarchicalTransformer(tiny_config())
    assert all(type(m) is kernels.CheapDropout for m in model.modules() if isinstance(m, torch.nn.Dropout))
    model.use_cpu_kernels(False)
    assert all(type(m) is torch.nn.Dropout for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert not any(getattr(m, "cpu_kernels", False) for m in model.modules())
    ilt_qkv = torch.randn(8, 2, 48)
    assert kernels.attention_kernel(ilt_qkv, short=True, plain_causal=True) is kernels.pair_attention
    assert kernels.attention_kernel(ilt_qkv, short=True, plain_causal=False) is None  # a cache or a mask
    main_qkv = torch.randn(2, 16, 96)
    assert kernels.attention_kernel(main_qkv, short=False, plain_causal=True) is None  # fp32: SDPA wins
    with torch.no_grad():
        assert kernels.attention_kernel(main_qkv.bfloat16(), short=False, plain_causal=True) is None
    assert kernels.attention_kernel(main_qkv.bfloat16(), False, True) is kernels.explicit_attention
    long_qkv = torch.randn(1, kernels.EXPLICIT_ATTENTION_MAX_LEN + 1, 96).bfloat16()
    assert kernels.attention_kernel(long_qkv, short=False, plain_causal=True) is None


def test_attention_paths_agree_explicit_for_short_bf16_training_sdpa_otherwise(monkeypatch):
    import hilt.model as model_module

    sdpa_calls = []
    sdpa = model_module.F.scaled_dot_product_attention
    monkeypatch.setattr(
        model_module.F, "scaled_dot_product_attention", lambda *a, **k: sdpa_calls.append(1) or sdpa(*a, **k)
    )
    torch.manual_seed(0)
    attn = model_module.MultiHeadAttention(32, 4, dropout=0.0)
    x = torch.randn(2, 16, 32)
    with torch.no_grad():
        reference = attn(x)  # fp32: SDPA
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            sdpa_bf16 = attn(x)  # no backward to pay for: SDPA
        assert len(sdpa_calls) == 2
        explicit = attn(x)  # a short bf16 sequence under autograd: the explicit path
        assert len(sdpa_calls) == 2
    assert explicit.requires_grad
    assert torch.allclose(explicit.float(), reference, atol=0.03)
    assert torch.allclose(explicit.float(), sdpa_bf16.float(), atol=0.03)


def test_closed_form_attention_over_two_layers_keeps_the_design_dropout_on_its_three_weights():
    torch.manual_seed(0)
    N, H, D = 5, 2, 8
    q, k, v = (torch.randn(N, 2, H, D) for _ in range(3))  # (N, W=2, H, D)
    qkv = torch.cat([t.flatten(2) for t in (q, k, v)], dim=2)  # (N, 2, 3·H·D)
    torch.manual_seed(1)
    out = kernels.pair_attention(qkv, H, 0.5).view(N, 2, H, D).transpose(1, 2)  # (N, H, 2, D)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (N, H, 2, D)
    a = kernels.causal_weights(q, k)[:, :, 1, 1:]  # (N, H, 1): v1's weight for query 1
    # every output is its row's weights, each kept (scaled by 1 / (1 - p)) or dropped, times v
    y0_options = torch.stack([torch.zeros_like(v[:, :, 0]), 2 * v[:, :, 0]])
    assert ((out[:, :, 0] - y0_options).abs().amax(-1) < 1e-5).any(0).all()
    y1_options = torch.stack(
        [2 * w0 * v[:, :, 0] + 2 * w1 * v[:, :, 1] for w0 in (0, 1 - a) for w1 in (0, a)]
    )  # the four keep/drop combinations of query 1's two weights
    assert ((out[:, :, 1] - y1_options).abs().amax(-1) < 1e-5).any(0).all()


def test_dropout_zeroes_a_fraction_p_scales_the_rest_and_its_gradient_follows_the_mask():
    from hilt.kernels import CheapDropout as Dropout

    drop = Dropout(0.25)
    x = torch.ones(400, 500, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01  # 200,000 draws: sd of the fraction ~0.001
    # four 16-bit values come from each 64-bit draw: none of the four lanes may be biased
    assert (kept.view(-1, 4).float().mean(0) - 0.75).abs().max() < 0.01
    assert torch.allclose(y[kept], torch.tensor(1 / 0.75))
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() / 0.75)
    assert torch.equal(drop.eval()(x), x)
    assert drop.train()(torch.ones(3, 5)).shape == (3, 5)  # a size that is no multiple of four
    # bf16 activations (autocast training) keep their dtype, and the kept ones are scaled by the exact 1 / (1 - p),
    # not by a mask that rounded it to bf16 (1 / 0.75 is 1.3359 there: a 0.2% bias on every kept value)
    x16 = torch.randn(400, 500).bfloat16()
    y16 = drop(x16)
    kept16 = y16 != 0
    assert y16.dtype == torch.bfloat16 and abs(kept16.float().mean().item() - 0.75) < 0.01
    assert torch.equal(y16[kept16], (x16[kept16].float() / 0.75).bfloat16())


def test_mixed_dtype_linear_computes_what_autocast_computes():
    reference = torch.nn.Linear(32, 48)
    x = torch.randn(7, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(x)
    lowered = kernels.MixedDtypeLinear(32, 48)
    lowered.weight.data, lowered.bias.data = reference.weight.data.bfloat16(), reference.bias.data.bfloat16()
    assert torch.equal(lowered(x), expected)


def test_a_mask_first_made_while_generating_serves_a_later_training_step():
    kernels._cached_future_mask.cache_clear()
    model = HierarchicalTransformer(
        tiny_config(ilt_window=3)
    )  # windows of 3: the explicit kernel and its mask
    idx = torch.randint(0, 97, (2, 8))
    with torch.inference_mode():
        model(idx)
    model(idx).sum().backward()  # raised "Inference tensors cannot be saved for backward" before
    assert model.ilts[0].proj_in.weight.grad is not None
