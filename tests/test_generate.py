import subprocess
import sys

import pytest
import torch

from hilt.cli import main
from hilt.data.tokenizer import Tokenizer
from hilt.generation.decoding import cache_dtype
from hilt.generation.generate import beam_search, generate, stream_tokens
from hilt.generation.sampling import (
    TextStreamer,
    context_start,
    draw,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)
from hilt.model import HierarchicalTransformer
from hilt.model.kv_cache import KVCache
from tests.conftest import REPO, save_untrained_checkpoint, tiny_config


def tiny_model(**overrides) -> HierarchicalTransformer:
    # a strong modulation (1.0 instead of 0.1) and a 3-layer ILT window make a wrong cached ILT path show
    values = dict(modulation_scale_end=1.0, ilt_window=3)
    values.update(overrides)
    model = HierarchicalTransformer(tiny_config(**values)).eval()
    if model.config.ilt_kind != "design":  # the history kinds start at exactly 0: give them weights that show
        with torch.no_grad():
            for p in model.ilts.parameters():
                p.normal_(0.0, 0.5)
    return model


EVERY_ILT_KIND = ["design", "depth", "dense", "x0"]


def greedy(model, ids, n, **kw):
    return generate(model, ids, n, temperature=0.0, **kw)


# --- sampling filters ----------------------------------------------------------------------------------------


def test_temperature_zero_is_argmax():
    logits = torch.randn(4, 97)
    assert torch.equal(sample_next_token(logits, temperature=0.0), logits.argmax(-1))


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0, 2.0]])
    kept = top_k_filter(logits, 2).isfinite()
    assert kept.sum() == 2 and kept[0, [1, 2, 3]].sum() == 2
    assert top_k_filter(logits, 4).isfinite().sum() == 4
    draws = torch.stack(
        [sample_next_token(logits, top_k=2, generator=torch.Generator().manual_seed(s)) for s in range(50)]
    )
    assert set(draws.flatten().tolist()) <= set(kept[0].nonzero().flatten().tolist())


@pytest.mark.parametrize(
    "p, kept",
    [
        (0.01, [0]),
        (0.5, [0]),
        (0.51, [0, 1]),
        (0.8, [0, 1]),
        (0.81, [0, 1, 2]),
        (0.99, [0, 1, 2, 3]),
        (1.0, [0, 1, 2, 3]),
    ],
)
def test_top_p_keeps_the_smallest_set_reaching_p(p, kept):
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])  # sorted: 0.5 (id 1), 0.3 (3), 0.15 (0), 0.05 (2)
    order = [1, 3, 0, 2]
    filtered = top_p_filter(probs.log(), p)
    assert sorted(filtered[0].isfinite().nonzero().flatten().tolist()) == sorted(order[i] for i in kept)
    # the kept tokens keep their logits, so their relative probabilities are unchanged
    assert torch.allclose(filtered[0, order[0]], probs.log()[0, order[0]])


# a peaked row (a short nucleus) and a flat one (thousands of tokens)
@pytest.mark.parametrize("scale", [8.0, 0.05])
def test_top_p_keeps_what_a_full_sort_keeps_over_gpt2s_vocabulary(scale):
    logits = torch.randn(3, 50260, generator=torch.Generator().manual_seed(0)) * scale
    for p in (0.1, 0.9, 0.999):
        sorted_probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
        needed = sorted_probs.cumsum(dim=-1) - sorted_probs < p
        needed[:, 0] = True
        expected = torch.zeros_like(needed).scatter(-1, order, needed)
        assert torch.equal(top_p_filter(logits, p).isfinite(), expected)


def test_draws_follow_the_distribution_and_never_pick_an_impossible_token():
    probs = torch.tensor([[0.1, 0.0, 0.2, 0.3, 0.4, 0.0]]).expand(40000, -1)
    ids = draw(probs, torch.Generator().manual_seed(0))
    counts = torch.bincount(ids, minlength=6).double() / len(ids)
    assert counts[1] == 0 and counts[5] == 0  # zero probability, also as the last entry
    sd = (probs[0].double() * (1 - probs[0].double()) / len(ids)).sqrt()
    assert ((counts - probs[0].double()).abs() <= 4 * sd + 1e-12).all(), counts
    # one row at a time with its own generator gives what the whole batch gives: each row uses one number
    one = torch.Generator().manual_seed(0)
    assert [int(draw(probs[:1], one)) for _ in range(5)] == ids[:5].tolist()


