import json

import numpy as np
import pytest
import torch

from hilt.checkpoint.store import FORMAT_VERSION, atomic_save
from hilt.cli import main
from hilt.data.batches import TokenBatches
from hilt.errors import UserError
from hilt.evaluation.inspect import attention_weights, ilt_stats
from hilt.model import HierarchicalTransformer
from hilt.training.run import TrainConfig, Trainer
from tests.conftest import tiny_config


def test_attention_weights_reproduce_the_fused_attention_output():
    model = HierarchicalTransformer(tiny_config(ilt_window=3)).eval()
    attn = model.ilts[0].layers[0].attn
    x = torch.randn(5, 3, 16)  # (N, W, E): five layer sequences of three layers
    w = attention_weights(attn, x)  # (N, H, W, W)
    assert w.shape == (5, 2, 3, 3)
    assert torch.allclose(w.sum(-1), torch.ones(5, 2, 3))
    assert (w.triu(diagonal=1) == 0).all()  # an older layer never attends to a newer one
    v = attn.qkv(x).split(16, dim=2)[2].view(5, 3, 2, 8).transpose(1, 2)  # (N, H, W, D)
    y = (w @ v).transpose(1, 2).reshape(5, 3, 16)
    assert torch.allclose(attn.proj(y), attn(x), atol=1e-6)


def test_ratio_is_linear_in_the_scale_and_layers_are_labelled():
    model = HierarchicalTransformer(tiny_config(n_layers=4))
    idx = torch.randint(0, 97, (2, 10))
    small, large = ilt_stats(model, idx, 0.1), ilt_stats(model, idx, 0.2)
    # the first ILT's inputs do not depend on the scale, so its ratio doubles exactly
    assert large["ratio"][0] == pytest.approx(2 * small["ratio"][0], rel=1e-5)
    assert small["scale"] == [0.1, 0.1, 0.1] and all(r > 0 for r in small["ratio"])
    assert small["labels"] == [["L1", "L2"], ["L2", "L3"], ["L3", "L4"]]
    for mats, prev in zip(small["attn"], small["attn_prev"], strict=True):
        assert len(mats) == 2 and mats[0][0] == [1.0, 0.0]  # the oldest layer can only attend to itself
        assert prev == pytest.approx(sum(m[1][0] for m in mats) / 2)
    assert model.training  # restored


def test_stats_draw_no_random_numbers():
    model = HierarchicalTransformer(tiny_config())
    idx = torch.randint(0, 97, (1, 5))
    before = torch.get_rng_state()
    ilt_stats(model, idx)
    assert torch.equal(before, torch.get_rng_state())


def test_plain_transformer_has_nothing_to_inspect():
    with pytest.raises(UserError, match="no ILTs"):
        ilt_stats(HierarchicalTransformer(tiny_config(n_layers_ilt=0)), torch.zeros(1, 3, dtype=torch.long))


def _trainer(tmp_path, every: int) -> Trainer:
    torch.manual_seed(0)
    tokens = np.random.default_rng(0).integers(0, 97, size=600).astype(np.uint16)
    cfg = TrainConfig(
        text_file="unused", batch_size=4, seq_len=16, epochs=1, amp=False, out_dir=str(tmp_path)
    )
    cfg.ilt_stats_every = every
    model = HierarchicalTransformer(tiny_config(dropout=0.1, ilt_dropout=0.1))
    train, val = TokenBatches(tokens[:500], 16, 4, seed=0), TokenBatches(tokens[500:], 16, 4, shuffle=False)
    return Trainer(model, cfg, train, val, device=torch.device("cpu"))


def test_trainer_logs_ilt_stats_every_n_steps_without_changing_training(tmp_path):
    logged = _trainer(tmp_path / "a", every=3)
    (tmp_path / "a").mkdir()
    logged.fit()
    quiet = _trainer(tmp_path / "b", every=0)
    (tmp_path / "b").mkdir()
    quiet.fit()
    a, b = logged.model.state_dict(), quiet.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical weights: the stats drew no random numbers
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    ilt = [r for r in records if r["kind"] == "ilt"]
    assert [r["step"] for r in ilt] == [3, 6, 7]  # every 3 steps, then at the end of the (7-step) epoch
    assert len(ilt[0]["ratio"]) == 2 and len(ilt[0]["attn"][0]) == 2 and "labels" not in ilt[0]
    assert not any(r["kind"] == "ilt" for r in map(json.loads, (tmp_path / "b" / "metrics.jsonl").open()))


