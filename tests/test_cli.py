"""The public command-line surface: subcommands and the flags users and scripts rely on."""

import argparse
import subprocess
import sys
from dataclasses import fields

import pytest

from hilt.cli import COMMANDS, build_parser, main, subcommand_parsers
from hilt.training.run import TrainConfig
from tests.conftest import REPO, save_untrained_checkpoint


def flags_of(command: str) -> set[str]:
    return {opt for action in subcommand_parsers()[command]._actions for opt in action.option_strings}


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
    assert (args.gradient_accumulation_steps, args.amp, args.scheduler, args.resume) == (
        1,
        True,
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


def _imports_torch(code: str, cwd) -> tuple[bool, str]:
    """Runs ``code`` in a fresh interpreter and says whether torch ended up imported (and what it printed)."""
    check = f"{code}\nimport sys\nprint('TORCH', 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=cwd, check=True)
    *printed, last = out.stdout.strip().splitlines()
    return last == "TORCH True", "\n".join(printed)


def test_help_does_not_import_torch(tmp_path):
    # importing torch takes seconds; `hilt --help` must stay instant
    code = "from hilt.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    torch_imported, printed = _imports_torch(code, tmp_path)
    assert "prepare" in printed and "train" in printed
    assert not torch_imported


def test_prepare_and_vocab_do_not_import_torch(tmp_path):
    (tmp_path / "story.txt").write_text("Once upon a time there was a tiny test.\n\nThe end.\n" * 50)
    prepare = "from hilt.cli import main\nmain(['prepare', '--text_file', 'story.txt', '--threads', '1'])"
    for expected in ("Built", "Up to date"):  # the first run tokenizes, the second finds the cache
        torch_imported, printed = _imports_torch(prepare, tmp_path)
        assert printed.splitlines()[-1].startswith(expected) and not torch_imported
    torch_imported, printed = _imports_torch("from hilt.cli import main\nmain(['vocab'])", tmp_path)
    assert "Vocabulary size: 50260" in printed and not torch_imported


def test_a_subcommand_gets_only_its_own_flags_when_run():
    # main() builds the chosen subcommand's flags only; every flag must still be there for that subcommand
    full = subcommand_parsers()
    for name in COMMANDS:
        alone = build_parser(with_flags=[name])
        sub = next(a for a in alone._actions if isinstance(a, argparse._SubParsersAction)).choices
        assert {o for a in sub[name]._actions for o in a.option_strings} == {
            o for a in full[name]._actions for o in a.option_strings
        }


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_inspect_refuses_a_modulation_scale_that_is_not_a_number(tmp_path, capsys, value):
    model = save_untrained_checkpoint(tmp_path)
    out = tmp_path / "heat.png"
    args = ["inspect", "--model_path", model, "--out", str(out), "--device", "cpu"]
    assert main([*args, f"--modulation_scale={value}"]) == 2  # "=": a bare "-inf" would read as a flag
    assert capsys.readouterr().err == f"error: --modulation_scale must be a finite number, got {value}\n"
    assert not out.exists()