def test_sampling_is_reproducible_with_a_seeded_generator():
    logits = torch.randn(3, 97)
    a = [sample_next_token(logits, temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(5))]
    b = [sample_next_token(logits, temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(5))]
    assert torch.equal(a[0], b[0])


# --- the KV cache is exact -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ilt_kind", EVERY_ILT_KIND)
def test_cached_logits_of_every_step_equal_a_full_recomputation(ilt_kind):
    model = tiny_model(ilt_kind=ilt_kind)
    seq = torch.randint(0, 97, (2, 40))
    cache = KVCache(model.config.n_layers, 64)
    with torch.inference_mode():
        full = model(seq)  # (2, 40, V)
        steps = [model(seq[:, :5], cache=cache)]  # prefill
        steps.append(
            model(seq[:, 5:9], cache=cache)
        )  # several new tokens after cached ones (bottom-right mask)
        steps += [model(seq[:, t : t + 1], cache=cache) for t in range(9, 40)]  # one at a time
    assert cache.length == 40
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-4
    # the ILTs matter here, so equality above includes the modulated path
    if ilt_kind == "design":
        with torch.inference_mode():
            assert (model(seq, modulation_scale=0.0) - full).abs().max() > 1e-2
    else:  # the history kinds ignore modulation_scale: without their weights the logits change
        with torch.no_grad():
            for p in model.ilts.parameters():
                p.zero_()
            assert (model(seq) - full).abs().max() > 1e-2


def test_a_wider_cache_holds_bf16_keys_exactly_and_attends_in_its_dtype():
    # decoding keeps an fp32 cache under bf16 compute on CPU (faster attention); the keys are the bf16 ones
    assert cache_dtype(torch.bfloat16, torch.device("cpu")) == torch.float32
    model = tiny_model().to(torch.bfloat16)
    seq = torch.randint(0, 97, (2, 24))
    wide, narrow = KVCache(model.config.n_layers, 32, torch.float32), KVCache(model.config.n_layers, 32)
    with torch.inference_mode():
        full = model(seq).float()
        steps = {c: [model(seq[:, :6], cache=c)] for c in (wide, narrow)}
        for c in (wide, narrow):
            steps[c] += [model(seq[:, t : t + 1], cache=c) for t in range(6, 24)]
    assert wide.k.dtype == torch.float32 and narrow.k.dtype == torch.bfloat16
    assert torch.equal(wide.k, wide.k.bfloat16().float())  # nothing finer than bf16 was stored
    assert torch.equal(wide.k[0].bfloat16(), narrow.k[0])  # same inputs to layer 0: the same keys
    for c in (wide, narrow):
        logits = torch.cat(steps[c], dim=1)
        assert logits.dtype == torch.bfloat16
        error = (logits.float() - full).abs().max()
        assert error < 0.1  # bf16 rounding of ~unit logits, not a different model


