import asyncio
import json
import os
import threading
import time

import pytest
import torch

from hilt.cli import main
from hilt.data.tokenizer import Tokenizer
from hilt.device import _openmp_runtimes, release_openmp_workers
from hilt.generation.engine import Engine, EngineClosed, QueueFull, SamplingParams
from hilt.generation.generate import generate
from hilt.model import HierarchicalTransformer
from hilt.model.kv_cache import SlotCache
from tests.conftest import save_untrained_checkpoint, tiny_config


def tiny_model(**overrides) -> HierarchicalTransformer:
    # a strong modulation and a 3-layer ILT window, as in test_generate: a wrong ILT path would show
    values = dict(modulation_scale_end=1.0, ilt_window=3, max_seq_len=48)
    values.update(overrides)
    return HierarchicalTransformer(tiny_config(**values)).eval()


def alone(model, prompt, n, dtype=None, seed=None, **sampling):
    """What hilt.generation.generate gives for this prompt on its own."""
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    out = generate(model, torch.tensor([prompt]), n, generator=generator, compute_dtype=dtype, **sampling)
    return out[0, len(prompt) :].tolist()


def take(request, n):
    """The first n outputs of a running request (blocking)."""
    outs = []
    for out in request:
        outs.append(out)
        if len(outs) == n:
            break
    return outs


# --- the slot cache ------------------------------------------------------------------------------------------


def test_slot_cache_rows_of_different_lengths_give_each_row_its_own_logits():
    model = tiny_model(max_seq_len=64)
    seqs = [torch.randint(0, 97, (n,)).tolist() for n in (3, 11, 7)]
    c = model.config
    cache = SlotCache(c.n_layers, 4, c.max_seq_len, c.n_heads, c.d_model // c.n_heads, torch.float32)
    slots = [3, 1, 2]  # any slots for a fresh call
    with torch.inference_mode():
        ids = torch.zeros(3, 11, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
        cache.bind(slots, [len(s) for s in seqs], fresh=True)
        model(ids, cache=cache)
        assert [cache.lengths[s] for s in slots] == [3, 11, 7]
        cache.move(3, 0)  # pack the rows into slots 0..2, as the engine does
        new = torch.randint(0, 97, (3, 1))
        cache.bind([0, 1, 2], [1, 1, 1], fresh=False)
        logits = model(new, cache=cache, positions=cache.positions(), attn_mask=cache.padding_mask())
        for i, s in enumerate(seqs):
            full = model(torch.tensor([s + new[i].tolist()]))[0, -1]
            assert (logits[i, -1] - full).abs().max() < 1e-4
    assert cache.lengths[:3] == [4, 12, 8]


# --- exactness -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_greedy_rows_equal_generate_alone_whatever_else_is_in_the_batch(dtype):
    model = tiny_model()
    # very different lengths; a prompt longer than the context; 70 new tokens cross max_seq_len 48 and slide
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (1, 30, 60, 5, 12)]
    news = [40, 70, 10, 25, 3]
    greedy = [SamplingParams(max_new_tokens=n, temperature=0) for n in news]
    with Engine(model, max_slots=3, compute_dtype=dtype) as engine:  # 3 slots: the last rows wait, then join
        first = engine.submit(prompts[0], greedy[0])
        early = take(first, 8)
        # these join while the first request is mid-decode
        rest = [engine.submit(p, g) for p, g in zip(prompts[1:], greedy[1:], strict=True)]
        cancelled = engine.submit(torch.randint(0, 97, (9,)).tolist(), SamplingParams(max_new_tokens=500))
        take(cancelled, 3)
        cancelled.cancel()
        results = [first.result()] + [r.result() for r in rest]
        stats = engine.stats()
    assert [o.token_id for o in early] == results[0].token_ids[:8]
    for prompt, n, result in zip(prompts, news, results, strict=True):
        assert result.finish_reason == "length" and len(result.token_ids) == n
        assert result.token_ids == alone(model, prompt, n, dtype, temperature=0)
    end = cancelled.result()
    assert end.finish_reason == "cancelled" and 3 <= len(end.token_ids) < 500
    assert stats["running"] == stats["waiting"] == 0 and stats["finished"]["cancelled"] == 1


@pytest.mark.parametrize("kind", ["depth", "dense", "x0"])
def test_every_ilt_kind_decodes_in_batches_as_alone(kind):
    model = tiny_model(ilt_kind=kind, ilt_window=2)
    with torch.no_grad():  # these kinds start as the plain model (zero-initialised): give them a say
        for p in model.ilts.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (2, 20, 9)]
    with Engine(model, max_slots=2, compute_dtype=torch.bfloat16) as engine:
        results = engine.generate([(p, SamplingParams(max_new_tokens=40, temperature=0)) for p in prompts])
    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids == alone(model, prompt, 40, torch.bfloat16, temperature=0)


