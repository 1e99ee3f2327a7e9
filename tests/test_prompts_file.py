"""`hilt generate --prompts_file`: a reproducible resume, what --resume says about a torn last line, and the
checks that come back before torch is imported."""

import json
import subprocess
import sys

import pytest

import hilt.generation.prompts_file as prompts_file_module
from hilt.cli import main
from tests.conftest import save_untrained_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_untrained_checkpoint(tmp_path_factory.mktemp("ckpt"))


def run(capsys, *args):
    code = main(["generate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def interrupt_after(monkeypatch, n: int) -> None:
    """The next run stops with Ctrl-C once n rows are on disk."""
    real, written = prompts_file_module.append_row, []

    def append_row(f, row):
        if len(written) == n:
            raise KeyboardInterrupt
        written.append(row["index"])
        real(f, row)

    monkeypatch.setattr(prompts_file_module, "append_row", append_row)


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory):
    """The `make demo` architecture, untrained, with a 256-token context: a row's logits decoded alone and batched
    differ in their last bits here (tests/conftest.py's 32-wide model gives the same bits either way)."""
    import torch

    from hilt.checkpoint.store import FORMAT_VERSION, atomic_save
    from hilt.data.tokenizer import Tokenizer
    from hilt.model import HierarchicalTransformer, ModelConfig

    torch.manual_seed(0)
    tok = Tokenizer.load()
    config = ModelConfig(
        vocab_size=tok.vocab_size, d_model=128, n_layers=4, n_heads=4, ilt_dim=64, max_seq_len=256
    )
    model = HierarchicalTransformer(config)
    path = tmp_path_factory.mktemp("demo") / "best_model.pt"
    state = {
        "format_version": FORMAT_VERSION,
        "config": config.to_dict(),
        "model_state_dict": model.state_dict(),
        "tokenizer": tok.name,
        "train_config": {"tokenizer": None},
    }
    atomic_save(state, path)
    return str(path)


# Sampled rows with long outputs (the untrained model's nearly flat distribution puts a draw near a token boundary
# often, so rounding in the last bits shows), a filtered row, a greedy one, short ones. With two slots the last row
# decodes alone in an uninterrupted run, and next to row 1, 2 or 3 for 60 of its tokens in a run resumed after row 0.
RECORDS = [
    {"prompt": "You are all resolved rather to die than to famish?"},
    {"prompt": "Before we proceed any further, hear me speak.", "top_k": 50, "top_p": 0.9},
    {"prompt": "First, you know Caius Marcius is chief enemy", "temperature": 0, "max_new_tokens": 20},
    {
        "prompt": "Would you proceed especially against Caius Marcius?",
        "temperature": 0.7,
        "max_new_tokens": 20,
    },
    {"prompt": "First Citizen: before we proceed", "seed": 1},
]


def test_reproducible_resume_gives_the_uninterrupted_file_byte_for_byte(
    demo_checkpoint, tmp_path, capsys, monkeypatch
):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", RECORDS)
    flags = ["--model_path", demo_checkpoint, "--prompts_file", prompts, "--max_len", "100", "--seed", "0"]
    flags += ["--max_slots", "2", "--reproducible"]
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    code, _, err = run(capsys, *flags, "--out", str(whole))
    assert code == 0, err
    rows = [json.loads(line) for line in whole.read_text().splitlines()]
    assert [r["completion_tokens"] for r in rows] == [100, 100, 20, 20, 100]

    interrupt_after(monkeypatch, 1)
    code, _, err = run(capsys, *flags, "--out", str(part))
    assert code == 130 and "1 of 5 rows" in err
    monkeypatch.undo()
    with part.open("a") as f:  # and a hard kill tore the next row
        f.write(json.dumps(rows[1])[:70])
    code, _, err = run(capsys, *flags, "--out", str(part), "--resume")
    assert code == 0, err
    assert part.read_bytes() == whole.read_bytes()


def test_reproducible_row_is_the_text_it_gets_alone(demo_checkpoint, tmp_path, capsys):
    # the last row of the file, decoded next to the others, then the same record as the only row of a file
    common = ["--model_path", demo_checkpoint, "--max_len", "100", "--reproducible"]
    out = tmp_path / "all.jsonl"
    prompts = write_jsonl(tmp_path / "all_prompts.jsonl", RECORDS)
    assert run(capsys, *common, "--prompts_file", prompts, "--out", str(out), "--seed", "0")[0] == 0
    together = json.loads(out.read_text().splitlines()[4])["text"]
    alone = tmp_path / "alone.jsonl"
    prompts = write_jsonl(tmp_path / "alone_prompts.jsonl", RECORDS[4:])
    assert run(capsys, *common, "--prompts_file", prompts, "--out", str(alone))[0] == 0
    assert json.loads(alone.read_text())["text"] == together and len(together) > 100


def test_reproducible_refuses_a_sampled_row_without_a_seed(checkpoint, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "temperature": 0}, {"prompt": "b"}])
    out = tmp_path / "o.jsonl"
    code, _, err = run(
        capsys, "--model_path", checkpoint, "--prompts_file", prompts, "--out", str(out), "--reproducible"
    )
    assert code == 2 and "p.jsonl:2: --reproducible needs a seed" in err and err.count("\n") == 1
    assert not out.exists()


