import math

import pytest
import torch
import torch.nn.functional as F

from hilt.model import (
    ILT_DIM,
    ILT_DROPOUT,
    MODULATION_SCALE_END,
    MODULATION_SCALE_START,
    N_LAYERS_ILT,
    NHEAD_ILT,
    DesignILT,
    HierarchicalTransformer,
    History,
    ModelConfig,
    PositionalEncoding,
)
from tests.conftest import tiny_config


def test_design_defaults():
    c = ModelConfig(vocab_size=50260)
    assert (c.d_model, c.n_layers, c.n_heads, c.d_ff, c.dropout, c.max_seq_len) == (
        256,
        6,
        8,
        1024,
        0.1,
        1024,
    )
    assert (ILT_DIM, NHEAD_ILT, N_LAYERS_ILT, ILT_DROPOUT) == (128, 2, 2, 0.1)
    assert (MODULATION_SCALE_START, MODULATION_SCALE_END) == (0.01, 0.1)
    assert (c.ilt_dim, c.nhead_ilt, c.n_layers_ilt, c.ilt_window) == (128, 2, 2, 2)


def test_config_is_keyword_only_and_validates():
    with pytest.raises(TypeError):
        ModelConfig(50260)  # type: ignore[misc]
    with pytest.raises(ValueError, match="n_heads"):
        ModelConfig(vocab_size=10, d_model=30, n_heads=8)
    with pytest.raises(ValueError, match="ilt_window"):
        ModelConfig(vocab_size=10, ilt_window=1)
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(vocab_size=10, dropout=1.5)
    with pytest.raises(ValueError, match="unknown ModelConfig fields: bogus"):
        ModelConfig.from_dict({"vocab_size": 10, "bogus": 1})


def test_logits_shape():
    model = HierarchicalTransformer(tiny_config())
    idx = torch.randint(0, 97, (2, 11))
    assert model(idx, modulation_scale=0.1).shape == (2, 11, 97)


def test_ilt_count_and_baseline_has_no_ilt_parameters():
    with_ilt = HierarchicalTransformer(tiny_config(n_layers=4))
    assert len(with_ilt.ilts) == 3 and with_ilt.num_parameters(ilt_only=True) > 0
    plain = HierarchicalTransformer(tiny_config(n_layers=4, n_layers_ilt=0))
    assert len(plain.ilts) == 0
    assert not any("ilt" in name for name, _ in plain.named_parameters())
    assert with_ilt.num_parameters() - plain.num_parameters() == with_ilt.num_parameters(ilt_only=True)


@pytest.mark.parametrize("n_layers_ilt", [0, 2])
def test_causality_future_tokens_never_change_earlier_logits(n_layers_ilt):
    model = HierarchicalTransformer(tiny_config(n_layers_ilt=n_layers_ilt)).eval()
    idx = torch.randint(0, 97, (1, 16))
    changed = idx.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 97
    a, b = model(idx), model(changed)
    assert torch.allclose(a[0, :10], b[0, :10], atol=1e-6)
    assert not torch.allclose(a[0, 10:], b[0, 10:])


def test_modulation_scale_zero_equals_plain_transformer_with_same_weights():
    """The ILTs only ever add modulation_scale * modulation: at scale 0 the model is its plain backbone."""
    model = HierarchicalTransformer(tiny_config()).eval()
    plain = HierarchicalTransformer(tiny_config(n_layers_ilt=0)).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("ilts.")})
    idx = torch.randint(0, 97, (2, 9))
    assert torch.equal(model(idx, modulation_scale=0.0), plain(idx))
    assert not torch.allclose(model(idx, modulation_scale=0.1), plain(idx))


def test_ilt_layer_mask_current_sees_previous_previous_sees_only_itself():
    torch.manual_seed(1)
    ilt = DesignILT(d_model=8, ilt_dim=8, n_heads=2, n_layers=1, dropout=0.0).eval()
    prev, cur = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    captured = {}
    ilt.layers[0].register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    ilt.modulation([prev, cur])
    out_a = captured.pop("out")  # (B*T, W=2, E)
    ilt.modulation([prev, cur + 1.0])  # change the current layer only
    out_b = captured.pop("out")
    assert torch.equal(out_a[:, 0], out_b[:, 0])  # the previous layer's slot never sees the current one
    ilt.modulation([prev + 1.0, cur])  # change the previous layer only
    out_c = captured.pop("out")
    assert not torch.allclose(out_a[:, 1], out_c[:, 1])  # the current layer's slot does see the previous one