def test_seeded_sampling_is_independent_of_the_batch():
    model = tiny_model()
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (4, 25, 9)]
    settings = [
        dict(temperature=0.9, top_k=20),
        dict(temperature=1.3, top_p=0.8),
        dict(temperature=0.7),
    ]
    expected = [
        alone(model, p, 60, seed=10 + i, **s) for i, (p, s) in enumerate(zip(prompts, settings, strict=True))
    ]
    params = [SamplingParams(max_new_tokens=60, seed=10 + i, **s) for i, s in enumerate(settings)]
    with Engine(model, max_slots=8) as engine:
        together = engine.generate(list(zip(prompts, params, strict=True)))
        # the same requests among others (greedy and unseeded sampling rows), joining at other steps
        noise = [engine.submit(torch.randint(0, 97, (7,)).tolist(), SamplingParams(max_new_tokens=80))]
        take(noise[0], 5)
        among = engine.generate(list(zip(prompts, params, strict=True)))
    assert [r.token_ids for r in together] == [r.token_ids for r in among] == expected
    # the seed matters
    with Engine(model) as engine:
        other = engine.generate([(prompts[0], SamplingParams(max_new_tokens=60, seed=99, **settings[0]))])
    assert other[0].token_ids != expected[0]


def test_a_step_of_many_rows_costs_one_model_call():
    model = tiny_model()
    calls = []
    with Engine(model, max_slots=8) as engine:
        features = engine.decoder.features
        engine.decoder.features = lambda ids, **k: calls.append(tuple(ids.shape)) or features(ids, **k)
        engine.generate([([1, 2, 3], SamplingParams(max_new_tokens=6, temperature=0))] * 8)
    # eight equal prompts are prefilled in one call, then every step decodes all eight rows at once
    assert calls == [(8, 3)] + [(8, 1)] * 5


# --- text: stop strings, stop tokens, logprobs ---------------------------------------------------------------


@pytest.fixture(scope="module")
def text_model():
    torch.manual_seed(0)
    tok = Tokenizer.load()
    return tiny_model(vocab_size=tok.vocab_size, max_seq_len=64), tok


def test_stop_strings_end_the_text_before_them_even_across_tokens(text_model):
    model, tok = text_model
    prompt = tok.encode("Once upon a time")
    free = SamplingParams(max_new_tokens=40, seed=3, ignore_eos=True)
    with Engine(model, tok) as engine:
        full = engine.submit(prompt, free).result()
        pieces = [tok.decode([t]) for t in full.token_ids]
        # a stop string made of the end of one token and the start of the next
        i = next(
            i
            for i in range(5, 39)
            if len(pieces[i].strip()) >= 2
            and len(pieces[i + 1].strip()) >= 2
            and "\ufffd" not in pieces[i] + pieces[i + 1]
        )
        stop = pieces[i][-2:] + pieces[i + 1][:2]
        expected = full.text[: full.text.find(stop)]
        request = engine.submit(
            prompt, SamplingParams(max_new_tokens=40, seed=3, ignore_eos=True, stop=[stop, "never there"])
        )
        outs = list(request)
        never = engine.submit(
            prompt, SamplingParams(max_new_tokens=40, seed=3, ignore_eos=True, stop="\x00")
        ).result()
        eos_like = full.token_ids[6]
        by_token = engine.submit(
            prompt, SamplingParams(max_new_tokens=40, seed=3, stop_token_ids=[eos_like])
        ).result()
    assert "".join(o.text for o in outs) == expected and outs[-1].finish_reason == "stop"
    assert [o.token_id for o in outs] == full.token_ids[: len(outs)] and len(outs) <= i + 2
    assert all(o.finish_reason is None for o in outs[:-1])
    assert never.text == full.text and never.finish_reason == "length"
    first = full.token_ids.index(eos_like)
    assert by_token.token_ids == full.token_ids[: first + 1] and by_token.finish_reason == "stop"
    assert by_token.text == tok.decode(full.token_ids[:first])


