"""The CPU speed paths of hilt/model/kernels.py against the reference layers of hilt/model/layers.py: forward and backward, in
fp64 (agreement to 1e-10) on the shapes the model gives them, so a kernel can change without re-reading the
reference."""

import pytest
import torch
import torch.nn.functional as F

from hilt.model import HierarchicalTransformer, MultiHeadAttention, kernels, linear
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
        ),  # a main layer's short sequence
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


@pytest.mark.parametrize("kind", ["design", "window3", "plain"])
def test_the_whole_model_with_and_without_kernels_agrees_in_fp64(kind):
    overrides = {
        "design": {},
        "window3": {"ilt_window": 3},
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


def test_the_depth_kinds_mixing_kernel_equals_the_reference_in_fp64():
    kind = "depth"
    torch.manual_seed(0)
    fast = HierarchicalTransformer(tiny_config(ilt_kind=kind, n_layers=4)).double()
    for p in fast.ilts.parameters():  # away from the zero init, so every gradient path carries something
        torch.nn.init.normal_(p, std=0.3)
    reference = HierarchicalTransformer(tiny_config(ilt_kind=kind, n_layers=4), cpu_kernels=False).double()
    reference.load_state_dict(fast.state_dict())
    idx = torch.randint(0, 97, (3, 20))
    losses = [F.cross_entropy(m(idx).flatten(0, 1), idx.roll(-1, 1).flatten()) for m in (fast, reference)]
    for loss in losses:
        loss.backward()
    # the reference takes its softmax over sources in fp32 even here (softmax(dtype=torch.float32), as autocast
    # would): agreement to fp32's rounding; the kernel's own fp64 gradients are checked by gradcheck below
    assert abs(losses[0].item() - losses[1].item()) < 1e-6 * losses[1].item()
    for (name, p), q in zip(fast.named_parameters(), reference.parameters(), strict=True):
        assert (p.grad - q.grad).abs().max() < 1e-6 * q.grad.abs().max(), name
    assert fast.ilts[0].cpu_kernels and not reference.ilts[0].cpu_kernels
    with torch.no_grad():  # decoding keeps the reference: no backward to save
        assert torch.equal(fast(idx), reference(idx))


@pytest.mark.parametrize("streams", [1, 2])
def test_the_depth_mixing_kernels_backward_is_the_gradient_of_its_forward(streams):
    torch.manual_seed(0)
    N, S, r, C = 7, 4, 5, 6
    shapes = [(N, streams, r), (N, S, r), (N, S, C), (streams, C), (streams, S, C)]  # q, k, x, gate, static
    inputs = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    assert torch.autograd.gradcheck(kernels._DepthMix.apply, inputs)
    q, k, x, gate, static = inputs
    a = (q @ k.transpose(1, 2) / r**0.5).softmax(dim=-1)  # the forward, written out
    expected = gate * (a @ x) + (x.unsqueeze(1) * static).sum(dim=2)
    assert (kernels._DepthMix.apply(*inputs) - expected).abs().max() < 1e-12


def test_the_depth_mixing_kernel_trains_under_bf16_autocast_like_the_reference():
    torch.manual_seed(0)
    fast = HierarchicalTransformer(tiny_config(ilt_kind="depth", n_layers=4))
    for p in fast.ilts.parameters():
        torch.nn.init.normal_(p, std=0.3)
    reference = HierarchicalTransformer(tiny_config(ilt_kind="depth", n_layers=4), cpu_kernels=False)
    reference.load_state_dict(fast.state_dict())
    idx = torch.randint(0, 97, (3, 20))
    for m in (fast, reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(m(idx).flatten(0, 1).float(), idx.roll(-1, 1).flatten())
        loss.backward()
        m.loss = loss.item()
    # the kernel mixes in fp32 where the reference rounds the attention weights and sources to bf16
    assert abs(fast.loss - reference.loss) < 1e-2
    for (name, p), q in zip(fast.ilts.named_parameters(), reference.ilts.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=0.1, atol=0.02 * q.grad.abs().max().item()), name


def test_the_model_builds_the_kernels_on_cpu_and_the_reference_when_asked():
    model = HierarchicalTransformer(tiny_config())
    assert all(type(m) is kernels.CheapDropout for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert all(type(m) is linear.OneDNNLinear for m in model.modules() if isinstance(m, torch.nn.Linear))
    reference = HierarchicalTransformer(tiny_config(), cpu_kernels=False)
    assert all(type(m) is torch.nn.Dropout for m in reference.modules() if isinstance(m, torch.nn.Dropout))
    assert not any(getattr(m, "cpu_kernels", False) for m in reference.modules())
    assert not any(type(m) is linear.OneDNNLinear for m in reference.modules())
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
    import hilt.model.layers as model_module

    sdpa_calls = []
    sdpa = model_module.F.scaled_dot_product_attention
    monkeypatch.setattr(
        model_module.F, "scaled_dot_product_attention", lambda *a, **k: sdpa_calls.append(1) or sdpa(*a, **k)
    )
    torch.manual_seed(0)
    attn = model_module.MultiHeadAttention(32, 4, dropout=0.0, paths=kernels.CPU_KERNELS)
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
    from hilt.model.kernels import CheapDropout as Dropout

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
    lowered = linear.MixedDtypeLinear(32, 48)
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


# --- decoding attention --------------------------------------------------------------------------------------


def _decode_inputs(dtype, B=16, H=8, D=32, max_len=64, S=40):
    """The engine's batched decoding step at the default model's heads (H 8, D 32): one query per row, keys
    and values as views of a longer cache, each row seeing its own number of keys."""
    cache_k, cache_v = (torch.randn(B, H, max_len, D, dtype=torch.float64) for _ in range(2))
    q = torch.randn(B, H, 1, D, dtype=torch.float64) * 2
    seen = torch.randint(1, S + 1, (B,))
    seen[0] = S  # the longest row sets S
    mask = (torch.arange(S) < seen[:, None])[:, None, None, :]  # (B, 1, 1, S)
    return *(t.to(dtype) for t in (q, cache_k[:, :, :S], cache_v[:, :, :S])), mask


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_attention_equals_the_reference_sdpa_with_a_mask_per_row(dtype, tolerance):
    q, k, v, mask = _decode_inputs(dtype)
    fast = kernels.decode_attention(q, k, v, mask)
    reference = F.scaled_dot_product_attention(q, k, v, mask)  # the path it replaces, at the same dtype
    assert fast.dtype == dtype and fast.shape == (16, 8, 1, 32)
    assert (fast.double() - reference.double()).abs().max() < tolerance
    # computed in fp32 and rounded once: within one rounding to dtype of the exact result on the same inputs
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), mask)
    assert ((fast.double() - exact).abs() <= exact.abs() * torch.finfo(dtype).eps + 1e-6).all()


def test_decode_attention_is_picked_for_one_masked_bf16_query_per_row_only():
    q, _, _, mask = _decode_inputs(torch.bfloat16)
    assert kernels.decode_attention_kernel(q, mask) is kernels.decode_attention
    assert kernels.decode_attention_kernel(q, None) is None  # a single row: the cache's length is its mask
    assert kernels.decode_attention_kernel(q.float(), mask) is None  # fp32: SDPA is as fast
    assert kernels.decode_attention_kernel(q.expand(-1, -1, 2, -1), mask) is None  # a prefill


def test_the_decoding_copy_runs_the_batched_step_through_the_kernel_with_the_references_logits(monkeypatch):
    from hilt.generation.decoding import DecodingAttention, lowered_copy
    from hilt.model.kv_cache import SlotCache

    model = HierarchicalTransformer(tiny_config(d_model=64, n_heads=2)).eval()
    lowered = lowered_copy(model, torch.bfloat16)
    assert all(type(layer.attn) is DecodingAttention for layer in lowered.layers)
    calls = []
    kernel = kernels.decode_attention
    monkeypatch.setattr(kernels, "decode_attention", lambda *a: calls.append(1) or kernel(*a))
    c = model.config
    seqs = [torch.randint(0, 97, (n,)).tolist() for n in (5, 17, 9)]
    new = torch.randint(0, 97, (3, 1))

    def step():
        cache = SlotCache(c.n_layers, 3, c.max_seq_len, c.n_heads, c.d_model // c.n_heads, torch.bfloat16)
        ids = torch.zeros(3, 17, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
        cache.bind([0, 1, 2], [len(s) for s in seqs], fresh=True)
        lowered(ids, cache=cache)
        cache.bind([0, 1, 2], [1, 1, 1], fresh=False)
        return lowered(new, cache=cache, positions=cache.positions(), attn_mask=cache.padding_mask())[:, -1]

    with torch.inference_mode():
        fast = step()
        assert len(calls) == c.n_layers  # the decoding call only; the prefill went through SDPA
        for layer in lowered.layers:
            layer.attn.cpu_kernels = False
        reference = step()
        assert len(calls) == c.n_layers
    assert (fast - reference).abs().max() < 0.05 * reference.abs().max()


def test_a_packed_bf16_linear_gives_onednns_bits_and_follows_the_onednn_switch():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    layer = linear.MixedDtypeLinear(256, 48).to(torch.bfloat16)
    inputs = [torch.randn(*shape) for shape in ((1, 256), (3, 256), (2, 5, 256))]  # fp32, cast by the layer

    def outputs(onednn: bool) -> tuple[list[torch.Tensor], bool]:
        before = torch.backends.mkldnn.enabled
        torch.backends.mkldnn.enabled = (
            onednn  # off: what hilt.generation.decoding.without_onednn does for one row
        )
        try:
            with torch.no_grad(), Ops() as ops:
                out = [layer(x) for x in inputs]
        finally:
            torch.backends.mkldnn.enabled = before
        return out, any("_linear_pointwise" in name for name in ops.names)

    (plain, _), (plain_without_onednn, _) = outputs(True), outputs(False)
    layer.pack()
    if layer.packed is None:
        pytest.skip("no oneDNN bf16 path on this machine")
    packed, used = outputs(True)
    assert used and all(torch.equal(a, b) for a, b in zip(packed, plain, strict=True))
    packed, used = outputs(
        False
    )  # single-row steps keep torch's own GEMV: faster with the weights out of cache
    assert not used and all(torch.equal(a, b) for a, b in zip(packed, plain_without_onednn, strict=True))


@pytest.mark.parametrize("vocab", [50260, 1024, 1000, 200])
@pytest.mark.parametrize("rows", [1, 16])
def test_greedy_tokens_equals_argmax_including_ties_and_the_last_chunk(vocab, rows):
    torch.manual_seed(vocab + rows)
    for logits in (
        torch.randn(rows, vocab),
        torch.randn(rows, vocab).round(),  # many ties: the first index of the maximum wins, as argmax's
        torch.zeros(rows, vocab),  # every entry ties
    ):
        for at in (None, 0, vocab - 1, 127, 128):  # the maximum alone at a chunk's edge or in the short tail
            x = logits.clone()
            if at is not None:
                x[:, at] = 50.0
            assert torch.equal(kernels.greedy_tokens(x), x.argmax(dim=-1))
    view = torch.randn(4, vocab)[1:3]  # rows of a larger tensor, as the engine's logits are
    assert torch.equal(kernels.greedy_tokens(view), view.argmax(dim=-1))


def test_a_packed_fp32_weight_computes_what_f_linear_does():
    weight, bias = torch.randn(300, 64), torch.randn(300)
    packed = linear.onednn_packed(weight, rows=83)
    if packed is None:
        pytest.skip("torch without oneDNN")
    for rows in (1, 5, 83, 200):  # laid out for 83 rows; any count runs on it
        x = torch.randn(rows, 64)
        torch.testing.assert_close(linear.onednn_linear(x, packed, bias), F.linear(x, weight, bias))
    assert linear.onednn_packed(weight.double()) is None  # float64 keeps torch's matmul


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 24), (3, 7, 24)])
@pytest.mark.parametrize("out_features", [8, 40])  # the weight gradient's two orientations: O < I and O >= I
def test_the_onednn_linear_equals_f_linear_forward_and_backward_in_fp32(bias, shape, out_features):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch without oneDNN")
    torch.manual_seed(0)
    layer = linear.OneDNNLinear(24, out_features, bias=bias)
    x = torch.randn(*shape, requires_grad=True)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "_OneDNNLinearBackward"
    grad = torch.randn_like(out)
    fast = torch.autograd.grad(out, [x, *layer.parameters()], grad)
    expected = F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(out, expected)
    for a, b in zip(fast, torch.autograd.grad(expected, [x, *layer.parameters()], grad), strict=True):
        torch.testing.assert_close(a, b)
    # an input that needs no gradient (the first layer's embedding output can): only the parameters get one
    frozen_input = torch.autograd.grad(layer(x.detach()).sum(), layer.weight)[0]
    torch.testing.assert_close(
        frozen_input, torch.autograd.grad(F.linear(x, layer.weight).sum(), layer.weight)[0]
    )


def test_the_onednn_linear_leaves_bf16_autocast_fp64_and_a_switched_off_onednn_to_f_linear(monkeypatch):
    layer = linear.OneDNNLinear(16, 8)
    x = torch.randn(4, 16)
    monkeypatch.setattr(linear, "_x86_with_avx", lambda: False)  # an ARM CPU: torch's own fp32 matmul stays
    assert type(layer(x).grad_fn).__name__ != "_OneDNNLinearBackward"
    assert linear.onednn_packed(layer.weight) is None
    monkeypatch.undo()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16  # autocast's own bf16 matmul
    assert torch.equal(layer.double()(x.double()), F.linear(x.double(), layer.weight, layer.bias))
    with torch.backends.mkldnn.flags(enabled=False):
        assert not linear.onednn_fp32(x, layer.weight.float())


def test_the_onednn_linear_traces_into_a_compiled_graph_without_a_break():
    # train.py --compile: a break at every linear layer would recompile per shape and soon fall back to eager
    layer = linear.OneDNNLinear(16, 8)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")  # fullgraph: a graph break raises
    x = torch.randn(4, 16)
    torch.testing.assert_close(compiled(x), F.linear(x, layer.weight, layer.bias))
