"""Run by torchrun from test_distributed.py: `hilt train` under DDP, plus a record per rank of its final weights
and of every checkpoint it wrote, so the test can check that ranks agree and that only rank 0 writes."""

import sys

import torch
import torch.distributed as dist

from hilt.cli import main
from hilt.training import trainer as train_module

record_dir = sys.argv[1]
writes: list[str] = []
atomic_save = train_module.atomic_save


def recording_save(obj, path):
    writes.append(str(path))
    atomic_save(obj, path)


def fit_and_record(self):
    history = original_fit(self)
    torch.save(
        {
            "weights": self.model.state_dict(),
            "writes": writes,
            "history": history,
            "world_size": dist.get_world_size(),
        },
        f"{record_dir}/rank{dist.get_rank()}.pt",
    )
    return history


original_fit = train_module.Trainer.fit
train_module.atomic_save = recording_save
train_module.Trainer.fit = fit_and_record
sys.exit(main(["train", *sys.argv[2:]]))