def test_logprobs_are_the_models_and_the_chosen_token_is_among_the_top(text_model):
    model, tok = text_model
    prompt = tok.encode("Hello")
    with Engine(model, tok) as engine:
        result = engine.submit(prompt, SamplingParams(max_new_tokens=5, temperature=0, logprobs=3)).result()
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + result.token_ids]))[0, len(prompt) - 1 : -1]
    expected = logits.log_softmax(-1).gather(-1, torch.tensor(result.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(result.logprobs), expected, atol=1e-4)
    for lp, top in zip(result.logprobs, result.top_logprobs, strict=True):
        assert len(top) <= 3 and abs(max(top.values()) - lp) < 1e-6  # greedy: the chosen token is the best


# --- the API around the loop ---------------------------------------------------------------------------------


def test_a_full_queue_refuses_and_a_closed_engine_too():
    engine = Engine(tiny_model(), max_slots=1, max_queue=2)  # not started: requests only queue
    a, b = (engine.submit([1, 2], SamplingParams(max_new_tokens=3, temperature=0)) for _ in range(2))
    with pytest.raises(QueueFull):
        engine.submit([1, 2])
    assert engine.stats()["waiting"] == 2
    b.cancel()
    assert engine.stats()["waiting"] == 1 and b.result().finish_reason == "cancelled"
    engine.start()
    assert len(a.result().token_ids) == 3
    engine.shutdown()
    with pytest.raises(EngineClosed):
        engine.submit([1, 2])
    assert not engine.stats()["alive"]
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_shutdown_cancels_what_outlasts_its_timeout_and_async_iteration_sees_the_same_outputs():
    model = tiny_model()
    engine = Engine(model, max_slots=2).start()
    params = SamplingParams(max_new_tokens=30, seed=5)

    async def consume():
        return [o.token_id async for o in engine.submit([4, 5, 6], params).aiter()]

    assert asyncio.run(consume()) == engine.submit([4, 5, 6], params).result().token_ids
    endless = engine.submit([1], SamplingParams(max_new_tokens=10_000))
    take(endless, 2)
    engine.shutdown(timeout=0.05)
    assert endless.result().finish_reason == "cancelled"
    assert not any(t.name == "hilt-engine" and t.is_alive() for t in threading.enumerate())


# --- the prompts-file mode -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_untrained_checkpoint(tmp_path_factory.mktemp("ckpt"))


def run(capsys, *args):
    code = main(["generate", *args])
    out, err = capsys.readouterr()
    return code, out, err


def prompts_jsonl(tmp_path, lines):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


RECORDS = [
    {"prompt": "There was", "temperature": 0, "max_new_tokens": 12, "id": "a"},
    {"prompt": "Once", "seed": 4, "top_k": 40},
    {"prompt": "A long time ago in a land far away there lived", "max_new_tokens": 30},
    {"prompt": "", "temperature": 0.5, "stop": ["e"]},
    {"prompt": "The end", "logprobs": 2, "max_new_tokens": 3},
]


def test_prompts_file_rows_come_in_input_order_with_their_own_settings(checkpoint, tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    code, _, err = run(
        capsys, "--model_path", checkpoint, "--prompts_file", prompts_jsonl(tmp_path, RECORDS), "--out", str(out),
        "--max_len", "20", "--seed", "1", "--max_slots", "2",
    )  # fmt: skip
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4] and [r["prompt"] for r in rows] == [
        r["prompt"] for r in RECORDS
    ]
    assert rows[0]["id"] == "a" and "id" not in rows[1]
    assert [r["completion_tokens"] for r in rows][2] <= 30 and rows[4]["completion_tokens"] <= 3
    assert "e" not in rows[3]["text"] and len(rows[4]["logprobs"]) == rows[4]["completion_tokens"]
    # the greedy row is what the single-prompt mode prints for that prompt
    code, printed, _ = run(
        capsys, "--model_path", checkpoint, "--prompt", "There was", "--temperature", "0", "--max_len", "12"
    )
    assert printed == "There was" + rows[0]["text"] + "\n"


def test_resume_after_an_interruption_gives_the_uninterrupted_file(checkpoint, tmp_path, capsys, monkeypatch):
    import hilt.generation.prompts_file as prompts_file_module

    prompts = prompts_jsonl(tmp_path, RECORDS * 2)
    flags = [
        "--model_path",
        checkpoint,
        "--prompts_file",
        prompts,
        "--max_len",
        "15",
        "--seed",
        "7",
        "--max_slots",
        "3",
    ]
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    assert run(capsys, *flags, "--out", str(whole))[0] == 0

    real, written = prompts_file_module.append_row, []

    def interrupted(f, row):
        if len(written) == 4:
            raise KeyboardInterrupt
        written.append(row["index"])
        real(f, row)

    monkeypatch.setattr(prompts_file_module, "append_row", interrupted)
    code, _, err = run(capsys, *flags, "--out", str(part))
    assert code == 130 and "4 of 10 rows" in err and "--resume" in err
    assert len(part.read_text().splitlines()) == 4
    monkeypatch.undo()
    with part.open("a") as f:
        f.write('{"index": 9, "prompt": "The e')  # a line torn by a hard kill
    code, _, err = run(capsys, *flags, "--out", str(part))
    assert code == 2 and "--resume" in err
    assert run(capsys, *flags, "--out", str(part), "--resume")[0] == 0
    assert part.read_text() == whole.read_text()


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], "holds no prompts"),
        (["", "   "], "holds no prompts"),
        ([{"prompt": "a"}, '{"prompt": "b",', {"prompt": "c"}], "prompts.jsonl:2: not a JSON record"),
        (
            [{"prompt": "a"}, {"prompt": "b", "temperature": -1}],
            "prompts.jsonl:2: temperature must be a number >= 0",
        ),
        ([{"prompt": "a", "top_p": 2}], "prompts.jsonl:1: top_p must be in (0, 1]"),
        ([{"text": "a"}], 'prompts.jsonl:1: a record needs a "prompt" string'),
        ([{"prompt": "a", "temprature": 0}], "prompts.jsonl:1: unknown field 'temprature'"),
    ],
)
def test_bad_prompts_files_are_one_clear_line(checkpoint, tmp_path, capsys, lines, message):
    out = tmp_path / "out.jsonl"
    code, printed, err = run(
        capsys,
        "--model_path",
        checkpoint,
        "--prompts_file",
        prompts_jsonl(tmp_path, lines),
        "--out",
        str(out),
    )
    assert code == 2 and message in err and err.count("\n") == 1 and "Traceback" not in err and not printed
    assert not out.exists()


