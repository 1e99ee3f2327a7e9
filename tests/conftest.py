"""Shared fixtures: tiny configs and a clean global torch state for every test."""

from pathlib import Path

import pytest
import torch

from hilt.model import ModelConfig

# One intra-op thread: the tests' tiny tensors gain nothing from two, and a second spinning OpenMP thread slows
# them several-fold whenever anything else runs on the machine.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
DATA_TXT = REPO / "data.txt"


@pytest.fixture(autouse=True)
def _reset_torch_state():
    rng = torch.get_rng_state()
    dtype = torch.get_default_dtype()
    torch.manual_seed(0)
    yield
    torch.set_rng_state(rng)
    torch.set_default_dtype(dtype)


def tiny_config(**overrides) -> ModelConfig:
    values = dict(
        vocab_size=97,
        d_model=32,
        n_layers=3,
        n_heads=4,
        max_seq_len=64,
        ilt_dim=16,
        nhead_ilt=2,
        dropout=0.0,
        ilt_dropout=0.0,
    )
    values.update(overrides)
    return ModelConfig(**values)
