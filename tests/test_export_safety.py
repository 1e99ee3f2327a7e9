"""hilt export's safety and honesty: --overwrite deletes only an earlier export, a bad --out_dir fails before the
model loads, SIGTERM leaves nothing behind, and the folder advertises the context the model was trained on."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import hilt.checkpoint.store  # noqa: E402
from hilt.checkpoint.store import FORMAT_VERSION, atomic_save  # noqa: E402
from hilt.cli import main  # noqa: E402
from hilt.data.tokenizer import Tokenizer  # noqa: E402
from hilt.evaluation.evaluate import run_eval  # noqa: E402
from hilt.hf.export import export  # noqa: E402
from hilt.model import HierarchicalTransformer  # noqa: E402
from tests.conftest import DATA_TXT, tiny_config  # noqa: E402

MARKER_FILE = "hilt_export.json"  # what every export holds: the list of the files it wrote


def tiny_model(max_seq_len: int = 128) -> HierarchicalTransformer:
    torch.manual_seed(0)
    config = tiny_config(
        vocab_size=50260, d_model=32, n_layers=2, n_heads=2, ilt_dim=8, max_seq_len=max_seq_len
    )
    return HierarchicalTransformer(config).eval()


def save(model: HierarchicalTransformer, path: Path, train_config: dict | None) -> Path:
    ckpt = {
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "model_state_dict": model.state_dict(),
        "tokenizer": Tokenizer.load().name,
    }
    if train_config is not None:
        ckpt["train_config"] = train_config
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny model with the GPT-2 vocabulary, trained (says its record) on 64-token sequences."""
    path = tmp_path_factory.mktemp("ckpt") / "best_model.pt"
    return save(
        tiny_model(), path, {"text_file": "data.txt", "seq_len": 64, "batch_size": 8, "tokenizer": None}
    )


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(["export", *map(str, args)])
    return code, capsys.readouterr().err


def one_line(err: str) -> bool:
    return err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes): what must survive a refused export unchanged."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- --overwrite deletes only an earlier export --------------------------------------------------------------


def test_overwrite_never_deletes_the_run_folder_holding_the_checkpoint(checkpoint, tmp_path, capsys):
    run = tmp_path / "runs" / "x"
    model_path = run / "best_model.pt"
    run.mkdir(parents=True)
    model_path.write_bytes(checkpoint.read_bytes())
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 7.1}\n')
    before = snapshot(tmp_path)
    # the user's report: --out_dir RUN, the folder of the checkpoint itself; then its parent and grandparent
    for out in (run, run.parent, tmp_path):
        code, err = run_cli(capsys, "--model_path", model_path, "--out_dir", out, "--overwrite")
        assert code == 2 and one_line(err) and "holds the checkpoint being exported" in err, (out, err)
        assert snapshot(tmp_path) == before