def test_hilt_inspect_prints_and_saves_a_heat_map(tmp_path, capsys):
    from hilt.data.tokenizer import Tokenizer

    config = tiny_config(vocab_size=Tokenizer.load().vocab_size)
    ckpt = {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "model_state_dict": HierarchicalTransformer(config).state_dict(),
    }
    atomic_save(ckpt, tmp_path / "m.pt")
    out = tmp_path / "ilt.png"
    argv = ["inspect", "--model_path", str(tmp_path / "m.pt"), "--prompt", "ROMEO: hello", "--out", str(out)]
    assert main([*argv, "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "ILT 1 (after layer 2, mixes L1, L2)" in printed and "ILT 2" in printed
    assert "inner layer 2: L3 attends to L2" in printed
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert main(["inspect", "--model_path", str(tmp_path / "m.pt"), "--prompt", ""]) == 2
    assert "--prompt is empty" in capsys.readouterr().err


# --- the ILT kinds that read the whole layer history ---------------------------------------------------------


def test_history_kind_stats_average_the_attention_over_sources():
    torch.manual_seed(2)
    model = HierarchicalTransformer(tiny_config(ilt_kind="depth", ilt_rank=8))
    fresh = ilt_stats(model, torch.randint(0, 97, (2, 9)))
    # zero-initialised: the softmax over sources starts uniform and nothing is added yet
    assert fresh["ratio"] == [0.0, 0.0, 0.0] and fresh["scale"] == [1.0, 1.0, 1.0]
    assert fresh["attn"][0] == [[0.5, 0.5]] and fresh["attn"][2] == [[0.25] * 4]
    assert fresh["labels"] == [["emb", "L1"], ["emb", "L1", "L2"], ["emb", "L1", "L2", "L3"]]
    with torch.no_grad():
        for p in model.ilts.parameters():
            p.normal_(0.0, 0.5)
    idx = torch.randint(0, 97, (2, 9))
    stats = ilt_stats(model, idx)
    captured = []
    hook = model.ilts[1].register_forward_hook(lambda m, args, out: captured.append((args[0], out)))
    model.eval()
    model(idx)
    hook.remove()
    h, (out, after) = captured[0]
    residual, keys = out - h, after.memo["keys"]
    expected = model.ilts[1].weights(h, keys).mean(dim=(0, 1))  # (1, S)
    assert np.allclose(stats["attn"][1], expected.tolist(), atol=1e-6)
    assert stats["ratio"][1] == pytest.approx(
        (residual.norm(dim=-1) / h.norm(dim=-1)).mean().item(), rel=1e-5
    )
    assert stats["attn_prev"][1] == pytest.approx(expected[:, -1].mean().item(), rel=1e-5)
    assert stats["static"][0][0] == pytest.approx(model.ilts[0].static[0].abs().mean(-1).tolist(), rel=1e-5)


@pytest.mark.parametrize("kind", ["depth", "dense", "x0"])
def test_history_kind_trains_resumes_evaluates_generates_and_inspects(tmp_path, capsys, monkeypatch, kind):
    from hilt.checkpoint.store import load_checkpoint
    from hilt.training import run as train_module
    from tests.conftest import DATA_TXT

    def train(out, *extra):
        flags = ["--text_file", str(DATA_TXT), "--out_dir", str(out), "--max_tokens", "2000", "--batch_size", "8",
                 "--seq_len", "16", "--epochs", "2", "--model_dim", "32", "--n_layers", "2", "--n_heads", "2",
                 "--d_ff", "64", "--no_amp", "--device", "cpu", "--ilt_kind", kind, "--ilt_rank", "8"]  # fmt: skip
        return main(["train", *flags, *extra])

    assert train(tmp_path / "full") == 0
    original = train_module.Trainer.end_epoch
    with monkeypatch.context() as m:  # Ctrl-C right after epoch 1, then --resume
        m.setattr(train_module.Trainer, "end_epoch", lambda self: (original(self), self.request_stop(2))[0])
        assert train(tmp_path / "split") == 130
    assert train(tmp_path / "split", "--resume", str(tmp_path / "split" / "last_model.pt")) == 0
    full, split = (load_checkpoint(tmp_path / d / "last_model.pt") for d in ("full", "split"))
    assert full["config"]["ilt_kind"] == kind and full["global_step"] == split["global_step"]
    assert all(torch.equal(v, split["model_state_dict"][k]) for k, v in full["model_state_dict"].items())
    model = str(tmp_path / "full" / "last_model.pt")
    capsys.readouterr()
    assert main(["eval", "--model_path", model, "--text_file", str(DATA_TXT), "--max_tokens", "200", "--no_amp",
                 "--device", "cpu"]) == 0  # fmt: skip
    assert "scored" in capsys.readouterr().out
    texts = []
    for flags in ([], ["--use_beam_search", "--beam_width", "2"], ["--use_beam_search", "--beam_width", "2",
                                                                  "--use_cache"]):  # fmt: skip
        generate = [
            "generate",
            "--model_path",
            model,
            "--prompt",
            "ROMEO:",
            "--max_len",
            "12",
            "--temperature",
            "0",
        ]
        assert main([*generate, "--no_amp", "--device", "cpu", *flags]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[1] == texts[2]  # beam search: the same beams with and without the KV cache
    out = tmp_path / "ilt.png"
    assert main(["inspect", "--model_path", model, "--prompt", "ROMEO: hello", "--out", str(out), "--device",
                 "cpu"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "ILT 2 (after layer 2, reads emb, L1, L2)" in printed and out.stat().st_size > 5000
    assert train(tmp_path / "bad", "--ilt_kind", "deep") == 2
    assert "ilt_kind must be one of design, depth, dense, x0; got 'deep'" in capsys.readouterr().err
    assert train(tmp_path / "bad", "--ilt_kind", "depth", "--ilt_rank", "33") == 2  # x0 has no rank
    assert "ilt_rank (33) must be at most d_model (32)" in capsys.readouterr().err