def test_ilt_never_mixes_positions():
    ilt = DesignILT(d_model=8, ilt_dim=8, n_heads=2, n_layers=2, dropout=0.0).eval()
    prev, cur = torch.randn(1, 5, 8), torch.randn(1, 5, 8)
    base = ilt.modulation([prev, cur])
    prev2 = prev.clone()
    prev2[0, 3] += 5.0
    moved = ilt.modulation([prev2, cur])
    assert torch.equal(base[0, [0, 1, 2, 4]], moved[0, [0, 1, 2, 4]])
    assert not torch.allclose(base[0, 3], moved[0, 3])


def test_ilt_window_larger_than_two_runs_and_changes_output():
    idx = torch.randint(0, 97, (1, 7))
    torch.manual_seed(3)
    w2 = HierarchicalTransformer(tiny_config(n_layers=4, ilt_window=2)).eval()
    torch.manual_seed(3)
    w3 = HierarchicalTransformer(tiny_config(n_layers=4, ilt_window=3)).eval()
    assert w2.num_parameters() == w3.num_parameters()
    assert not torch.allclose(w2(idx), w3(idx))


def test_weight_tying_is_a_config_value():
    tied = HierarchicalTransformer(tiny_config())
    untied = HierarchicalTransformer(tiny_config(tie_weights=False))
    assert tied.head.weight is tied.embed.weight
    assert untied.head.weight is not untied.embed.weight
    assert untied.num_parameters() - tied.num_parameters() == 97 * 32


def test_sinusoidal_positions():
    pe = PositionalEncoding(d_model=8, max_seq_len=16)
    p = pe(0, 16)
    assert p.shape == (16, 8)
    assert torch.allclose(p[5, 0], torch.tensor(math.sin(5.0)))
    assert torch.allclose(p[5, 1], torch.tensor(math.cos(5.0)))
    assert torch.equal(pe(3, 2), p[3:5])
    with pytest.raises(ValueError, match="max_seq_len"):
        pe(10, 7)


