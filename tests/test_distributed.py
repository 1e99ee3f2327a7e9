"""torchrun on CPU (gloo), two processes: the real launcher, the real DDP wrapper, tiny model."""

import os
import subprocess
import sys

import pytest
import torch

from hilt.checkpoint.store import load_checkpoint, model_from_checkpoint
from hilt.cli import main
from tests.conftest import DATA_TXT, REPO

FLAGS = [
    "--text_file",
    str(DATA_TXT),
    "--max_tokens",
    "4000",
    "--batch_size",
    "8",
    "--seq_len",
    "16",
    "--lr",
    "2e-3",
    "--model_dim",
    "32",
    "--n_layers",
    "2",
    "--n_heads",
    "2",
    "--ilt_dim",
    "16",
    "--d_ff",
    "64",
]


def torchrun(record_dir, *flags: str) -> subprocess.CompletedProcess:
    """`hilt train` with FLAGS and ``flags`` under torchrun, 2 CPU processes; ranks record into ``record_dir``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "ddp_worker.py"), str(record_dir), *FLAGS, *flags]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_torchrun_two_processes_agree_write_once_and_interoperate_with_single_process(tmp_path):
    out = tmp_path / "run"
    # 1. a single-process epoch, 2. resumed under DDP for a second, 3. resumed single-process again
    assert main(["train", *FLAGS, "--epochs", "1", "--out_dir", str(out)]) == 0
    proc = torchrun(tmp_path, "--epochs", "2", "--out_dir", str(out), "--resume", str(out / "last_model.pt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Epoch 2/2 Summary:") == 1  # only rank 0 prints
    assert "Effective batch: 8 x 1 accumulation x 2 process(es) = 16 sequences" in proc.stdout

    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world_size"] == 2
    for name, tensor in r0["weights"].items():
        assert torch.equal(tensor, r1["weights"][name]), name  # DDP kept the replicas identical
    assert r0["writes"] and not r1["writes"]  # exactly one checkpoint writer
    history = r0["history"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]  # epoch 2 (DDP) improved on epoch 1
    assert history == r1["history"]  # validation averaged over ranks: both saw the same numbers

    ckpt = load_checkpoint(out / "last_model.pt")
    assert not any(k.startswith("module.") for k in ckpt["model_state_dict"])
    model = model_from_checkpoint(ckpt).eval()
    assert model(torch.tensor([[15496, 995]])).shape == (1, 2, 50260)
    assert (
        main(
            ["train", *FLAGS, "--epochs", "3", "--out_dir", str(out), "--resume", str(out / "last_model.pt")]
        )
        == 0
    )
    assert load_checkpoint(out / "last_model.pt")["epoch"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["depth", "dense", "x0"])
def test_every_history_ilt_kind_trains_under_torchrun_with_identical_replicas(tmp_path, kind):
    # DDP refuses a step in which a parameter got no gradient; a kind whose last mixture fed nothing would fail here
    proc = torchrun(tmp_path, "--max_tokens", "1500", "--ilt_kind", kind, "--ilt_rank", "8", "--epochs", "1",
                    "--out_dir", str(tmp_path / "run"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # the kinds start at exactly 0 (the plain model): weights off zero show that DDP carried their gradients
    learned = [
        name for name in r0["weights"] if name.startswith("ilts.") and name.endswith((".static", ".gate"))
    ]
    assert learned and all(r0["weights"][name].abs().sum() > 0 for name in learned), learned
    for name, tensor in r0["weights"].items():
        assert torch.equal(tensor, r1["weights"][name]), name
    assert load_checkpoint(tmp_path / "run" / "last_model.pt")["config"]["ilt_kind"] == kind
