import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hilt.cli import main
from hilt.data.batches import TokenBatches
from hilt.data.tokenizer import Tokenizer
from hilt.evaluation.evaluate import HeadLoss, evaluate_tokens, run_eval, sliding_windows
from hilt.model import HierarchicalTransformer, linear
from hilt.training.run import TrainConfig, Trainer, run_training
from tests.conftest import DATA_TXT, save_untrained_checkpoint, tiny_config


@pytest.mark.parametrize("n, seq_len, stride", [(10, 4, 2), (50, 8, 8), (50, 8, 3), (37, 8, 1), (6, 8, 4)])
def test_sliding_windows_score_every_target_once_with_enough_context(n, seq_len, stride):
    windows = sliding_windows(n, seq_len, stride)
    scored = []
    for start, count in windows:
        width = min(seq_len, n - 1)
        targets = list(range(start + width - count + 1, start + width + 1))
        scored += targets
        if (
            start > 0
        ):  # every later window gives its scored targets seq_len - stride tokens of context or more
            assert targets[0] - start >= seq_len - stride
    assert scored == list(range(1, len(scored) + 1))  # each target once, in order, none skipped
    assert n - 1 - len(scored) < stride  # only a tail shorter than the stride is left out


def test_sliding_windows_reject_bad_stride():
    from hilt.errors import UserError

    with pytest.raises(UserError, match="--stride"):
        sliding_windows(100, 8, 9)
    with pytest.raises(UserError, match="at least 2"):
        sliding_windows(1, 8, 8)


def test_stride_one_equals_scoring_each_token_with_its_full_window():
    model = HierarchicalTransformer(tiny_config()).eval()
    tokens = np.random.default_rng(0).integers(0, 97, size=30)
    seq_len = 8
    got = evaluate_tokens(model, tokens, seq_len=seq_len, stride=1, batch_size=5)
    # reference: target j predicted from the (up to) seq_len tokens before it, one forward pass each
    losses = []
    with torch.no_grad():
        for j in range(1, len(tokens)):
            context = torch.from_numpy(tokens[max(0, j - seq_len) : j]).long()[None]
            logits = model(context)[0, -1]
            losses.append(F.cross_entropy(logits, torch.tensor(int(tokens[j]))).item())
    assert got.tokens == len(tokens) - 1
    assert got.loss == pytest.approx(sum(losses) / len(losses), abs=1e-5)
    assert got.perplexity == pytest.approx(math.exp(got.loss))


@pytest.fixture(params=["oneDNN packed head", "torch's matmul"])
def head_path(request, monkeypatch):
    """HeadLoss's two ways to the logits: a packed oneDNN weight where torch has oneDNN (CPU), torch's matmul
    elsewhere."""
    if request.param == "torch's matmul":
        monkeypatch.setattr(linear, "onednn_packed", lambda *args, **kwargs: None)
    elif not torch.backends.mkldnn.is_available():
        pytest.skip("torch without oneDNN")
    return request.param


# chunks of 4 and 7 tokens (the last one short), and a single chunk
@pytest.mark.parametrize("chunk_elements", [97 * 4, 97 * 7, 2**22])
def test_head_loss_equals_the_summed_cross_entropy_of_full_logits(chunk_elements, head_path):
    hidden, weight = torch.randn(23, 16), torch.randn(97, 16)
    targets = torch.randint(0, 97, (23,))
    head_loss = HeadLoss(weight, torch.float32, chunk_elements)
    assert (head_loss.packed is not None) == (head_path == "oneDNN packed head")
    # a short call first, then a longer one (the buffers grow), then the short one again (reused, not stale)
    for n in (5, 23, 5):
        expected = F.cross_entropy(hidden[:n] @ weight.T, targets[:n], reduction="sum").double()
        got = head_loss(hidden[:n], targets[:n])
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_head_loss_in_bf16_takes_the_exact_fp32_log_softmax_of_bf16_logits(head_path):
    hidden, weight = torch.randn(40, 32), torch.randn(97, 32)
    targets = torch.randint(0, 97, (40,))
    logits = (hidden.bfloat16() @ weight.bfloat16().T).float()
    expected = F.cross_entropy(logits, targets, reduction="sum").item()
    assert HeadLoss(weight, torch.bfloat16, 97 * 8)(hidden, targets).item() == pytest.approx(
        expected, rel=1e-6
    )


def test_evaluation_never_builds_the_full_logits(monkeypatch):
    model = HierarchicalTransformer(tiny_config()).eval()
    tokens = np.random.default_rng(0).integers(0, 97, size=200)
    expected = evaluate_tokens(model, tokens, seq_len=16, stride=8, batch_size=4).loss

    def refuse(*args, **kwargs):
        raise AssertionError("the LM head module was called: (B, T, V) logits")

    monkeypatch.setattr(model.head, "forward", refuse)
    assert evaluate_tokens(model, tokens, seq_len=16, stride=8, batch_size=4).loss == expected
    # training's validation too: the same HeadLoss from the final hidden states
    cfg = TrainConfig(text_file="-", batch_size=4, seq_len=16, epochs=1, amp=False, out_dir="/nonexistent")
    data = TokenBatches(tokens.astype(np.uint16), 16, 4, shuffle=False)
    trainer = Trainer(model, cfg, data, data, device=torch.device("cpu"), is_main=False)
    assert trainer.evaluate() == pytest.approx(
        evaluate_tokens(model, tokens, seq_len=16, batch_size=4).loss, abs=1e-6
    )


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "autocast"])
def test_equals_trainer_validation_loss_on_the_same_windows(amp):
    torch.manual_seed(0)
    model = HierarchicalTransformer(tiny_config())
    tokens = np.random.default_rng(1).integers(0, 97, size=700).astype(np.uint16)
    train_data = TokenBatches(tokens[:500], 16, 4, seed=0)
    val_tokens = tokens[500:]
    cfg = TrainConfig(text_file="unused", batch_size=4, seq_len=16, epochs=1, amp=amp, out_dir="/nonexistent")
    trainer = Trainer(
        model,
        cfg,
        train_data,
        TokenBatches(val_tokens, 16, 4, shuffle=False),
        device=torch.device("cpu"),
        is_main=False,
    )
    for _ in range(3):  # a model that has moved away from its initialisation
        trainer.train_step(train_data.window_order(0))
    expected = trainer.evaluate()
    # the same batches: the same code (features, then HeadLoss), so the same float64 sum to the last bit
    got = evaluate_tokens(model, val_tokens, seq_len=16, stride=16, batch_size=4, amp_dtype=trainer.amp_dtype)
    assert got.loss == expected
    assert got.tokens == (len(val_tokens) - 1) // 16 * 16
    # other batches only change the order of a float64 sum
    other = evaluate_tokens(model, val_tokens, seq_len=16, batch_size=3, amp_dtype=trainer.amp_dtype)
    assert other.loss == pytest.approx(expected, abs=1e-6)


