"""The public command-line surface: subcommands and the flags users and scripts rely on."""

import subprocess
import sys
from dataclasses import fields

import pytest

from hilt.cli import COMMANDS, build_parser, main
from hilt.train import TrainConfig
from tests.conftest import REPO


def flags_of(command: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return {opt for action in sub._actions for opt in action.option_strings}


def test_subcommands():
    assert {"train", "generate", "vocab", "prepare", "eval", "plot", "inspect"} <= set(COMMANDS)


def test_train_flags_of_the_design_and_beyond():
    design = {
        "--text_file",
        "--model_dim",
        "--max_tokens",
        "--batch_size",
        "--seq_len",
        "--epochs",
        "--lr",
        "--clip_grad",
        "--gradient_accumulation_steps",
        "--no_amp",
        "--scheduler",
        "--resume",
    }
    ours = {
        "--n_layers",
        "--n_heads",
        "--n_layers_ilt",
        "--ilt_dim",
        "--nhead_ilt",
        "--ilt_dropout",
        "--modulation_scale_start",
        "--modulation_scale_end",
        "--out_dir",
        "--seed",
        "--device",
        "--save_every",
    }
    assert design | ours <= flags_of("train")


def test_every_train_setting_is_a_flag():
    args = build_parser().parse_args(["train", "--text_file", "x"])
    assert [f.name for f in fields(TrainConfig) if f.name != "amp" and not hasattr(args, f.name)] == []


def test_train_defaults_are_the_designs():
    args = build_parser().parse_args(["train", "--text_file", "x"])
    assert (args.max_tokens, args.batch_size, args.seq_len, args.epochs, args.lr, args.clip_grad) == (
        100000,
        32,
        128,
        10,
        5e-4,
        1.0,
    )
    assert (args.gradient_accumulation_steps, args.no_amp, args.scheduler, args.resume) == (
        1,
        False,
        "cosine",
        None,
    )


def test_generate_flags():
    expected = {
        "--model_path",
        "--prompt",
        "--max_len",
        "--temperature",
        "--top_k",
        "--top_p",
        "--use_beam_search",
        "--beam_width",
        "--use_cache",
        "--seed",
        "--num_samples",
        "--stream",
        "--device",
        "--model_dim",
    }
    assert expected <= flags_of("generate")


def test_unknown_flag_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--text_file", "x", "--bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--bogus" in err


def test_build_vocab_script_prints_the_tokenizer_facts():
    out = subprocess.run(
        [sys.executable, str(REPO / "build_vocab.py")], capture_output=True, text=True, check=True
    )
    assert "Vocabulary size: 50260" in out.stdout
    for line in ("<PAD>: 50257", "<BOS>: 50258", "<EOS>: 50259", "(identical)"):
        assert line in out.stdout