# --- what --resume finds in --out ----------------------------------------------------------------------------


def first_run(checkpoint, tmp_path, capsys):
    """A finished 3-row file, and the flags that made it."""
    prompts = write_jsonl(
        tmp_path / "p.jsonl", [{"prompt": "Héllo wörld"}, {"prompt": "Two"}, {"prompt": "Three"}]
    )
    out = tmp_path / "o.jsonl"
    flags = ["--model_path", checkpoint, "--prompts_file", prompts, "--out", str(out), "--max_len", "5"]
    flags += [
        "--seed",
        "3",
        "--max_slots",
        "1",
    ]  # one row at a time: the row that runs again comes out as it did
    code, _, err = run(capsys, *flags)
    assert code == 0, err
    return out, flags


def torn_row_2(lines):
    return lines[0] + lines[1] + lines[2][:40]


def torn_in_its_index(lines):
    return lines[0] + lines[1] + lines[2][:4]


def torn_inside_a_character(lines):
    # row 0 was written last, and the tear split the two UTF-8 bytes of its "é"
    return lines[1] + lines[2] + lines[0][: lines[0].index("é".encode()) + 1]


@pytest.mark.parametrize(
    "tear, row", [(torn_row_2, "row 2"), (torn_in_its_index, "its row"), (torn_inside_a_character, "row 0")]
)
def test_resume_names_the_row_of_a_torn_last_line(checkpoint, tmp_path, capsys, tear, row):
    out, flags = first_run(checkpoint, tmp_path, capsys)
    whole = out.read_bytes()
    out.write_bytes(tear(whole.splitlines(keepends=True)))
    code, _, err = run(capsys, *flags, "--resume")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and f"{out}:3 is a torn line" in warnings[0], err
    assert warnings[0].endswith(f"{row} runs again")
    assert out.read_bytes() == whole


def test_resume_refuses_a_damaged_line_that_is_not_the_last_and_leaves_the_file(checkpoint, tmp_path, capsys):
    out, flags = first_run(checkpoint, tmp_path, capsys)
    lines = out.read_text().splitlines(keepends=True)
    damaged = lines[0] + "not a row\n" + lines[2]
    out.write_text(damaged)
    code, printed, err = run(capsys, *flags, "--resume")
    assert code == 2 and f"{out}:2 is not a result row" in err and err.count("\n") == 1 and not printed
    assert out.read_text() == damaged


def test_resume_does_not_wipe_a_file_that_holds_no_rows(checkpoint, tmp_path, capsys):
    out, flags = first_run(checkpoint, tmp_path, capsys)
    notes = "my notes\nmore notes\n"
    out.write_text(notes)  # --out named the wrong file
    code, _, err = run(capsys, *flags, "--resume")
    assert code == 2 and "not a result row" in err and "Traceback" not in err
    assert out.read_text() == notes


# --- mistakes come back before torch -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "lines, flags, message",
    [
        (['{"prompt": "a"}', '{"prompt": "b",'], [], "prompts.jsonl:2: not a JSON record"),
        (['{"prompt": "a", "temprature": 0}'], [], "prompts.jsonl:1: unknown field 'temprature'"),
        (
            ['{"prompt": "a", "max_new_tokens": "9"}'],
            [],
            "prompts.jsonl:1: max_new_tokens must be an integer",
        ),
        (['{"prompt": "a", "top_p": 2}'], [], "prompts.jsonl:1: top_p must be in (0, 1]"),
        (['{"prompt": "a"}'], ["--temperature", "-1"], "--temperature must be >= 0"),
        (['{"prompt": "a"}'], ["--out", "EXISTING"], "exists: --resume continues it"),
    ],
)
def test_prompts_file_mistakes_come_back_without_importing_torch(tmp_path, lines, flags, message):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(lines) + "\n")
    existing = tmp_path / "existing.jsonl"
    existing.write_text('{"index": 0, "prompt": "a", "text": "b"}\n')
    flags = [str(existing) if f == "EXISTING" else f for f in flags]
    argv = ["generate", "--model_path", str(tmp_path / "best_model.pt"), "--prompts_file", str(prompts)]
    argv += flags if "--out" in flags else [*flags, "--out", str(tmp_path / "out.jsonl")]
    code = f"import sys\nfrom hilt.cli import main\ncode = main({argv!r})\nprint('TORCH', 'torch' in sys.modules, code)"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.stdout.splitlines()[-1] == "TORCH False 2", done.stdout + done.stderr
    assert message in done.stderr and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert not (tmp_path / "out.jsonl").exists()
    assert existing.read_text() == '{"index": 0, "prompt": "a", "text": "b"}\n'
