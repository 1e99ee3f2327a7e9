"""hilt export and the transformers model: what a user of the exported folder relies on, offline, on tiny models
(a width of 32 with the real 50,260-id GPT-2 vocabulary, so the shipped tokenizer fits)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, pipeline  # noqa: E402

import hilt.model.config  # noqa: E402
import hilt.model.ilts  # noqa: E402
from hilt.checkpoint.store import FORMAT_VERSION, atomic_save, load_model_and_tokenizer  # noqa: E402
from hilt.cli import main, subcommand_parsers  # noqa: E402
from hilt.data.tokenizer import Tokenizer  # noqa: E402
from hilt.generation.generate import generate  # noqa: E402
from hilt.hf import HiltConfig, HiltForCausalLM  # noqa: E402
from hilt.hf.export import HF_FILES, MODEL_FILES, PACKAGE, export  # noqa: E402
from hilt.model import HierarchicalTransformer  # noqa: E402
from tests.conftest import tiny_config  # noqa: E402

VOCAB = 50260
PROMPTS = ["Hello there, my good friend", "To be", "ROMEO: a much longer prompt than the other two of them"]


def tiny_gpt2_config(**overrides):
    values = dict(vocab_size=VOCAB, d_model=32, n_heads=2, ilt_dim=8, max_seq_len=128)
    return tiny_config(**{**values, **overrides})


def save_checkpoint(model: HierarchicalTransformer, path: Path) -> Path:
    train_config = {"text_file": "data.txt", "epochs": 3, "seq_len": 64, "batch_size": 8, "tokenizer": None}
    ckpt = {
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "model_state_dict": model.state_dict(),
        "tokenizer": Tokenizer.load().name,
        "global_step": 1234,
        "val_loss": 4.5678,
        "train_config": train_config,
    }
    atomic_save(ckpt, path)
    return path


def exported_model(tmp_path: Path, **overrides) -> tuple[HierarchicalTransformer, Path]:
    torch.manual_seed(0)
    model = HierarchicalTransformer(tiny_gpt2_config(**overrides)).eval()
    checkpoint = save_checkpoint(model, tmp_path / "best_model.pt")
    return model, export(checkpoint, tmp_path / "hf")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(HILT model, its checkpoint, the exported folder, the folder loaded by transformers, AutoTokenizer)."""
    tmp_path = tmp_path_factory.mktemp("export")
    model, folder = exported_model(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    return model, tmp_path / "best_model.pt", folder, hf, AutoTokenizer.from_pretrained(folder)


def hilt_greedy(model, ids: list[int], n: int, use_cache: bool = True) -> list[int]:
    out = generate(model, torch.tensor([ids]), n, temperature=0, use_cache=use_cache)
    return out[0, len(ids) :].tolist()


# --- the folder ----------------------------------------------------------------------------------------------


def test_the_folder_holds_every_file_and_the_packages_own_model_code(exported):
    model, _, folder, _, _ = exported
    names = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "README.md",
        "hilt_checkpoint.json",
        *MODEL_FILES,
        *HF_FILES,
    } <= names
    for name in MODEL_FILES:  # byte for byte: the exported model cannot drift from the trained one
        assert (folder / name).read_bytes() == (PACKAGE / "model" / name).read_bytes(), name
    for name in HF_FILES:  # only the import depth differs, and nothing imports hilt
        exported_code = (folder / name).read_text()
        source = (PACKAGE / "hf" / name).read_text()
        assert exported_code == source.replace("from ..model.", "from .").replace("from ..", "from .")
        assert "hilt." not in "".join(line for line in exported_code.splitlines() if "import" in line)

    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "hilt"
    assert {k: config[k] for k in model.config.to_dict()} == model.config.to_dict()
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_hilt.HiltForCausalLM"
    generation = json.loads((folder / "generation_config.json").read_text())
    assert (generation["pad_token_id"], generation["bos_token_id"], generation["eos_token_id"]) == (
        50257,
        50258,
        50259,
    )
    assert generation["modulation_scale"] == model.config.modulation_scale_end
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask and modes == {
        0o666 & ~umask
    }  # not mkdtemp's 0o700
    card = (folder / "README.md").read_text()
    assert (
        "4.5678" in card
        and "1,234" in card
        and "data.txt" in card
        and "| ILT kind | design (the seed's ILT" in card
    )


def test_tied_weights_are_stored_once(exported):
    from safetensors import safe_open

    _, _, folder, hf, _ = exported
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.embed.weight" in keys and "model.head.weight" not in keys
    assert hf.model.head.weight.data_ptr() == hf.model.embed.weight.data_ptr()