def test_overwrite_refuses_a_folder_no_export_wrote(checkpoint, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a week of work")
    (mine / "config.json").write_text('{"model_type": "hilt"}')  # looks like an export, but has no marker
    before = snapshot(mine)
    code, err = run_cli(capsys, "--model_path", checkpoint, "--out_dir", mine, "--overwrite")
    assert code == 2 and one_line(err) and MARKER_FILE in err and "not written by hilt export" in err, err
    assert snapshot(mine) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_overwrite_replaces_an_earlier_export_but_not_files_added_to_it(checkpoint, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", "--model_path", str(checkpoint), "--out_dir", str(out)]) == 0
    listed = json.loads((out / MARKER_FILE).read_text())["files"]
    assert sorted(listed) == sorted(p.name for p in out.iterdir())  # the marker lists the folder's every file
    assert {"config.json", "model.safetensors", "README.md", MARKER_FILE} <= set(listed)

    (out / "README.md").write_text("stale card")
    assert main(["export", "--model_path", str(checkpoint), "--out_dir", str(out), "--overwrite"]) == 0
    assert (out / "README.md").read_text().startswith("---")  # replaced by a fresh export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folder left beside it

    (out / "my_eval_results.json").write_text("{}")  # a file the user added: --overwrite may not delete it
    (out / "logs").mkdir()
    before = snapshot(out)
    code, err = run_cli(capsys, "--model_path", checkpoint, "--out_dir", out, "--overwrite")
    assert code == 2 and one_line(err) and "logs, my_eval_results.json" in err, err
    assert snapshot(out) == before


def test_an_interrupted_swap_puts_the_earlier_export_back(checkpoint, tmp_path, monkeypatch):
    """Ctrl+C (or SIGTERM) between moving the old folder aside and renaming the new one into place."""
    out = tmp_path / "hf"
    export(checkpoint, out)
    before = snapshot(out)
    real_replace, into_place = os.replace, []

    def interrupted_rename_into_place(src, dst):
        if (
            Path(dst) == out and not into_place
        ):  # the new folder's rename onto --out_dir, the earlier one aside
            into_place.append(src)
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted_rename_into_place)
    with pytest.raises(KeyboardInterrupt):
        export(checkpoint, out, overwrite=True)
    monkeypatch.undo()
    assert into_place  # the interruption happened where it was meant to
    assert snapshot(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


# --- a bad --out_dir fails before the model loads ------------------------------------------------------------


def test_bad_out_dirs_fail_in_one_line_before_the_model_loads(checkpoint, tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.txt").write_text("the user's data")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --out_dir was checked")

    monkeypatch.setattr(hilt.checkpoint.store, "load_model_and_tokenizer", no_loading)
    monkeypatch.chdir(work)
    cases = [
        (("--out_dir", afile / "sub"), "which is a file, not a folder"),
        (("--out_dir", afile / "sub" / "deeper"), "which is a file, not a folder"),
        (("--out_dir", ".", "--overwrite"), "holds the current directory"),
        (("--out_dir", "..", "--overwrite"), "holds the current directory"),
        (("--out_dir", afile), "is a file, not a folder"),
    ]
    for args, needle in cases:
        code, err = run_cli(capsys, "--model_path", checkpoint, *args)
        assert code == 2 and one_line(err) and needle in err, (args, err)
    assert afile.read_text() == "not a folder" and (work / "data.txt").read_text() == "the user's data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "work"]


def test_the_command_itself_exits_2_without_a_traceback(checkpoint, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    command = [sys.executable, "-m", "hilt", "export", "--model_path", str(checkpoint)]
    run = subprocess.run(
        [*command, "--out_dir", str(afile / "sub")], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert run.returncode == 2 and one_line(run.stderr) and "afile" in run.stderr, run.stderr[-3000:]


# --- SIGTERM -------------------------------------------------------------------------------------------------

# `hilt export` with its tokenizer writer slowed down, so that the signal surely lands mid-export
SLOW_EXPORT = """
import sys, time
import hilt.hf.export as export_module
write = export_module.write_tokenizer
def slow(*args, **kwargs):
    write(*args, **kwargs)
    print("writing", flush=True)
    time.sleep(120)
export_module.write_tokenizer = slow
from hilt.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("earlier_export", [False, True], ids=["fresh", "overwrite"])
def test_sigterm_mid_export_leaves_no_temporary_folder(checkpoint, tmp_path, earlier_export):
    out = tmp_path / "hf"
    if earlier_export:
        export(checkpoint, out)
    before = snapshot(tmp_path)
    args = ["export", "--model_path", str(checkpoint), "--out_dir", str(out), "--overwrite"]
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_EXPORT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline() == "writing\n", proc.stderr.read()[-3000:]
        temporary = [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")]
        assert (
            len(temporary) == 1 and (temporary[0] / "config.json").is_file()
        )  # mid-export, as in the report
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        ["hf"] if earlier_export else []
    )  # no hidden folder
    assert snapshot(tmp_path) == before  # an earlier export untouched
    assert proc.returncode == 143 and stderr.strip().splitlines()[-1] == "terminated", stderr[-3000:]
    assert "Traceback" not in stderr


# --- the trained context -------------------------------------------------------------------------------------


def test_the_folder_advertises_the_trained_context_not_the_positions_table(checkpoint, tmp_path):
    folder = export(checkpoint, tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    assert (config["max_position_embeddings"], config["max_seq_len"]) == (64, 128)
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == 64
    # what evaluation harnesses read, through transformers
    assert AutoConfig.from_pretrained(folder).max_position_embeddings == 64
    assert AutoTokenizer.from_pretrained(folder).model_max_length == 64
    card = (folder / "README.md").read_text()
    assert "| context | 64 tokens; positions table 128 |" in card
    assert "trained on sequences of 64 tokens" in card and "1,024" not in card and "assumed" not in card
    # exporting the folder again keeps the trained context (the folder keeps the training settings)
    again = export(folder, tmp_path / "again")
    assert json.loads((again / "config.json").read_text())["max_position_embeddings"] == 64


def test_a_checkpoint_without_its_training_length_says_what_was_assumed(tmp_path):
    for name, train_config in (("none", None), ("no_seq_len", {"tokenizer": None})):
        checkpoint = save(tiny_model(max_seq_len=96), tmp_path / name / "best_model.pt", train_config)
        folder = export(checkpoint, tmp_path / name / "hf")
        assert json.loads((folder / "config.json").read_text())["max_position_embeddings"] == 96
        assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == 96
        card = (folder / "README.md").read_text()
        assert "| context | 96 tokens (assumed); positions table 96 |" in card
        assert "does not record the sequence length it was trained on" in card and "max_length=N" in card
        assert AutoModelForCausalLM.from_pretrained(folder).config.max_position_embeddings == 96


def rolling_bits_per_byte(folder: Path, text: str) -> float:
    """lm-evaluation-harness's ``loglikelihood_rolling`` with its defaults, through transformers alone: windows of
    the model's maximum length (the first of config's ``n_positions``, ``max_position_embeddings``, ``n_ctx``,
    else the tokenizer's ``model_max_length``, as its ``HFLM.max_length`` looks), each predicting the next
    ``length`` tokens after the one before them, the first after the prefix token (``<BOS>``); bits per byte
    over the whole text."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    names = [
        name for name in ("n_positions", "max_position_embeddings", "n_ctx") if hasattr(model.config, name)
    ]
    length = getattr(model.config, names[0]) if names else tokenizer.model_max_length
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    stream = [tokenizer.bos_token_id, *ids]
    nats = 0.0
    with torch.no_grad():
        for start in range(0, len(ids), length):  # window predicting ids[start : start + length]
            window = torch.tensor([stream[start : start + length + 1]])
            logits = model(window[:, :-1], use_cache=False).logits.float()  # (1, T, V)
            nats += torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
    return nats / math.log(2) / len(text.encode("utf-8"))


@pytest.mark.slow
def test_a_harness_reading_the_folder_scores_what_hilt_eval_scores(tmp_path):
    """A model trained on 16-token sequences, its positions table 512: scored through the exported folder with an
    evaluation harness's defaults, it gets hilt eval's bits per byte (3.2403 and 3.2409 when written; windows of
    128 gave 3.2576, of 512 3.2773)."""
    text = DATA_TXT.read_text(encoding="utf-8")
    train_text, eval_text = text[:200_000], text[-6_000:]
    tokens = torch.tensor(Tokenizer.load().encode(train_text))
    model = tiny_model(max_seq_len=512).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(250):
        starts = torch.randint(0, len(tokens) - 17, (16,), generator=generator)
        batch = torch.stack([tokens[s : s + 17] for s in starts.tolist()])  # (B, 17)
        logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    eval_file = tmp_path / "eval.txt"
    eval_file.write_text(eval_text, encoding="utf-8")
    checkpoint = save(
        model.eval(), tmp_path / "best_model.pt", {"seq_len": 16, "batch_size": 16, "tokenizer": None}
    )

    hilt_bpb = run_eval(str(checkpoint), str(eval_file), device="cpu").bits_per_byte  # hilt eval's defaults
    harness_bpb = rolling_bits_per_byte(export(checkpoint, tmp_path / "hf"), eval_text)
    assert abs(harness_bpb - hilt_bpb) < 0.01, (harness_bpb, hilt_bpb)
