import pytest
import torch
import torch.nn.functional as F

from hilt.model import HierarchicalTransformer, linear
from hilt.training import loss as loss_module
from hilt.training.loss import LanguageModelLoss, chunked_cross_entropy
from tests.conftest import tiny_config


@pytest.mark.parametrize("onednn", [True, False])  # fp32 on CPU: oneDNN's products where torch has it
@pytest.mark.parametrize(
    "chunk_elements", [97 * 5, 2**23]
)  # several chunks (last one short) and a single one
def test_chunked_loss_and_gradients_equal_the_plain_cross_entropy_in_fp32(
    monkeypatch, chunk_elements, onednn
):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", chunk_elements)
    hidden = torch.randn(23, 16, requires_grad=True)
    weight = torch.randn(97, 16, requires_grad=True)
    targets = torch.randint(0, 97, (23,))
    with torch.backends.mkldnn.flags(enabled=onednn):
        assert linear.onednn_fp32(hidden, weight) == (onednn and torch.backends.mkldnn.is_available())
        ours = chunked_cross_entropy(hidden, weight, targets)
    (ours * 0.5).backward()
    g_h, g_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    (ref * 0.5).backward()
    assert torch.allclose(ours, ref, rtol=1e-5)
    assert torch.allclose(g_h, hidden.grad, atol=1e-5) and torch.allclose(g_w, weight.grad, atol=1e-5)


def test_a_second_backward_through_a_retained_graph_gives_the_same_gradients():
    hidden = torch.randn(23, 16, requires_grad=True)
    weight = torch.randn(97, 16, requires_grad=True)
    loss = chunked_cross_entropy(hidden, weight, torch.randint(0, 97, (23,))) * 0.5
    loss.backward(retain_graph=True)
    first = hidden.grad.clone(), weight.grad.clone()
    loss.backward()  # accumulates: exactly twice the first gradients if nothing saved was modified
    assert torch.allclose(hidden.grad, 2 * first[0]) and torch.allclose(weight.grad, 2 * first[1])


def test_chunked_loss_under_bf16_autocast_matches_bf16_logits():
    hidden, weight = torch.randn(40, 32), torch.randn(97, 32)
    targets = torch.randint(0, 97, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = chunked_cross_entropy(hidden, weight, targets)
        logits = hidden @ weight.T  # bf16 under autocast
    ref = F.cross_entropy(logits.float(), targets, reduction="sum")
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, ref, rtol=1e-4)


def test_bf16_training_loss_and_gradients_match_autograd_through_bf16_logits(monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_ELEMENTS", 97 * 16)  # three chunks, gradients summed in bf16
    hidden = torch.randn(40, 32, requires_grad=True)
    weight = torch.randn(97, 32, requires_grad=True)
    targets = torch.randint(0, 97, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = chunked_cross_entropy(hidden, weight, targets)
    ours.backward()
    g_h, g_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = hidden @ weight.T
    ref = F.cross_entropy(logits.float(), targets, reduction="sum")
    ref.backward()
    assert ours.dtype == torch.float32 and g_h.dtype == g_w.dtype == torch.float32
    assert abs(ours - ref) <= 2**-9 * len(targets)  # each token's probability carries one bf16 rounding
    assert torch.allclose(g_h, hidden.grad, rtol=0.02, atol=0.02)
    assert torch.allclose(g_w, weight.grad, rtol=0.02, atol=0.05)


def test_a_target_probability_below_fp32_range_still_gives_the_exact_loss():
    # logits 200 apart: the target's probability is e**-200, which no float can hold; the loss is simply 200
    hidden = torch.tensor([[1.0, 0.0]], requires_grad=True)
    weight = torch.tensor([[0.0, 0.0], [200.0, 0.0]], requires_grad=True)
    loss = chunked_cross_entropy(hidden, weight, torch.tensor([0]))
    loss.backward()
    assert torch.isclose(loss, torch.tensor(200.0))
    assert torch.allclose(hidden.grad, torch.tensor([[200.0, 0.0]]))


def test_language_model_loss_equals_cross_entropy_of_the_models_logits():
    model = HierarchicalTransformer(tiny_config()).eval()
    x, y = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 9))
    expected = F.cross_entropy(model(x, 0.05).flatten(0, 1), y.flatten())
    assert torch.allclose(LanguageModelLoss(model)(x, y, 0.05), expected, rtol=1e-5)
    total = LanguageModelLoss(model)(x, y, 0.05, reduction="sum")
    assert torch.allclose(total, expected * 18, rtol=1e-5)


def test_validation_costs_one_matmul_and_training_three():
    from torch.utils.flop_counter import FlopCounterMode

    hidden, weight = torch.randn(8, 16, requires_grad=True), torch.randn(97, 16, requires_grad=True)
    targets = torch.randint(0, 97, (8,))
    one_matmul = 2 * 8 * 16 * 97
    # torch's matmuls, which the counter sees (it does not count oneDNN's)
    with torch.backends.mkldnn.flags(enabled=False):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            chunked_cross_entropy(hidden, weight, targets)
        assert counter.get_total_flops() == one_matmul
        with FlopCounterMode(display=False) as counter:
            chunked_cross_entropy(hidden, weight, targets)  # the gradients are computed here, in forward
        assert counter.get_total_flops() == 3 * one_matmul
