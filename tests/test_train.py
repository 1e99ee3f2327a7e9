"""End-to-end training through the CLI, as a user runs it: tiny models on data.txt, CPU."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hilt.checkpoint.store import load_checkpoint
from hilt.cli import main
from tests.conftest import DATA_TXT, REPO

TINY = ["--model_dim", "32", "--n_layers", "2", "--n_heads", "2", "--ilt_dim", "16", "--d_ff", "64"]


def train(out_dir: Path, *extra: str, text_file: Path = DATA_TXT) -> int:
    args = [
        "train",
        "--text_file",
        str(text_file),
        "--out_dir",
        str(out_dir),
        "--max_tokens",
        "2000",
        "--batch_size",
        "8",
        "--seq_len",
        "16",
        "--epochs",
        "2",
        *TINY,
        *extra,
    ]
    return main(args)


@pytest.mark.slow
def test_tiny_training_lowers_validation_loss_and_writes_checkpoints(tmp_path, capsys):
    flags = [
        "--max_tokens",
        "20000",
        "--batch_size",
        "16",
        "--seq_len",
        "32",
        "--epochs",
        "2",
        "--lr",
        "2e-3",
    ]
    assert train(tmp_path, *flags) == 0
    out = capsys.readouterr().out
    assert "Epoch 1/2 Summary:" in out and "Epoch 2/2 Summary:" in out
    assert "✓ Saved best model with val loss:" in out
    for line in ("Train Loss: ", "Val Loss: ", "Avg Grad Norm: "):
        assert line in out
    best = load_checkpoint(tmp_path / "best_model.pt")
    last = load_checkpoint(tmp_path / "last_model.pt")
    for key in (
        "epoch",
        "model_state_dict",
        "optimizer_state_dict",
        "scheduler_state_dict",
        "scaler_state_dict",
        "best_loss",
        "train_loss",
        "val_loss",
        "perplexity",
        "config",
        "global_step",
        "rng_state",
    ):
        assert key in last
    history = last["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 0.3  # measured: 8.22 -> 7.47
    assert last["epoch"] == 2 and last["perplexity"] == pytest.approx(math.exp(last["val_loss"]))
    assert best["best_loss"] == min(h["val_loss"] for h in history)
    assert last["config"]["d_model"] == 32 and last["train_config"]["lr"] == 2e-3
    assert (tmp_path / "metrics.jsonl").read_text().count('"kind": "epoch"') == 2


def _weights(path):
    return load_checkpoint(path)["model_state_dict"]


def _assert_same_run(a: Path, b: Path):
    ca, cb = load_checkpoint(a / "last_model.pt"), load_checkpoint(b / "last_model.pt")
    assert ca["history"] == cb["history"]  # identical per-epoch losses, grad norms and learning rates
    for k, v in ca["model_state_dict"].items():
        assert torch.equal(v, cb["model_state_dict"][k]), k
    assert ca["global_step"] == cb["global_step"]


def _stop_after_first_epoch(monkeypatch):
    """A user pressing Ctrl-C right after epoch 1: the run saves last_model.pt and exits 130."""
    from hilt.training import run as train_module

    original = train_module.Trainer.end_epoch

    def end_epoch_then_interrupt(self):
        original(self)
        self.request_stop(signal.SIGINT)

    monkeypatch.setattr(train_module.Trainer, "end_epoch", end_epoch_then_interrupt)


@pytest.mark.slow
@pytest.mark.parametrize("precision", [[], ["--no_amp"]], ids=["default", "fp32"])
def test_resume_after_an_epoch_is_bit_exact(tmp_path, monkeypatch, precision):
    assert train(tmp_path / "full", *precision) == 0
    with monkeypatch.context() as m:
        _stop_after_first_epoch(m)
        assert train(tmp_path / "split", *precision) == 128 + signal.SIGINT
    assert load_checkpoint(tmp_path / "split" / "last_model.pt")["epoch"] == 1
    assert train(tmp_path / "split", "--resume", str(tmp_path / "split" / "last_model.pt"), *precision) == 0
    _assert_same_run(tmp_path / "full", tmp_path / "split")


@pytest.mark.slow
def test_resume_from_a_mid_epoch_save_every_checkpoint_is_bit_exact(tmp_path, monkeypatch):
    cfg = ["--save_every", "3", "--gradient_accumulation_steps", "2"]
    assert train(tmp_path / "full", *cfg) == 0
    # a crash before the epoch ends: its mid-epoch last_model.pt is all that is left
    from hilt.training import run as train_module

    with monkeypatch.context() as m:
        m.setattr(
            train_module.Trainer, "end_epoch", lambda self: (_ for _ in ()).throw(RuntimeError("crash"))
        )
        with pytest.raises(RuntimeError, match="crash"):
            train(tmp_path / "crash", *cfg)
    mid = load_checkpoint(tmp_path / "crash" / "last_model.pt")
    assert mid["epoch"] == 0 and mid["batch_in_epoch"] > 0
    assert train(tmp_path / "crash", *cfg, "--resume", str(tmp_path / "crash" / "last_model.pt")) == 0
    _assert_same_run(tmp_path / "full", tmp_path / "crash")


@pytest.mark.slow
def test_resume_with_more_epochs_continues_the_schedule_over_the_new_total(tmp_path, capsys):
    assert train(tmp_path, "--epochs", "1") == 0
    assert train(tmp_path, "--epochs", "3", "--resume", str(tmp_path / "last_model.pt")) == 0
    ckpt = load_checkpoint(tmp_path / "last_model.pt")
    assert ckpt["epoch"] == 3 and [h["epoch"] for h in ckpt["history"]] == [1, 2, 3]
    assert "Resumed from" in capsys.readouterr().out
    # cosine ends at 10% of the peak rate at the end of the new total
    assert ckpt["history"][-1]["lr"] == pytest.approx(5e-4 * 0.1)


def test_resume_with_a_contradicting_architecture_flag_is_an_error(tmp_path, capsys):
    assert train(tmp_path, "--epochs", "1") == 0
    before = (tmp_path / "last_model.pt").read_bytes()
    code = train(tmp_path, "--resume", str(tmp_path / "last_model.pt"), "--model_dim", "64")
    assert code == 2
    err = capsys.readouterr().err
    assert "d_model=64 (checkpoint has 32)" in err and "Traceback" not in err
    assert (tmp_path / "last_model.pt").read_bytes() == before


def test_a_fresh_run_never_replaces_existing_checkpoints_unless_asked(tmp_path, capsys):
    assert train(tmp_path, "--epochs", "1") == 0
    before = (tmp_path / "best_model.pt").read_bytes()
    assert train(tmp_path, "--epochs", "1", "--seed", "7") == 2
    assert "already holds" in capsys.readouterr().err
    assert (tmp_path / "best_model.pt").read_bytes() == before
    assert train(tmp_path, "--epochs", "1", "--seed", "7", "--overwrite") == 0


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    from hilt.training import run as train_module

    assert train(tmp_path, "--epochs", "1") == 0
    good = (tmp_path / "last_model.pt").read_bytes()
    original = train_module.Trainer.loss

    def poisoned(self, net, x, y, progress):  # training steps only: validation does not go through it
        loss = original(self, net, x, y, progress)
        return loss * float("nan") if self.global_step >= 14 + 2 else loss  # 14 steps/epoch

    train_module.Trainer.loss = poisoned
    try:
        code = train(tmp_path, "--resume", str(tmp_path / "last_model.pt"), "--save_every", "1")
    finally:
        train_module.Trainer.loss = original
    assert code == 2
    assert "training diverged at step" in capsys.readouterr().err
    ckpt = load_checkpoint(tmp_path / "last_model.pt")
    assert ckpt["global_step"] == 16 and all(
        torch.isfinite(v).all() for v in ckpt["model_state_dict"].values()
    )
    assert (
        tmp_path / "last_model.pt"
    ).read_bytes() != good  # the good mid-epoch saves happened, the bad one did not


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--batch_size", "0"], "--batch_size must be at least 1"),
        (["--epochs", "-1"], "--epochs must be at least 1"),
        (["--lr", "0"], "--lr must be positive"),
        (["--lr=-1e-3"], "--lr must be positive"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be at least 1"),
        (["--seq_len", "2048"], "exceeds the model's max_seq_len 1024"),
        (["--model_dim", "33"], "divisible by n_heads"),
        (["--scheduler", "linear"], "invalid choice"),
        (["--batch_size", "many"], "invalid int value"),
        (["--resume", "/nonexistent/last_model.pt"], "checkpoint not found"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
    ],
)
def test_bad_training_flags_give_one_clear_line(tmp_path, capsys, flags, message):
    try:
        code = train(tmp_path / "out", *flags)
    except SystemExit as e:  # argparse's own checks (types, choices)
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # a refused run leaves no trace


def test_missing_out_dir_parent_and_unwritable_out_dir(tmp_path, capsys):
    assert train(tmp_path / "no" / "such" / "dir") == 2
    assert "is not an existing folder" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permission bits; a read-only mount stops root too
            locked = next((Path(p) for p in ("/proc/sys", "/sys") if not os.access(p, os.W_OK)), None)
        if locked is None:
            pytest.skip("no folder here is unwritable for this user")
        assert train(locked / "run") == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        (tmp_path / "locked").chmod(0o700)


def test_resume_from_corrupt_or_foreign_files(tmp_path, capsys):
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    assert train(tmp_path / "out", "--resume", str(tmp_path / "junk.pt")) == 2
    assert "not a readable HILT checkpoint" in capsys.readouterr().err
    torch.save({"state": torch.ones(1)}, tmp_path / "foreign.pt")
    assert train(tmp_path / "out", "--resume", str(tmp_path / "foreign.pt")) == 2
    assert "not a HILT checkpoint" in capsys.readouterr().err


# --- signals and crashes: real processes -------------------------------------------------------------------

TRAIN_CMD = [
    sys.executable,
    str(REPO / "train.py"),
    "--text_file",
    str(DATA_TXT),
    "--batch_size",
    "4",
    "--seq_len",
    "16",
    *TINY,
]


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_explains_how_to_resume(tmp_path):
    proc = subprocess.Popen(
        [*TRAIN_CMD, "--max_tokens", "2000", "--epochs", "50", "--out_dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for(lambda: (tmp_path / "last_model.pt").exists() or proc.poll() is not None, 120)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "--resume" in err and "SIGTERM" in err
    ckpt = load_checkpoint(tmp_path / "last_model.pt")
    assert ckpt["epoch"] < 50


@pytest.mark.slow
def test_sigkill_at_random_moments_never_leaves_a_torn_checkpoint(tmp_path):
    rng = random.Random(1234)
    cmd = [
        *TRAIN_CMD,
        "--max_tokens",
        "4000",
        "--epochs",
        "4",
        "--save_every",
        "1",
        "--out_dir",
        str(tmp_path),
    ]
    last = tmp_path / "last_model.pt"
    kills = 0
    for _ in range(3):
        extra = ["--resume", str(last)] if last.exists() else []
        before = last.stat().st_mtime_ns if last.exists() else 0
        proc = subprocess.Popen([*cmd, *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # once it is writing checkpoints (one per step), kill it at a random moment
        _wait_for(
            lambda p=proc, t=before: (last.exists() and last.stat().st_mtime_ns != t) or p.poll() is not None,
            120,
        )
        time.sleep(rng.uniform(0.05, 1.5))
        if proc.poll() is None:
            proc.kill()
            kills += 1
        proc.wait()
        for ckpt in tmp_path.glob("*.pt"):
            torch.load(ckpt, weights_only=True)  # every checkpoint present is complete
    assert kills >= 2
    final = subprocess.run([*cmd, "--resume", str(last)], capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert load_checkpoint(last)["epoch"] == 4
    assert not list(tmp_path.glob(".*.tmp"))


def _wait_for(condition, timeout):
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError
        time.sleep(0.1)


@pytest.mark.slow
def test_compile_trains_to_the_same_loss_as_eager(tmp_path):
    flags = ["--epochs", "1", "--no_amp", "--max_tokens", "1000"]
    assert train(tmp_path / "eager", *flags) == 0
    assert train(tmp_path / "compiled", *flags, "--compile") == 0
    eager, compiled = (load_checkpoint(tmp_path / d / "last_model.pt") for d in ("eager", "compiled"))
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], abs=1e-3)
    assert not any("_orig_mod" in k for k in compiled["model_state_dict"])  # plain names: loads anywhere


def test_a_cpu_capped_to_avx2_counts_as_without_native_bf16(monkeypatch):
    """ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA make torch run as on an AVX2 CPU, where bf16 is emulated: train in
    fp32 there, as on a real one."""
    from hilt import device

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert device.autocast_dtype(torch.device("cpu")) == torch.bfloat16
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert device.autocast_dtype(torch.device("cpu")) is None
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert device.autocast_dtype(torch.device("cpu")) == torch.bfloat16
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert device.autocast_dtype(torch.device("cpu")) is None


# --- one run per --out_dir ----------------------------------------------------------------------------------

# `python -m hilt`, not the root train.py (which puts this checkout's src/ first): a PYTHONPATH then picks the code
HILT_TRAIN = [sys.executable, "-m", "hilt", "train", *TRAIN_CMD[2:]]


def test_a_run_on_an_out_dir_held_by_another_is_refused_naming_its_pid(tmp_path, capsys):
    from hilt.training.out_dir import LOCK_NAME, out_dir_lock

    with out_dir_lock(
        tmp_path / "run"
    ):  # as another `hilt train` holds it (an flock conflicts in-process too)
        assert train(tmp_path / "run", "--epochs", "1") == 2
        err = capsys.readouterr().err.strip()
        assert f"is in use by another hilt train (PID {os.getpid()} on host" in err
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_NAME]  # nothing written
    assert not (tmp_path / "run").exists()  # the holder made the folder and left it empty: gone with it
    assert train(tmp_path / "run", "--epochs", "1") == 0
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "best_model.pt",
        "last_model.pt",
        "metrics.jsonl",
    ]


@pytest.mark.slow
def test_two_runs_started_together_on_one_out_dir_one_trains_and_one_is_refused(tmp_path):
    cmd = [*HILT_TRAIN, "--max_tokens", "2000", "--epochs", "200", "--out_dir", str(tmp_path)]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    try:
        _wait_for(lambda: any(p.poll() is not None for p in procs), 120)  # before: both trained on
        loser = next(p for p in procs if p.poll() is not None)
        winner = procs[1 - procs.index(loser)]
        err = loser.communicate()[1].strip()
        assert loser.returncode == 2 and len(err.splitlines()) == 1, err
        assert f"in use by another hilt train (PID {winner.pid} on host" in err
        assert winner.poll() is None
        _wait_for(lambda: (tmp_path / "last_model.pt").exists() or winner.poll() is not None, 120)
        winner.send_signal(signal.SIGTERM)
        winner.communicate(timeout=60)
        assert winner.returncode == 128 + signal.SIGTERM
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["kind"] == "step"]
    assert steps == list(range(1, len(steps) + 1))  # one run's rows, not two runs' interleaved
    assert load_checkpoint(tmp_path / "last_model.pt")["global_step"] == steps[-1]
    assert not (tmp_path / ".hilt_train.lock").exists()


@pytest.mark.slow
def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    cmd = [
        *HILT_TRAIN,
        "--max_tokens",
        "2000",
        "--epochs",
        "3",
        "--save_every",
        "1",
        "--out_dir",
        str(tmp_path),
    ]
    last, lock = tmp_path / "last_model.pt", tmp_path / ".hilt_train.lock"
    killed = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(lambda: last.exists() or killed.poll() is not None, 120)
    killed.kill()  # SIGKILL: no clean-up runs, the lock file stays with its PID in it
    killed.wait()
    assert json.loads(lock.read_text())["pid"] == killed.pid
    done = subprocess.run([*cmd, "--resume", str(last)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"note: taking over {lock} from PID {killed.pid} on host" in done.stdout
    assert load_checkpoint(last)["epoch"] == 3 and not lock.exists()


# --- resuming on other data ---------------------------------------------------------------------------------


def _texts(tmp_path):
    """Two inputs of 2,000+ tokens each (so --max_tokens 2000 gives both the same count), different content."""
    text = DATA_TXT.read_text(encoding="utf-8")
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(text[:12_000], encoding="utf-8")
    b.write_text(text[40_000:52_000], encoding="utf-8")
    return a, b


def test_resume_on_other_data_of_the_same_size_is_refused(tmp_path, capsys):
    a, b = _texts(tmp_path)
    assert train(tmp_path / "run", "--epochs", "1", text_file=a) == 0
    last = tmp_path / "run" / "last_model.pt"
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    capsys.readouterr()
    assert train(tmp_path / "run", "--resume", str(last), text_file=b) == 2
    err = capsys.readouterr().err.strip()
    assert f"{last} was trained on other data than this run reads" in err and "--new_data" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before  # nothing touched
    # the same data still resumes
    assert train(tmp_path / "run", "--resume", str(last), text_file=a) == 0


def test_new_data_starts_its_first_epoch_and_judges_the_best_model_afresh(tmp_path, capsys, monkeypatch):
    from hilt.data.batches import TokenBatches

    a, b = _texts(tmp_path)
    assert train(tmp_path / "run", "--epochs", "1", text_file=a) == 0
    first = load_checkpoint(tmp_path / "run" / "best_model.pt")
    orders = []
    original = TokenBatches.window_order
    monkeypatch.setattr(
        TokenBatches, "window_order", lambda self, epoch: orders.append(epoch) or original(self, epoch)
    )
    last = tmp_path / "run" / "last_model.pt"
    assert train(tmp_path / "run", "--resume", str(last), "--new_data", text_file=b) == 0
    assert "on new data: its first epoch is epoch 2" in capsys.readouterr().out
    assert orders == [0]  # epoch 2 of the run is the new data's epoch 0 (its first shuffled order)
    ckpt = load_checkpoint(last)
    assert ckpt["epoch"] == 2 and ckpt["data_start_epoch"] == 1
    assert ckpt["global_step"] == 2 * first["global_step"]  # the schedule runs on over the run's total
    # best_model.pt now holds epoch 2, judged on b's validation part alone, even where a's loss was lower
    best = load_checkpoint(tmp_path / "run" / "best_model.pt")
    assert best["epoch"] == 2 and best["best_loss"] == ckpt["history"][1]["val_loss"]
    assert best["data_digest"] == ckpt["data_digest"] != first["data_digest"]


@pytest.mark.slow
def test_a_new_data_run_resumes_bit_exact_after_an_interruption(tmp_path, monkeypatch):
    a, b = _texts(tmp_path)
    assert train(tmp_path / "a", "--epochs", "1", text_file=a) == 0
    start = tmp_path / "a" / "last_model.pt"
    assert train(tmp_path / "full", "--epochs", "3", "--resume", str(start), "--new_data", text_file=b) == 0
    with monkeypatch.context() as m:
        _stop_after_first_epoch(m)  # stops after epoch 2 (the new data's first)
        code = train(tmp_path / "split", "--epochs", "3", "--resume", str(start), "--new_data", text_file=b)
        assert code == 128 + signal.SIGINT
    split = tmp_path / "split" / "last_model.pt"
    assert train(tmp_path / "split", "--epochs", "3", "--resume", str(split), text_file=b) == 0
    _assert_same_run(tmp_path / "full", tmp_path / "split")


def test_a_checkpoint_without_a_data_checksum_resumes_with_a_note(tmp_path, capsys):
    assert train(tmp_path, "--epochs", "1") == 0
    ckpt = load_checkpoint(tmp_path / "last_model.pt")
    ckpt.pop("data_digest", None)  # as written before checkpoints recorded it
    torch.save(ckpt, tmp_path / "old.pt")
    capsys.readouterr()
    assert train(tmp_path, "--resume", str(tmp_path / "old.pt")) == 0
    assert "old.pt records no data checksum (an older HILT wrote it); the data could not be checked" in (
        capsys.readouterr().out
    )
    assert load_checkpoint(tmp_path / "last_model.pt")["epoch"] == 2


def test_new_data_needs_resume(tmp_path, capsys):
    assert train(tmp_path / "out", "--new_data") == 2
    assert "--new_data continues a checkpoint on other data; it needs --resume" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