def test_the_tokenizer_encodes_as_hilt_does_with_the_special_tokens_at_hilts_ids(exported):
    *_, tokenizer = exported
    hilt_tokenizer = Tokenizer.load()
    text = "Hello world! To be, or not to be.\n  ROMEO: <|endoftext|> é"
    assert tokenizer(text)["input_ids"] == hilt_tokenizer.encode(text)
    assert tokenizer.decode(hilt_tokenizer.encode(text)) == text
    ids = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert ids == (50257, 50258, 50259)
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<PAD>", "<BOS>", "<EOS>")
    assert tokenizer.padding_side == "left"


# --- the transformers model equals HILT's --------------------------------------------------------------------


# every registered ILT kind, the design with a longer window, the plain transformer and an untied head
ILT_KINDS = tuple(hilt.model.ilts.KINDS)
KINDS = {
    **{kind: {"ilt_kind": kind} for kind in ILT_KINDS if kind != "design"},
    "design": {},
    "no-ilt": {"n_layers_ilt": 0},
    "window-3": {"ilt_window": 3, "n_layers": 4},
    "untied": {"tie_weights": False},
}


@pytest.mark.parametrize("kind", KINDS.values(), ids=KINDS.keys())
def test_logits_and_greedy_tokens_equal_hilts_for_every_ilt_kind(tmp_path, kind):
    torch.manual_seed(0)
    model = HierarchicalTransformer(tiny_gpt2_config(**kind)).eval()
    with torch.no_grad():  # trained weights, not the initial ones: zero-initialised parts and gates move too
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    folder = export(save_checkpoint(model, tmp_path / "m.pt"), tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.randint(0, VOCAB, (2, 24))
    padded = torch.cat(
        [torch.full((1, 5), 50257), ids[1:, :19]], dim=1
    )  # row 1's first 19 tokens, left-padded
    mask = (padded != 50257).long()
    with torch.no_grad():
        assert (hf(ids).logits - model(ids)).abs().max() < 1e-5
        assert (hf(padded, attention_mask=mask).logits[:, 5:] - model(ids[1:, :19])).abs().max() < 1e-5
    greedy = hf.generate(ids[:1, :6], do_sample=False, max_new_tokens=10)  # with transformers' cache
    assert greedy[0, 6:].tolist() == hilt_greedy(model, ids[0, :6].tolist(), 10)


def test_modulation_scale_comes_from_the_generation_config_or_the_call(exported):
    model, _, _, hf, _ = exported
    ids = torch.randint(0, VOCAB, (1, 8))
    assert hf.generation_config.modulation_scale == model.config.modulation_scale_end
    with torch.no_grad():
        assert (hf(ids, modulation_scale=3.0).logits - model(ids, modulation_scale=3.0)).abs().max() < 1e-5
    rescaled = HierarchicalTransformer(model.config).eval()
    rescaled.load_state_dict(model.state_dict())
    rescaled.config = hilt.model.config.ModelConfig.from_dict(
        {**model.config.to_dict(), "modulation_scale_end": 3.0}
    )
    expected = hilt_greedy(rescaled, ids[0].tolist(), 10)
    assert (
        hf.generate(ids, do_sample=False, max_new_tokens=10, modulation_scale=3.0)[0, 8:].tolist() == expected
    )
    assert hf.generate(ids, do_sample=False, max_new_tokens=10)[0, 8:].tolist() == hilt_greedy(
        model, ids[0].tolist(), 10
    )
    assert expected != hilt_greedy(
        model, ids[0].tolist(), 10
    )  # the scale changed the tokens: the test can see it


def test_labels_give_the_next_token_cross_entropy(exported):
    model, _, _, hf, _ = exported
    ids = torch.randint(0, VOCAB, (2, 10))
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt not to be scored
    with torch.no_grad():
        out = hf(ids, labels=labels)
        logits = model(ids)
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    assert abs(out.loss.item() - expected.item()) < 1e-5
    assert torch.allclose(out.logits, logits, atol=1e-5)


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generate_gives_hilts_tokens(exported, use_cache):
    model, _, _, hf, tokenizer = exported
    ids = tokenizer("ROMEO: ", return_tensors="pt")["input_ids"]
    out = hf.generate(ids, do_sample=False, max_new_tokens=50, use_cache=use_cache)
    new = out[0, ids.size(1) :].tolist()
    expected = hilt_greedy(model, ids[0].tolist(), 50, use_cache)
    if 50259 in expected:  # transformers stops at <EOS>; HILT without an eos id does not
        expected = expected[: expected.index(50259) + 1]
    assert new == expected


def test_a_left_padded_batch_gives_each_prompt_its_own_greedy_tokens(exported):
    model, _, _, hf, tokenizer = exported
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == 3 and (batch["input_ids"][:, 0] == tokenizer.pad_token_id).sum() == 2
    out = hf.generate(**batch, do_sample=False, max_new_tokens=20)
    for row, prompt in enumerate(PROMPTS):
        alone = hilt_greedy(model, tokenizer(prompt)["input_ids"], 20)
        assert out[row, batch["input_ids"].size(1) :].tolist() == alone
    with torch.no_grad():  # the padded rows' logits themselves, not only their argmax
        padded = hf(**batch).logits
        for row, length in enumerate(lengths):
            alone = model(batch["input_ids"][row : row + 1, -length:])
            assert (padded[row : row + 1, -length:] - alone).abs().max() < 1e-5


def test_beam_search_runs_and_seeded_sampling_repeats(exported):
    _, _, _, hf, tokenizer = exported
    ids = tokenizer(["To be", "ROMEO: speak"], return_tensors="pt", padding=True)
    beams = {
        use_cache: hf.generate(**ids, num_beams=3, max_new_tokens=12, use_cache=use_cache)
        for use_cache in (True, False)
    }
    assert beams[True].shape == (2, ids["input_ids"].size(1) + 12)
    assert torch.equal(beams[True], beams[False])
    samples = []
    for _ in range(2):
        torch.manual_seed(7)
        samples.append(hf.generate(**ids, do_sample=True, top_k=40, temperature=0.9, max_new_tokens=12))
    assert torch.equal(samples[0], samples[1])
    torch.manual_seed(8)
    assert not torch.equal(samples[0], hf.generate(**ids, do_sample=True, max_new_tokens=12))


def test_the_text_generation_pipeline_returns_text(exported):
    folder = exported[2]
    generator = pipeline("text-generation", model=str(folder))
    out = generator("ROMEO:", max_new_tokens=8, do_sample=False)
    text = out[0]["generated_text"]
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")


def test_importing_hilt_hf_registers_the_auto_classes(exported):
    folder = exported[2]
    assert isinstance(AutoConfig.from_pretrained(folder), HiltConfig)
    assert type(AutoModelForCausalLM.from_pretrained(folder)) is HiltForCausalLM  # no trust_remote_code


# a sys.path that cannot import hilt: the exported folder has to carry everything the model needs
REMOTE_CODE = r"""
import importlib.util, json, sys
from pathlib import Path
sys.path = [p for p in sys.path if not (Path(p or ".") / "hilt").is_dir()]
assert importlib.util.find_spec("hilt") is None, "hilt is importable"
import torch
from transformers import AutoModelForCausalLM
folder, expected = sys.argv[1], torch.load(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    diff = (model(expected["ids"]).logits - expected["logits"]).abs().max().item()
greedy = model.generate(expected["ids"][:1], do_sample=False, max_new_tokens=10)
print(json.dumps({"module": type(model).__module__, "diff": diff, "greedy": greedy[0].tolist()}))
"""


def test_trust_remote_code_works_where_hilt_cannot_be_imported(exported, tmp_path):
    model, _, folder, _, _ = exported
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids)}, tmp_path / "expected.pt")
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE, str(folder), str(tmp_path / "expected.pt")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["module"].startswith("transformers_modules.") and result["module"].endswith(
        ".modeling_hilt"
    )
    assert result["diff"] < 1e-5
    assert result["greedy"][12:] == hilt_greedy(model, ids[0].tolist(), 10)