def test_cached_keys_and_values_come_from_the_modulated_hidden_states():
    model = tiny_model()
    seq = torch.randint(0, 97, (1, 12))
    captured = []
    hooks = [
        layer.attn.qkv.register_forward_hook(lambda m, i, o: captured.append(o)) for layer in model.layers
    ]
    with torch.inference_mode():
        model(seq)  # full path: layer i's qkv reads layer i-1's modulated output
        for h in hooks:
            h.remove()
        cache = KVCache(model.config.n_layers, 16)
        for t in range(12):
            model(seq[:, t : t + 1], cache=cache)
    C, H = model.config.d_model, model.config.n_heads
    for i, qkv in enumerate(captured):
        k = qkv[..., C : 2 * C].view(1, 12, H, C // H).transpose(1, 2)  # (B, H, T, D)
        v = qkv[..., 2 * C :].view(1, 12, H, C // H).transpose(1, 2)
        assert (cache.k[i, :, :, :12] - k).abs().max() < 1e-5
        assert (cache.v[i, :, :, :12] - v).abs().max() < 1e-5


@pytest.mark.parametrize("ilt_kind", EVERY_ILT_KIND)
def test_greedy_200_tokens_identical_with_and_without_cache_across_the_sliding_window(ilt_kind):
    model = tiny_model(max_seq_len=48, ilt_kind=ilt_kind)  # 200 new tokens slide the window several times
    ids = torch.randint(0, 97, (1, 7))
    cached, uncached = greedy(model, ids, 200, use_cache=True), greedy(model, ids, 200, use_cache=False)
    assert cached.shape == (1, 207)
    assert torch.equal(cached, uncached)


def test_bf16_decoding_computes_what_trainings_autocast_computes_and_the_cache_changes_nothing():
    import torch.nn.functional as F

    model = tiny_model(max_seq_len=32)
    ids = torch.randint(0, 97, (1, 5))
    out = greedy(model, ids, 40, use_cache=True, compute_dtype=torch.bfloat16)
    assert torch.equal(out, greedy(model, ids, 40, use_cache=False, compute_dtype=torch.bfloat16))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        for n in range(5, 25):  # within the first window, so plain features of the prefix are the context
            hidden = model.features(out[:, :n])[:, -1]
            logits = F.linear(hidden.bfloat16(), model.head.weight.bfloat16())
            assert out[0, n] == logits.float().argmax(-1)


def test_lowered_copy_matches_autocast_exactly_and_leaves_the_model_alone():
    from hilt.generation.decoding import lowered_copy

    model = tiny_model().train()
    before = {name: (p.dtype, p.data_ptr(), p.clone()) for name, p in model.named_parameters()}
    lowered = lowered_copy(model, torch.bfloat16)
    assert not lowered.training and model.training
    assert lowered.layers[0].ff.fc.weight.dtype == lowered.ilts[0].proj_in.weight.dtype == torch.bfloat16
    # the embedding (tied to the head) and the norms are shared, not copied
    assert (
        lowered.embed.weight is model.embed.weight
        and lowered.layers[0].ln1.weight is model.layers[0].ln1.weight
    )
    for name, p in model.named_parameters():
        dtype, ptr, values = before[name]
        assert (p.dtype, p.data_ptr()) == (dtype, ptr) and torch.equal(p, values)
    ids = torch.randint(0, 97, (2, 12))
    model.eval()
    with torch.no_grad():
        with torch.autocast("cpu", torch.bfloat16):
            expected = model.features(ids)
        assert torch.equal(lowered.features(ids), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("overrides", [{}, {"ilt_window": 3}, {"ilt_kind": "depth"}])
def test_the_decoding_layers_compute_the_reference_layers_bit_for_bit(dtype, overrides):
    """DecodingLayer and DecodingILT skip module calls only: prefill and a cached single-row step (the engine's and
    hilt.generation.generate's, with oneDNN off as they run it) give the same bits as the reference classes on the same copy."""
    from hilt.generation.decoding import DecodingILT, DecodingLayer, lowered_copy, onednn_disabled

    model = tiny_model(**overrides)
    lowered = lowered_copy(model, dtype)
    layers = [m for m in lowered.modules() if type(m) in (DecodingLayer, DecodingILT)]
    assert len(layers) == model.config.n_layers + (
        model.config.n_layers_ilt * (model.config.n_layers - 1) + model.config.n_layers - 1
        if model.config.ilt_kind == "design"
        else 0
    )
    prompt, step = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (1, 1))

    def run(copy):
        cache = KVCache(model.config.n_layers, model.config.max_seq_len)
        with torch.inference_mode():
            prefill = copy.features(prompt)
            copy.features(prompt[:1], cache=cache)
            with onednn_disabled():
                return prefill, copy.features(step, cache=cache)

    reference_copy = lowered_copy(model, dtype, decoding_layers=False)
    assert not any(type(m) in (DecodingLayer, DecodingILT) for m in reference_copy.modules())
    fast, reference = run(lowered), run(reference_copy)
    assert all(torch.equal(a, b) for a, b in zip(fast, reference, strict=True))


def test_the_decoding_layers_take_the_reference_in_training_mode():
    from hilt.generation.decoding import lowered_copy
    from hilt.model import DesignILT, TransformerLayer

    lowered = lowered_copy(tiny_model(dropout=0.5, ilt_dropout=0.5), torch.float32).train()
    x = torch.randn(2, 5, lowered.config.d_model)
    outputs = []
    for forward in (lambda: lowered.layers[0](x), lambda: TransformerLayer.forward(lowered.layers[0], x)):
        torch.manual_seed(0)
        outputs.append(forward())
    for forward in (
        lambda: lowered.ilts[0].modulation([x, x]),
        lambda: DesignILT.modulation(lowered.ilts[0], [x, x]),
    ):
        torch.manual_seed(0)
        outputs.append(forward())
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[2], outputs[3])
    torch.manual_seed(1)
    assert not torch.equal(
        lowered.layers[0](x), outputs[0]
    )  # dropout is on: training really is the reference


def test_the_decoding_copy_is_built_once_and_rebuilt_when_the_weights_change():
    from hilt.generation.decoding import decoding_weights, forget_decoding_weights

    model = tiny_model()
    lowered, head = decoding_weights(model, torch.bfloat16)
    assert decoding_weights(model, torch.bfloat16)[0] is lowered  # kept between calls
    assert decoding_weights(model, torch.float16)[0] is not lowered  # one per dtype
    ids = torch.randint(0, 97, (1, 6))

    def features_agree():
        fresh = lowered_copy_of(model)
        current, _ = decoding_weights(model, torch.bfloat16)
        with torch.no_grad():
            return torch.equal(current.features(ids), fresh.features(ids)), current

    # an optimizer step writes into the same storage: caught by the sampled checksum (every trained element moves)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    same, after_step = features_agree()
    assert same and after_step is not lowered

    # load_state_dict copies into the same storage too: caught by the post-hook
    other = tiny_model()
    model.load_state_dict(other.state_dict())
    same, after_load = features_agree()
    assert same and after_load is not after_step
    assert torch.equal(decoding_weights(model, torch.bfloat16)[1].weight, other.head.weight.bfloat16())
    # an in-place edit that goes through neither: caught by the sampled checksum
    with torch.no_grad():
        model.layers[1].ff.fc.weight.mul_(2)
    same, after_edit = features_agree()
    assert same and after_edit is not after_load
    # nothing changed: the same copy; forgetting it builds a new one
    assert decoding_weights(model, torch.bfloat16)[0] is after_edit
    forget_decoding_weights(model)
    assert decoding_weights(model, torch.bfloat16)[0] is not after_edit


def lowered_copy_of(model):
    from hilt.generation.decoding import lowered_copy

    return lowered_copy(model, torch.bfloat16)


def test_generate_calls_reuse_the_decoding_copy(monkeypatch):
    from hilt.generation import decoding as decoding_module

    built = []
    real = decoding_module.lowered_copy
    monkeypatch.setattr(decoding_module, "lowered_copy", lambda m, d: built.append(d) or real(m, d))
    model = tiny_model()
    ids = torch.randint(0, 97, (1, 4))
    first = greedy(model, ids, 5, compute_dtype=torch.bfloat16)
    assert torch.equal(greedy(model, ids, 5, compute_dtype=torch.bfloat16), first)
    assert built == [torch.bfloat16]


def test_single_row_steps_run_without_onednn_and_the_setting_comes_back(monkeypatch):
    from hilt.generation import decoding as decoding_module

    seen = []  # (rows, oneDNN on?) of every model call
    real = decoding_module.lowered_copy

    def spying_copy(model, dtype):
        lowered = real(model, dtype)
        features = lowered.features
        monkeypatch.setattr(
            lowered,
            "features",
            lambda ids, **k: seen.append((ids.numel(), torch.backends.mkldnn.enabled)) or features(ids, **k),
        )
        return lowered

    monkeypatch.setattr(decoding_module, "lowered_copy", spying_copy)
    before = torch.backends.mkldnn.enabled
    steps = stream_tokens(
        tiny_model(), torch.randint(0, 97, (1, 5)), 4, temperature=0, compute_dtype=torch.bfloat16
    )
    next(steps), next(steps)
    assert torch.backends.mkldnn.enabled == before  # between steps, while the caller holds the stream
    list(steps)
    assert seen == [(5, before), (1, False), (1, False), (1, False)]  # the prefill keeps oneDNN
    assert torch.backends.mkldnn.enabled == before


@pytest.mark.parametrize("ilt_kind", EVERY_ILT_KIND)
def test_beam_search_identical_with_and_without_cache(ilt_kind):
    model = tiny_model(max_seq_len=32, ilt_kind=ilt_kind)
    ids = torch.randint(0, 97, (1, 5))
    a = beam_search(model, ids, 60, beam_width=4, use_cache=True)
    b = beam_search(model, ids, 60, beam_width=4, use_cache=False)
    assert a.shape == (1, 65) and torch.equal(a, b)


def test_beam_width_one_equals_greedy_including_the_stop_at_eos():
    model = tiny_model()
    ids = torch.randint(0, 97, (1, 5))
    g = greedy(model, ids, 30)
    assert torch.equal(beam_search(model, ids, 30, beam_width=1), g)
    eos = g[0, 5 + 12].item()  # a token greedy produces: both must stop right after its first occurrence
    g_eos = greedy(model, ids, 30, eos_token_id=eos)
    assert g_eos[0, -1] == eos and (g_eos[0, 5:] == eos).sum() == 1
    assert torch.equal(beam_search(model, ids, 30, beam_width=1, eos_token_id=eos), g_eos)


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy():
    model = tiny_model()
    ids = torch.randint(0, 97, (1, 4))

    def logprob(seq):
        with torch.inference_mode():
            lp = model(seq[:, :-1]).log_softmax(-1)[0, 3:]
        return lp.gather(-1, seq[0, 4:, None]).sum().item()

    assert (
        logprob(beam_search(model, ids, 8, beam_width=5, length_penalty=0.0))
        >= logprob(greedy(model, ids, 8)) - 1e-5
    )


# --- the decoding loop ---------------------------------------------------------------------------------------


def test_context_start_slides_by_quarters_and_never_exceeds_the_context():
    assert [context_start(n, 64) for n in (1, 64, 65, 80, 81, 200)] == [0, 0, 16, 16, 32, 144]
    assert all(n - context_start(n, 64) <= 64 for n in range(1, 500))
    assert all(n - context_start(n, 1) == 1 for n in range(1, 10))


def test_eos_stops_each_row_and_pads_rows_that_finished():
    model = tiny_model()
    ids = torch.randint(0, 97, (3, 4))
    free = greedy(model, ids, 20)
    eos = free[1, 4 + 2].item()  # row 1 produces it at step 3
    out = greedy(model, ids, 20, eos_token_id=eos)
    ends = []
    for row in range(3):
        hits = (free[row, 4:] == eos).nonzero().flatten().tolist()
        end = 4 + hits[0] + 1 if hits else 24  # through the first <EOS>
        assert torch.equal(out[row, :end], free[row, :end])
        assert (out[row, end:] == eos).all()
        ends.append(end)
    assert out.size(1) == max(ends)  # stops as soon as every row is done


def test_generation_uses_eval_mode_and_restores_training_mode():
    model = tiny_model(dropout=0.5, ilt_dropout=0.5).train()
    ids = torch.randint(0, 97, (1, 4))
    a, b = greedy(model, ids, 20), greedy(model, ids, 20)
    assert torch.equal(a, b)  # no dropout while generating
    assert model.training


def test_seeded_sampling_repeats_and_the_stream_matches_generate():
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 3))
    kw = dict(temperature=0.9, top_k=20, top_p=0.95)
    a = generate(model, ids, 30, generator=torch.Generator().manual_seed(1), **kw)
    b = generate(model, ids, 30, generator=torch.Generator().manual_seed(1), use_cache=False, **kw)
    steps = list(stream_tokens(model, ids, 30, generator=torch.Generator().manual_seed(1), **kw))
    assert torch.equal(a, b) and torch.equal(a[:, 3:], torch.stack(steps, dim=1))
    assert not torch.equal(a, generate(model, ids, 30, generator=torch.Generator().manual_seed(2), **kw))