def test_text_prompts_files_and_flag_mistakes(checkpoint, tmp_path, capsys):
    prompts, out = tmp_path / "p.txt", tmp_path / "o.jsonl"
    prompts.write_text("First line\n\nSecond line\n")
    code, _, err = run(
        capsys,
        "--model_path",
        checkpoint,
        "--prompts_file",
        str(prompts),
        "--out",
        str(out),
        "--max_len",
        "4",
    )
    assert code == 0, err
    assert [json.loads(x)["prompt"] for x in out.read_text().splitlines()] == ["First line", "Second line"]
    for flags, message in [
        (["--prompts_file", str(prompts)], "needs --out"),
        (["--out", str(out)], "belong to --prompts_file"),
        (["--prompts_file", str(tmp_path / "missing.txt"), "--out", str(out)], "no such file"),
        (["--prompts_file", str(prompts), "--out", str(out), "--max_slots", "0"], "--max_slots must be >= 1"),
    ]:
        code, _, err = run(capsys, "--model_path", checkpoint, *flags)
        assert code == 2 and message in err and err.count("\n") == 1


# --- OpenMP worker threads -----------------------------------------------------------------------------------


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def parallel_op() -> None:
    torch.ones(1 << 20).add_(1)  # far above torch's grain size: it runs on every OpenMP thread


needs_gnu_openmp = pytest.mark.skipif(not _openmp_runtimes(), reason="needs GNU OpenMP (Linux)")
workers = 1  # two torch threads: each pool holds one worker besides the thread that owns it


@pytest.fixture
def two_threads():
    torch.set_num_threads(2)  # the tests run on one (conftest)
    yield
    torch.set_num_threads(1)
    release_openmp_workers()


@needs_gnu_openmp
def test_releasing_ends_this_threads_openmp_workers_and_the_next_parallel_op_brings_them_back(two_threads):
    parallel_op()
    with_pool = os_threads()
    release_openmp_workers()
    assert os_threads() == with_pool - workers
    parallel_op()
    assert os_threads() == with_pool


@needs_gnu_openmp
def test_an_idle_engine_holds_no_openmp_workers_and_submitting_releases_the_callers(two_threads):
    # GNU OpenMP lets idle workers spin only while it manages no more threads than CPUs; past that each parallel
    # operator of the decode thread wakes sleeping ones (batch-1 decoding 2.5x slower on 2 cores)
    model = tiny_model(vocab_size=4096, d_model=64, max_seq_len=64)  # a head large enough to run in parallel
    parallel_op()  # the main thread's pool, as loading a model makes one
    alone = os_threads() - workers
    with Engine(model, max_slots=2) as engine:
        assert os_threads() == alone + 1  # start released the main thread's workers; the decode thread waits
        parallel_op()
        request = engine.submit(list(range(1, 40)), SamplingParams(max_new_tokens=30, ignore_eos=True))
        seen = set()
        while not request.finished:
            seen.add(os_threads())
        assert max(seen) == alone + 1 + workers  # the main thread's were released; the decode thread's ran
        deadline = time.monotonic() + 5
        while os_threads() != alone + 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os_threads() == alone + 1  # idle again: the decode thread's workers are gone too
