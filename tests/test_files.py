"""Writes on a full disk: one line naming the file, exit status 2, nothing torn, no temporary file left.

A full disk is simulated in the kernel, so that the failure comes through Python's buffered files and torch.save's
writer as on a real one (a tiny tmpfs would need a mount, which CI cannot do): /dev/full refuses every write with
ENOSPC, and a file size limit (RLIMIT_FSIZE) refuses the write that crosses it, half-way through a checkpoint, as a
disk that fills up does (torch.save then fails with its own "unexpected pos" RuntimeError).
"""

import builtins
import os
import re
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from hilt.checkpoint.store import atomic_save
from hilt.cli import main
from hilt.errors import UserError
from hilt.files import atomic_write
from tests.conftest import DATA_TXT

DEV_FULL = "/dev/full"
pytestmark = pytest.mark.skipif(not os.path.exists(DEV_FULL), reason="no /dev/full here")

REAL_MKSTEMP = tempfile.mkstemp
REAL_OPEN = builtins.open
TINY = ["--model_dim", "32", "--n_layers", "2", "--n_heads", "2", "--ilt_dim", "16", "--d_ff", "64"]


def full_disk_for(monkeypatch, *names: str) -> None:
    """atomic_write's temporary files for ``names`` (``.NAME.*.tmp``) are created, but written to /dev/full."""

    def mkstemp(*args, prefix=None, **kwargs):
        fd, tmp = REAL_MKSTEMP(*args, prefix=prefix, **kwargs)
        if prefix in {f".{name}." for name in names}:
            full = os.open(DEV_FULL, os.O_WRONLY)
            os.dup2(full, fd)
            os.close(full)
        return fd, tmp

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def no_space_line(path_pattern: str) -> str:
    return (
        rf"error: could not write {path_pattern}: No space left on device; free some space there or write "
        r"elsewhere \(a file already there is unchanged\)"
    )


def test_atomic_write_on_a_full_disk_is_a_user_error_naming_the_file(tmp_path, monkeypatch):
    path = tmp_path / "best_model.pt"
    atomic_save({"w": torch.ones(3)}, path)
    full_disk_for(monkeypatch, "best_model.pt")
    message = f"could not write {re.escape(str(path))}: No space left on device"
    with pytest.raises(UserError, match=message):  # torch.save's own RuntimeError, wrapping the OSError
        atomic_save({"w": torch.zeros(100_000)}, path)
    with pytest.raises(UserError, match=message):  # a plain write
        atomic_write(path, lambda f: f.write(b"x" * 100_000))
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["best_model.pt"]


def test_prepare_on_a_full_disk_names_the_token_file(tmp_path, monkeypatch, capsys):
    text = tmp_path / "text.txt"
    text.write_text(DATA_TXT.read_text()[:20_000])
    cache = tmp_path / "cache"

    # the ids are written through a plain open(), not atomic_write
    def open_(file, mode="r", *args, **kwargs):
        if str(file).endswith(".tokens.tmp") and "w" in mode:
            REAL_OPEN(file, mode).close()  # the file exists, as on a real disk
            return REAL_OPEN(DEV_FULL, mode, *args, **kwargs)
        return REAL_OPEN(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    assert main(["prepare", "--text_file", str(text), "--cache_dir", str(cache)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert re.fullmatch(no_space_line(rf"{re.escape(str(cache))}/text-\w+\.\w+\.tokens"), err.rstrip("\n"))
    assert os.listdir(cache) == []  # no ids, no metadata, no temporary file


@pytest.mark.slow
def test_train_whose_checkpoint_fills_the_file_system_names_it_and_keeps_the_old_one(tmp_path):
    # /dev/full refuses the very first write; a disk that fills up refuses one in the middle of torch.save, which
    # then fails with its own RuntimeError. A 1 MB file size limit (RLIMIT_FSIZE) does exactly that to the real
    # `hilt train`, with EFBIG ("File too large") in place of ENOSPC
    text = tmp_path / "text.txt"
    text.write_text(DATA_TXT.read_text()[:12_000])
    out = tmp_path / "run"
    out.mkdir()
    (out / "best_model.pt").write_bytes(b"the previous run's checkpoint")
    args = ["train", "--text_file", str(text), "--out_dir", str(out), "--overwrite", "--max_tokens", "1500"]
    args += ["--batch_size", "8", "--seq_len", "16", "--epochs", "1", "--ilt_stats_every", "0", *TINY]

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # Python ignores SIGXFSZ: writes fail

    run = subprocess.run(
        [sys.executable, "-m", "hilt", *args], capture_output=True, text=True, preexec_fn=limit_file_size
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    path = rf"{re.escape(str(out))}/(best|last)_model\.pt"
    message = rf"error: could not write {path}: File too large \(a file already there is unchanged\)"
    assert re.fullmatch(message, run.stderr.splitlines()[-1])  # after the progress bar's lines
    assert (out / "best_model.pt").read_bytes() == b"the previous run's checkpoint"
    assert not (out / "last_model.pt").exists()
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []


def test_any_other_write_on_a_full_disk_is_one_line(tmp_path, monkeypatch, capsys):
    # metrics.jsonl is appended to, not written atomically; its failure still ends in one line, not a traceback
    text = tmp_path / "text.txt"
    text.write_text(DATA_TXT.read_text()[:12_000])
    out = tmp_path / "run"
    real_path_open = Path.open

    def path_open(self, mode="r", *args, **kwargs):
        if self.name == "metrics.jsonl" and "a" in mode:
            return REAL_OPEN(DEV_FULL, "w", *args, **kwargs)
        return real_path_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", path_open)
    args = ["train", "--text_file", str(text), "--out_dir", str(out), "--max_tokens", "1500"]
    args += ["--batch_size", "8", "--seq_len", "16", "--epochs", "1", "--ilt_stats_every", "0", *TINY]
    assert main(args) == 2
    err = capsys.readouterr().err
    # (the progress bar of the interrupted epoch is not closed: the message ends its line)
    assert err.endswith("error: No space left on device; free some space or write elsewhere\n")
    assert "Traceback" not in err