def test_streamed_text_splits_multibyte_characters_correctly():
    tok = Tokenizer.load()
    text = "héllo 日本語 🙂 ok"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # the test needs tokens that split a character
    streamer = TextStreamer(tok)
    pieces = [streamer.push(i) for i in ids] + [streamer.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


# --- the command ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_untrained_checkpoint(tmp_path_factory.mktemp("ckpt"))


def run_cli(capsys, *args):
    code = main(["generate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_greedy_is_the_same_with_and_without_cache_and_seeds_repeat(checkpoint, capsys):
    base = ["--model_path", checkpoint, "--prompt", "There was", "--max_len", "40"]
    _, greedy_plain, _ = run_cli(capsys, *base, "--temperature", "0")
    _, greedy_cached, _ = run_cli(capsys, *base, "--temperature", "0", "--use_cache")
    assert greedy_plain == greedy_cached and greedy_plain.startswith("There was")
    sample = [*base, "--temperature", "0.8", "--top_p", "0.9", "--seed", "7", "--num_samples", "2"]
    code, first, _ = run_cli(capsys, *sample)
    _, again, _ = run_cli(capsys, *sample, "--use_cache")
    _, streamed, _ = run_cli(capsys, *sample, "--stream")
    _, other_seed, _ = run_cli(
        capsys, *base, "--temperature", "0.8", "--top_p", "0.9", "--seed", "8", "--num_samples", "2"
    )
    assert code == 0 and first == again == streamed != other_seed
    assert first.count("--- sample ") == 2
    code, beams, _ = run_cli(capsys, *base, "--use_beam_search", "--beam_width", "3", "--use_cache")
    assert code == 0 and beams.startswith("There was")


def test_cli_runs_the_head_in_trainings_autocast_dtype_and_no_amp_keeps_fp32(checkpoint, capsys, monkeypatch):
    import hilt.generation.engine as engine_module
    from hilt.device import autocast_dtype

    seen = []
    real = engine_module.Engine.start

    def spying_start(engine):
        seen.append((engine.compute_dtype, engine.head.weight.dtype if hasattr(engine, "head") else None))
        result = real(engine)
        seen[-1] = (engine.compute_dtype, engine.head.weight.dtype)
        return result

    monkeypatch.setattr(engine_module.Engine, "start", spying_start)
    base = ["--model_path", checkpoint, "--max_len", "3", "--device", "cpu"]
    assert run_cli(capsys, *base)[0] == run_cli(capsys, *base, "--no_amp")[0] == 0
    bf16 = autocast_dtype(torch.device("cpu"))
    assert seen == [(bf16, bf16 or torch.float32), (None, torch.float32)]


def test_cli_threads_sets_the_threads_the_engine_decodes_with(checkpoint, capsys, monkeypatch):
    import hilt.generation.engine as engine_module

    seen = []
    real = engine_module.Engine._step

    def spying_step(engine):
        seen.append(torch.get_num_threads())  # on the engine's own decode thread
        real(engine)

    monkeypatch.setattr(engine_module.Engine, "_step", spying_step)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # so that the flag has something to change, whatever the machine's default
    try:
        code, out, _ = run_cli(capsys, "--model_path", checkpoint, "--max_len", "3", "--threads", "1")
    finally:
        torch.set_num_threads(before)
    assert code == 0 and out and seen and set(seen) == {1}


def test_cli_empty_prompt_starts_from_bos(checkpoint, capsys):
    code, out, err = run_cli(
        capsys, "--model_path", checkpoint, "--prompt", "", "--max_len", "5", "--seed", "0"
    )
    assert code == 0 and out.strip() and not err


def test_cli_long_prompt_is_cut_from_the_left_with_a_warning(checkpoint, capsys):
    code, out, err = run_cli(
        capsys,
        "--model_path",
        checkpoint,
        "--prompt",
        "word " * 50,
        "--max_len",
        "50",
        "--temperature",
        "0",
        "--use_cache",
    )
    assert code == 0 and "longer than the model's context of 32" in err and out.startswith("word word")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "-0.5"], "--temperature must be >= 0"),
        (["--top_p", "0"], "--top_p must be in (0, 1]"),
        (["--top_p", "1.5"], "--top_p must be in (0, 1]"),
        (["--top_k", "0"], "--top_k must be >= 1"),
        (["--beam_width", "0", "--use_beam_search"], "--beam_width must be >= 1"),
        (["--max_len", "0"], "--max_len must be >= 1"),
        (["--model_dim", "128"], "another architecture: d_model=128"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_cli_bad_flags_are_one_clear_line(checkpoint, capsys, flags, message):
    code, out, err = run_cli(capsys, "--model_path", checkpoint, *flags)
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err and not out


@pytest.mark.parametrize("damage", ["missing", "truncated", "corrupt"])
def test_cli_bad_checkpoints_are_one_clear_line(checkpoint, tmp_path, capsys, damage):
    path = tmp_path / "model.pt"
    data = open(checkpoint, "rb").read()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "corrupt":
        path.write_bytes(b"not a checkpoint at all" * 100)
    code, out, err = run_cli(capsys, "--model_path", str(path))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and not out


def test_inference_script_runs_the_generate_command(checkpoint):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "inference.py"),
            "--model_path",
            checkpoint,
            "--prompt",
            "Hi",
            "--max_len",
            "3",
            "--temperature",
            "0",
            "--use_cache",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hi")


def test_importing_the_decoding_module_hooks_no_optimizer():
    """A decoding copy is its user's business: importing hilt.generation.decoding registers no process-wide hook."""
    import subprocess
    import sys

    code = (
        "import torch.optim.optimizer as o; before = len(o._global_optimizer_post_hooks); import hilt.generation.decoding; "
        "import hilt.generation.engine; import hilt.generation.generate; print(before, len(o._global_optimizer_post_hooks))"
    )
    before, after = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert before == after