# --- the folder back into HILT -------------------------------------------------------------------------------


def test_hilt_loads_the_folder_back_exactly(exported):
    model, _, folder, _, _ = exported
    loaded, tokenizer, ckpt = load_model_and_tokenizer(folder, torch.device("cpu"))
    original, back = model.state_dict(), loaded.state_dict()
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)
    assert loaded.config == model.config and not loaded.training
    assert tokenizer.name == Tokenizer.load().name == ckpt["tokenizer"]
    assert ckpt["config"] == model.config.to_dict()
    assert (ckpt["global_step"], ckpt["val_loss"], ckpt["train_config"]["epochs"]) == (1234, 4.5678, 3)


def test_an_exported_folder_exports_again_unchanged(exported, tmp_path):
    model, _, folder, _, _ = exported
    again = export(folder, tmp_path / "again")
    loaded = load_model_and_tokenizer(again, torch.device("cpu"))[0]
    original, back = model.state_dict(), loaded.state_dict()
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)
    assert (again / "hilt_checkpoint.json").read_text() == (folder / "hilt_checkpoint.json").read_text()
    assert (again / "README.md").read_text() == (folder / "README.md").read_text()


def test_hilt_reads_a_folder_without_importing_transformers(exported):
    # transformers takes seconds to import; `hilt generate --model_path FOLDER` should not wait for it
    code = (
        "import sys, torch; from hilt.checkpoint.store import load_model_and_tokenizer; "
        f"load_model_and_tokenizer({str(exported[2])!r}, torch.device('cpu')); print('transformers' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == "False"


def test_a_folder_without_hilts_record_uses_its_own_tokenizer(exported, tmp_path):
    import shutil

    folder = shutil.copytree(exported[2], tmp_path / "bare")
    (folder / "hilt_checkpoint.json").unlink()
    _, tokenizer, ckpt = load_model_and_tokenizer(folder, torch.device("cpu"))
    text = "To be, or not to be"
    assert tokenizer.encode(text) == Tokenizer.load().encode(text)
    assert ckpt["tokenizer"] == tokenizer.name and ckpt["train_config"]["tokenizer"] == str(folder)


def test_hilt_generate_prints_the_same_text_from_the_folder_as_from_the_checkpoint(exported, capsys):
    _, checkpoint, folder, _, _ = exported
    printed = []
    for path in (checkpoint, folder):
        args = ["generate", "--model_path", str(path), "--prompt", "To be", "--max_len", "12"]
        assert main([*args, "--temperature", "0", "--no_amp", "--device", "cpu"]) == 0
        printed.append(capsys.readouterr().out)
    assert printed[0] == printed[1] and printed[0].strip()


# --- the command ---------------------------------------------------------------------------------------------


def test_the_export_command_and_its_flags():
    flags = {o for a in subcommand_parsers()["export"]._actions for o in a.option_strings}
    assert {"--model_path", "--out_dir", "--overwrite"} <= flags


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


def test_bad_inputs_are_one_line_and_exit_status_2(exported, tmp_path, capsys):
    checkpoint = exported[1]
    not_a_checkpoint = tmp_path / "notes.txt"
    not_a_checkpoint.write_text("hello")
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    cases = [
        (("export", "--model_path", str(not_a_checkpoint), "--out_dir", str(tmp_path / "a")), "notes.txt"),
        (("export", "--model_path", str(checkpoint), "--out_dir", str(taken)), "--overwrite"),
        (("export", "--model_path", str(stranger), "--out_dir", str(tmp_path / "b")), "not a HILT export"),
        (("generate", "--model_path", str(stranger)), "not a HILT export"),
        (("generate", "--model_path", str(tmp_path)), "not a HILT export"),
    ]
    for args, needle in cases:
        code, err = run_cli(capsys, *args)
        assert code == 2, args
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert [p.name for p in taken.iterdir()] == ["keep.txt"] and not (tmp_path / "a").exists()


def test_a_folder_from_a_newer_hilt_is_refused_not_misread(exported, tmp_path, capsys):
    import shutil

    folder = shutil.copytree(exported[2], tmp_path / "newer")
    for name in ("config.json", "hilt_checkpoint.json"):
        values = json.loads((folder / name).read_text())
        if name == "config.json":
            values["ilt_future_variant"] = True
        else:
            values["config_fields"].append("ilt_future_variant")
        (folder / name).write_text(json.dumps(values))
    code, err = run_cli(capsys, "generate", "--model_path", str(folder))
    assert code == 2 and "newer HILT" in err and "ilt_future_variant" in err and err.count("\n") == 1


def test_a_checkpoint_the_export_cannot_represent_is_refused(tmp_path, capsys):
    model = HierarchicalTransformer(tiny_gpt2_config())
    ckpt = {
        "format_version": FORMAT_VERSION,
        "config": {**model.config.to_dict(), "ilt_future_variant": True},
    }
    atomic_save({**ckpt, "model_state_dict": model.state_dict()}, tmp_path / "m.pt")
    code, err = run_cli(
        capsys, "export", "--model_path", str(tmp_path / "m.pt"), "--out_dir", str(tmp_path / "x")
    )
    assert code == 2 and "ilt_future_variant" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_overwrite_replaces_and_a_failed_export_leaves_nothing(exported, tmp_path, capsys, monkeypatch):
    checkpoint = exported[1]
    out = export(checkpoint, tmp_path / "out")  # --overwrite replaces only an earlier export
    (out / "README.md").write_text("stale")
    assert main(["export", "--model_path", str(checkpoint), "--out_dir", str(out), "--overwrite"]) == 0
    assert (out / "README.md").read_text() != "stale" and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left beside it

    import hilt.hf.export as export_module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "write_tokenizer", broken)
    with pytest.raises(OSError, match="disk full"):
        export(checkpoint, tmp_path / "half")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