def test_bits_per_byte_counts_the_bytes_of_the_scored_text():
    tokenizer = Tokenizer.load()
    text = "To be, or not to be: that is the question. Naïve café!"
    tokens = np.array(tokenizer.encode(text))
    model = HierarchicalTransformer(tiny_config(vocab_size=tokenizer.vocab_size))
    got = evaluate_tokens(model, tokens, seq_len=64, tokenizer=tokenizer)
    first = tokenizer.decode(tokens[:1].tolist())
    assert got.bytes == len(text.encode()) - len(first.encode())  # every token but the first is a target
    assert got.bits_per_byte == pytest.approx(got.loss * got.tokens / math.log(2) / got.bytes)


def _train_tiny_model(out, amp: bool):
    """A 32-wide model trained for one epoch on the start of data.txt: (out, text file, its Trainer)."""
    text = out / "text.txt"
    text.write_text(DATA_TXT.read_text()[:12_000])
    cfg = TrainConfig(
        text_file=str(text),
        max_tokens=1500,
        batch_size=8,
        seq_len=16,
        epochs=1,
        amp=amp,
        out_dir=str(out / "r"),
        ilt_stats_every=0,
    )
    arch = dict(d_model=32, n_layers=2, n_heads=4, ilt_dim=16, nhead_ilt=2, max_seq_len=64)
    torch.manual_seed(0)
    trainer = run_training(cfg, arch)
    return out, text, trainer


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    return _train_tiny_model(tmp_path_factory.mktemp("run"), amp=False)


# autocast is bf16 where the CPU has it natively, else fp32 again
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "autocast"])
def test_hilt_eval_split_val_reproduces_the_recorded_validation_loss(trained_run, tmp_path, amp, capsys):
    out, _, trainer = _train_tiny_model(tmp_path, amp=True) if amp else trained_run
    ckpt = torch.load(out / "r" / "last_model.pt", weights_only=True)
    recorded = ckpt["val_loss"]
    # a real loss of a model that learnt something: below a uniform guess over GPT-2's vocabulary
    assert 0 < recorded < math.log(50_257)
    result = run_eval(str(out / "r" / "last_model.pt"), split="val", amp=amp, device="cpu")
    # the same windows, batches, precision and code (features, then hilt.training.loss.HeadLoss): equal to the last bit
    assert result.loss == recorded == trainer.last_val_loss == trainer.history[-1]["val_loss"]
    assert result.tokens == trainer.val_data.num_windows * 16  # every validation window, each whole
    printed = capsys.readouterr().out
    assert "(val split)" in printed and f"Loss: {recorded:.4f}" in printed and "Bits per byte" in printed


def test_hilt_eval_cli_any_text_and_user_errors(trained_run, capsys):
    out, text, _ = trained_run
    model = str(out / "r" / "last_model.pt")
    assert (
        main(
            [
                "eval",
                "--model_path",
                model,
                "--text_file",
                str(text),
                "--max_tokens",
                "300",
                "--stride",
                "8",
                "--no_amp",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "scored" in capsys.readouterr().out
    assert main(["eval", "--model_path", model, "--text_file", str(text), "--stride", "99"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--stride" in err
    assert main(["eval", "--model_path", model]) == 2  # neither --text_file nor --split
    assert "--text_file" in capsys.readouterr().err
    assert main(["eval", "--model_path", str(out / "missing.pt"), "--text_file", str(text)]) == 2


@pytest.mark.parametrize(
    ("flag", "value", "rule"),
    [
        ("--max_tokens", "-1", "--max_tokens must be >= 0 (0 = all of them), got -1"),
        ("--modulation_scale", "nan", "--modulation_scale must be a finite number, got nan"),
        ("--modulation_scale", "inf", "--modulation_scale must be a finite number, got inf"),
        ("--batch_size", "0", "--batch_size must be at least 1, got 0"),  # not "the training run's"
        ("--seq_len", "0", "--seq_len must be at least 1, got 0"),
    ],
)
def test_hilt_eval_refuses_bad_numbers_in_one_line(tmp_path, capsys, flag, value, rule):
    model = save_untrained_checkpoint(tmp_path)
    text = tmp_path / "text.txt"
    text.write_text(DATA_TXT.read_text()[:2000])
    args = ["eval", "--model_path", model, "--text_file", str(text), "--device", "cpu", flag, value]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {rule}\n" and "Loss:" not in captured.out
