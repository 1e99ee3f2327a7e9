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


def save_untrained_checkpoint(folder: Path, max_seq_len: int = 32) -> str:
    """A tiny untrained model (2 layers) with the real GPT-2 vocabulary, saved as the trainer saves it: what the
    generation, engine and server tests load."""
    from hilt.checkpoint.store import FORMAT_VERSION, atomic_save
    from hilt.data.tokenizer import Tokenizer
    from hilt.model import HierarchicalTransformer

    torch.manual_seed(0)
    tok = Tokenizer.load()
    model = HierarchicalTransformer(
        tiny_config(vocab_size=tok.vocab_size, n_layers=2, max_seq_len=max_seq_len)
    )
    path = Path(folder) / "best_model.pt"
    state = {
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "model_state_dict": model.state_dict(),
        "tokenizer": tok.name,
        "train_config": {"tokenizer": None},
    }
    atomic_save(state, path)
    return str(path)
