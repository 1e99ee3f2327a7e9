"""Numbers outside their rule (NaN, infinities, seeds torch cannot take) in the flags of hilt generate and hilt
train and in a prompts file's records: one line naming the rule and exit status 2, before any work, never a run
that samples noise, diverges later, hangs or ends in a traceback."""

import json
import math
import subprocess
import sys

import pytest
import torch

from hilt.cli import main
from hilt.generation.engine import SamplingParams
from hilt.generation.sampling import sample_next_token
from tests.conftest import DATA_TXT, save_untrained_checkpoint

TOO_BIG_SEED = 2**64  # torch.Generator.manual_seed takes -2**63 .. 2**64 - 1


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_untrained_checkpoint(tmp_path_factory.mktemp("model"))


def generate(capsys, checkpoint, *flags: str) -> tuple[int, str, str]:
    code = main(["generate", "--model_path", checkpoint, "--max_len", "8", "--device", "cpu", *flags])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def hilt(*args: str) -> subprocess.CompletedProcess:
    # a subprocess with a time limit: before these checks, a seed torch refuses killed the decode thread and the
    # command waited forever
    return subprocess.run([sys.executable, "-m", "hilt", *args], capture_output=True, text=True, timeout=120)


# --- hilt generate ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["inf", "nan"])
def test_generate_refuses_a_temperature_that_is_not_finite(capsys, checkpoint, value):
    code, out, err = generate(capsys, checkpoint, "--temperature", value)
    assert (code, out) == (2, "")  # inf used to sample uniformly random tokens and exit 0
    assert err == f"error: --temperature must be >= 0 (0 = greedy) and finite, got {value}\n"


def test_generate_refuses_a_seed_torch_cannot_take(checkpoint):
    run = hilt("generate", "--model_path", checkpoint, "--device", "cpu", "--seed", str(TOO_BIG_SEED))
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == f"error: --seed must fit in 64 bits (-2**63 to 2**63 - 1), got {TOO_BIG_SEED}\n"


def test_a_tiny_temperature_is_greedy_not_a_crash(capsys, checkpoint):
    # 1e-300 is 0 in float32: logits / temperature were inf, the probabilities NaN, and the decode thread failed
    code, greedy, _ = generate(capsys, checkpoint, "--temperature", "0")
    assert code == 0 and len(greedy) > len("The quick brown")
    for tiny in ("1e-300", "1e-6"):
        assert generate(capsys, checkpoint, "--temperature", tiny, "--seed", "3")[:2] == (0, greedy)


def test_sample_next_token_below_greedy_below_is_the_argmax():
    logits = torch.randn(4, 1000) * 30
    for temperature in (1e-300, 1e-40, 1e-6):
        ids = sample_next_token(logits, temperature=temperature, generator=torch.Generator().manual_seed(0))
        assert ids.tolist() == logits.argmax(dim=-1).tolist()


def test_sampling_params_refuse_infinite_temperatures_and_seeds_torch_cannot_take():
    for bad in (math.inf, math.nan):
        with pytest.raises(ValueError, match="temperature must be a number >= 0 .0 = greedy. and finite"):
            SamplingParams(temperature=bad)
    for bad in (TOO_BIG_SEED, -(2**63) - 1):
        with pytest.raises(ValueError, match=r"seed must be an integer from -2\*\*63 to 2\*\*64 - 1"):
            SamplingParams(seed=bad)
    assert SamplingParams(seed=2**64 - 1).seed == 2**64 - 1  # the edges torch takes stay allowed
    assert SamplingParams(seed=-(2**63)).seed == -(2**63)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (
            '{"prompt": "a", "temperature": Infinity}',
            "temperature must be a number >= 0 (0 = greedy) and finite",
        ),
        (
            '{"prompt": "a\tb"}',
            "not a JSON record: Invalid control character at column 14 ('\\t': inside a string",
        ),
    ],
    ids=["infinite-temperature", "control-character"],
)
def test_prompts_file_records_with_bad_values_name_their_line(tmp_path, capsys, checkpoint, line, message):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "fine"}) + "\n" + line + "\n")
    out = tmp_path / "out.jsonl"
    code, _, err = generate(capsys, checkpoint, "--prompts_file", str(prompts), "--out", str(out))
    assert code == 2 and err.startswith(f"error: {prompts}:2: {message}") and err.count("\n") == 1
    assert not out.exists()


def test_prompts_file_record_with_a_seed_torch_cannot_take(tmp_path, checkpoint):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a", "seed": TOO_BIG_SEED}) + "\n")
    out = tmp_path / "out.jsonl"
    run = hilt("generate", "--model_path", checkpoint, "--prompts_file", str(prompts), "--out", str(out))
    assert run.returncode == 2
    assert run.stderr.startswith(f"error: {prompts}:1: seed must be an integer from -2**63 to 2**64 - 1")
    assert not out.exists()


# --- hilt train ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value", "rule"),
    [
        ("--lr", "inf", "--lr must be positive and finite, got inf"),
        ("--weight_decay", "nan", "--weight_decay must be >= 0 and finite, got nan"),
        ("--clip_grad", "nan", "--clip_grad must be >= 0 and finite, got nan"),
        ("--seed", str(10**14), f"--seed must be from 0 to 2**32 - 1, got {10**14}"),
        (
            "--modulation_scale_start",
            "nan",
            "ModelConfig.modulation_scale_start must be a finite number, got nan",
        ),
        (
            "--modulation_scale_end",
            "inf",
            "ModelConfig.modulation_scale_end must be a finite number, got inf",
        ),
    ],
)
def test_train_refuses_numbers_outside_their_rule_before_training(tmp_path, capsys, flag, value, rule):
    text = tmp_path / "text.txt"
    text.write_text(DATA_TXT.read_text()[:12_000])
    out = tmp_path / "run"
    args = ["train", "--text_file", str(text), "--out_dir", str(out), "--max_tokens", "1500", "--epochs", "1"]
    args += ["--batch_size", "8", "--seq_len", "16", "--ilt_stats_every", "0", "--model_dim", "32"]
    args += ["--n_layers", "2", "--n_heads", "2", "--ilt_dim", "16", "--d_ff", "64", flag, value]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {rule}\n" and "Epoch" not in captured.out
    assert not (out / "best_model.pt").exists()