def test_plain_model_matches_an_independent_reference_computation():
    """n_layers_ilt=0 is a standard pre-norm GPT; recompute it from its weights with torch primitives only."""
    cfg = tiny_config(n_layers_ilt=0, n_layers=2)
    model = HierarchicalTransformer(cfg).eval()
    idx = torch.randint(0, 97, (2, 10))
    W = model.state_dict()
    T, C, H = 10, cfg.d_model, cfg.n_heads
    pos = torch.arange(T)[:, None] * torch.exp(torch.arange(0, C, 2) * (-math.log(10000.0) / C))
    pe = torch.stack([pos.sin(), pos.cos()], dim=-1).flatten(1)  # interleaved sin, cos
    x = W["embed.weight"][idx] * math.sqrt(C) + pe
    mask = torch.full((T, T), float("-inf")).triu(1)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        h = F.layer_norm(x, (C,), W[p + "ln1.weight"], W[p + "ln1.bias"])
        q, k, v = (h @ W[p + "attn.qkv.weight"].T + W[p + "attn.qkv.bias"]).split(C, dim=-1)
        q, k, v = (t.view(2, T, H, C // H).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2) / math.sqrt(C // H) + mask).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(2, T, C)
        x = x + y @ W[p + "attn.proj.weight"].T + W[p + "attn.proj.bias"]
        h = F.layer_norm(x, (C,), W[p + "ln2.weight"], W[p + "ln2.bias"])
        h = F.gelu(h @ W[p + "ff.fc.weight"].T + W[p + "ff.fc.bias"])
        x = x + h @ W[p + "ff.proj.weight"].T + W[p + "ff.proj.bias"]
    x = F.layer_norm(x, (C,), W["ln_f.weight"], W["ln_f.bias"])
    expected = x @ W["embed.weight"].T
    assert torch.allclose(model(idx), expected, atol=1e-5)


def test_default_modulation_scale_is_the_configs_end_value():
    model = HierarchicalTransformer(tiny_config(modulation_scale_end=0.05)).eval()
    idx = torch.randint(0, 97, (1, 6))
    assert torch.equal(model(idx), model(idx, modulation_scale=0.05))


def test_positions_and_a_mask_make_a_left_padded_row_equal_the_row_alone():
    """What batches of rows of different lengths rely on (Hugging Face's left padding, the engine's slots)."""
    model = HierarchicalTransformer(tiny_config()).eval()
    row, pad = torch.randint(0, 97, (1, 6)), 3
    ids = torch.cat([torch.full((1, pad), 5), row], dim=1)  # (1, 9)
    real = torch.tensor([[False] * pad + [True] * 6])
    positions = (real.cumsum(1) - 1).clamp_min(0)  # each real token's index in its own sequence
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    mask = (causal & real[:, None, :]) | torch.eye(
        9, dtype=torch.bool
    )  # a pad query sees itself, not nothing
    with torch.no_grad():
        padded = model(ids, positions=positions, attn_mask=mask[:, None])[:, pad:]
        alone = model(row)
    assert (padded - alone).abs().max() < 1e-5


# --- the ILT kinds that read the whole layer history ---------------------------------------------------------

HISTORY_KINDS = ["depth", "dense", "x0"]


def history_model(kind: str, **overrides) -> HierarchicalTransformer:
    """A history kind with non-zero weights in its modules (they start at exactly 0)."""
    model = HierarchicalTransformer(tiny_config(ilt_kind=kind, ilt_rank=8, **overrides)).eval()
    with torch.no_grad():
        for p in model.ilts.parameters():
            p.normal_(0.0, 0.5)
    return model


def test_ilt_kind_and_rank_are_validated_with_the_allowed_values_named():
    """The kind and what it asks of the config are checked by the kind's class, when the model is built."""
    with pytest.raises(ValueError, match="ilt_kind must be one of design, depth, dense, x0; got 'deep'"):
        HierarchicalTransformer(ModelConfig(vocab_size=10, ilt_kind="deep"))
    with pytest.raises(ValueError, match=r"ilt_rank \(300\) must be at most d_model \(256\)"):
        HierarchicalTransformer(ModelConfig(vocab_size=10, ilt_kind="depth", ilt_rank=300))
    with pytest.raises(ValueError, match="ilt_rank must be a positive integer"):
        ModelConfig(vocab_size=10, ilt_rank=0)


def test_a_config_without_ilt_kind_loads_as_the_design():
    """Checkpoints written before the kinds existed carry no ilt_kind or ilt_rank."""
    old = {k: v for k, v in tiny_config().to_dict().items() if k not in ("ilt_kind", "ilt_rank")}
    assert ModelConfig.from_dict(old).ilt_kind == "design"
    assert ModelConfig(vocab_size=10).ilt_kind == "design"


@pytest.mark.parametrize("kind", HISTORY_KINDS)
def test_history_kind_starts_as_the_exact_plain_transformer(kind):
    torch.manual_seed(4)
    model = HierarchicalTransformer(tiny_config(ilt_kind=kind, ilt_rank=8)).eval()
    plain = HierarchicalTransformer(tiny_config(n_layers_ilt=0)).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("ilts.")})
    idx = torch.randint(0, 97, (2, 9))
    assert torch.equal(model(idx), plain(idx))
    assert len(model.ilts) == 3  # one module after every main layer


@pytest.mark.parametrize("kind", HISTORY_KINDS)
def test_history_kind_is_causal_and_never_mixes_positions(kind):
    model = history_model(kind)
    idx = torch.randint(0, 97, (1, 12))
    changed = idx.clone()
    changed[0, 7:] = (changed[0, 7:] + 1) % 97
    a, b = model(idx), model(changed)
    assert torch.allclose(a[0, :7], b[0, :7], atol=1e-6)
    assert not torch.allclose(a[0, 7:], b[0, 7:])
    # the module alone: a change at one position moves only that position's modulation
    ilt = model.ilts[1]
    sources = [torch.randn(1, 5, 32) for _ in range(2)]
    h, state = torch.randn(1, 5, 32), torch.randn(1, 5, 32)
    base, _ = ilt(h, History(x0=sources[0], scale=1.0, states=[sources[0], state], memo={"sources": sources}))
    x0 = sources[0].clone()
    x0[0, 3] += 5.0
    moved, _ = ilt(h, History(x0=x0, scale=1.0, states=[x0, state], memo={"sources": [x0, sources[1]]}))
    assert torch.equal(base[0, [0, 1, 2, 4]], moved[0, [0, 1, 2, 4]])
    assert not torch.allclose(base[0, 3], moved[0, 3])


