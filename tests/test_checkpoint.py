import os

import pytest
import torch

from hilt.checkpoint.store import (
    FORMAT_VERSION,
    atomic_save,
    capture_rng_state,
    load_checkpoint,
    model_from_checkpoint,
    restore_rng_state,
)
from hilt.errors import UserError
from hilt.model import HierarchicalTransformer
from tests.conftest import tiny_config


def make_checkpoint(model: HierarchicalTransformer) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "model_state_dict": model.state_dict(),
    }


def test_round_trip_rebuilds_an_identical_model(tmp_path):
    model = HierarchicalTransformer(tiny_config(n_layers=4, ilt_window=3, tie_weights=False)).eval()
    atomic_save(make_checkpoint(model), tmp_path / "m.pt")
    ckpt = torch.load(tmp_path / "m.pt", weights_only=True)  # plain data only
    rebuilt = model_from_checkpoint(ckpt).eval()
    assert rebuilt.config == model.config
    idx = torch.randint(0, 97, (2, 12))
    assert torch.equal(rebuilt(idx), model(idx))


def test_atomic_save_replaces_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "last_model.pt"
    atomic_save({"a": torch.ones(2)}, path)
    atomic_save({"a": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(2))
    assert os.listdir(tmp_path) == ["last_model.pt"]


def test_failed_save_keeps_the_old_file(tmp_path):
    path = tmp_path / "best_model.pt"
    atomic_save({"a": torch.ones(2)}, path)

    class Unsaveable:
        def __reduce__(self):
            raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_save({"a": Unsaveable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["best_model.pt"]


class _Exploit:
    """Unpickling this would run a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "config": {}, "model_state_dict": _Exploit(marker)}, path)
    with pytest.raises(UserError, match="refusing to load"):
        load_checkpoint(path)
    assert not marker.exists()
    # an unsafe load would have run it: make sure the test's exploit is real
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a readable HILT checkpoint"),
        (b"this is not a checkpoint", "not a readable HILT checkpoint"),
    ],
)
def test_corrupt_files_are_user_errors(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_checkpoint(path)


def test_truncated_checkpoint_is_a_user_error(tmp_path):
    model = HierarchicalTransformer(tiny_config())
    path = tmp_path / "m.pt"
    atomic_save(make_checkpoint(model), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_missing_and_directory_paths(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(UserError, match="directory"):
        load_checkpoint(tmp_path)


def test_not_a_hilt_checkpoint_and_old_formats(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"weights": torch.ones(1)}, path)
    with pytest.raises(UserError, match="missing format_version, config, model_state_dict"):
        load_checkpoint(path)
    torch.save({"epoch": 3, "model_state_dict": {}}, path)  # the seed project's unversioned layout
    with pytest.raises(UserError, match="unversioned"):
        load_checkpoint(path)
    torch.save({"format_version": 99, "config": {}, "model_state_dict": {}}, path)
    with pytest.raises(UserError, match="format 99"):
        load_checkpoint(path)


def test_weights_of_another_architecture_name_the_mismatch():
    small = HierarchicalTransformer(tiny_config(d_model=32))
    ckpt = make_checkpoint(small)
    ckpt["config"]["d_model"] = 64  # config and weights disagree
    with pytest.raises(UserError, match="do not match the architecture"):
        model_from_checkpoint(ckpt)
    ckpt["config"]["ilt_gating"] = True
    with pytest.raises(UserError, match="unknown ModelConfig fields: ilt_gating"):
        model_from_checkpoint(ckpt)


def test_rng_state_round_trips_through_weights_only_loading(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    atomic_save({"rng": capture_rng_state()}, tmp_path / "r.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    restore_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