def test_depth_module_computes_its_diagram():
    """modulation = gate * sum_s softmax(q . k_s / sqrt(r)) source_s + sum_s static_s * source_s, recomputed."""
    model = history_model("depth")
    ilt = model.ilts[2]  # after layer 3 of 3: reads x0, d_0, d_1, d_2
    sources = [torch.randn(2, 4, 32) for _ in range(4)]
    h = torch.randn(2, 4, 32)

    def history(keys):  # the layer's own contribution, h - its input, is the fourth source
        return History(
            x0=sources[0], scale=1.0, states=[h - sources[3]], memo={"sources": sources[:3], "keys": keys}
        )

    out, after = ilt(h, history([]))
    mod, keys = out - h, after.memo["keys"]
    rms = lambda t: t / t.pow(2).mean(-1, keepdim=True).add(torch.finfo(t.dtype).eps).sqrt()  # noqa: E731
    q = rms(h) @ ilt.query.weight.T  # (2, 4, r)
    k = torch.stack([rms(s) @ ilt.key.weight.T for s in sources], dim=2)  # (2, 4, S, r)
    a = ((q[:, :, None] * k).sum(-1) / math.sqrt(8)).softmax(-1)  # (2, 4, S)
    expected = ilt.gate[0] * sum(a[..., s, None] * sources[s] for s in range(4))
    expected = expected + sum(ilt.static[0, s] * sources[s] for s in range(4))
    assert (mod - expected).abs().max() < 1e-5
    assert len(keys) == 4
    # keys already made are reused, not recomputed: a module keys only the sources that are new to it
    again, _ = ilt(h, history([k[:, :, s] * 0 for s in range(3)]))
    assert not torch.allclose(again - h, mod)


def test_dense_is_the_depth_kind_without_its_attention():
    """dense: modulation = sum_s static_s * source_s over every source so far; the depth kind with its gate at 0
    and the same static weights computes the same model."""
    dense = history_model("dense")
    with torch.no_grad():
        for ilt in dense.ilts:
            ilt.static.normal_()
    ilt = dense.ilts[2]
    sources, h = [torch.randn(2, 4, 32) for _ in range(4)], torch.randn(2, 4, 32)
    out, _ = ilt(h, History(x0=sources[0], scale=1.0, states=[h - sources[3]], memo={"sources": sources[:3]}))
    assert (out - h - sum(ilt.static[0, s] * sources[s] for s in range(4))).abs().max() < 1e-5
    depth = history_model("depth")
    state = depth.state_dict()
    state.update((k, v) for k, v in dense.state_dict().items())
    depth.load_state_dict(state)
    with torch.no_grad():
        for module in depth.ilts:
            module.gate.zero_()
    idx = torch.randint(0, 97, (2, 8))
    assert torch.allclose(depth(idx), dense(idx), atol=1e-5)


@pytest.mark.parametrize("kind", HISTORY_KINDS)
def test_history_kind_in_generations_bf16_copy_computes_what_autocast_computes(kind):
    """hilt.generation.generate keeps bf16 matrices under an fp32 residual stream; the history modules must neither fail on
    the mixed dtypes nor compute anything autocast would not."""
    from hilt.generation.decoding import lowered_copy

    model = history_model(kind)
    idx = torch.randint(0, 97, (2, 7))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model.features(idx)
    with torch.no_grad():
        assert torch.equal(lowered_copy(model, torch.bfloat16).features(idx), expected)


def test_a_narrow_design_model_still_builds_its_rank_only_bounds_the_depth_kinds():
    """Checkpoints of models narrower than the default ilt_rank were written before ilt_rank existed."""
    HierarchicalTransformer(ModelConfig(vocab_size=97, d_model=16, n_heads=2, ilt_dim=8))
    with pytest.raises(ValueError, match="ilt_rank"):
        HierarchicalTransformer(ModelConfig(vocab_size=97, d_model=16, n_heads=2, ilt_kind="depth"))


def test_a_checkpoint_config_of_a_removed_variant_is_refused_in_one_line_and_one_without_it_loads():
    """The ablation's rejected variants are gone; configs saved before that still load where they were off."""
    old = {**tiny_config().to_dict(), "ilt_zero_init": False, "ilt_gate": False, "ilt_embed": False}
    assert ModelConfig.from_dict(old) == tiny_config()
    for name, value in (("ilt_gate", True), ("ilt_embed", True), ("ilt_kind", "depth_multiway")):
        with pytest.raises(ValueError, match=f"{name}.*no longer builds; HILT at commit ab15cea"):
            ModelConfig.from_dict({**old, name: value})
