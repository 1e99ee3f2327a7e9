"""``hilt generate --prompts_file F --out results.jsonl``: a whole file of prompts through the batched engine, each
record with its own sampling settings; rows are written as they finish, so an interrupted run keeps them and
``--resume`` skips them.

The prompts file and ``--out`` are checked before torch is imported (seconds) and the model loads, so a mistake in
either comes back at once. ``--reproducible`` decodes one row at a time: a row's logits change in their last bits
with the company it is decoded in (its steps alone run other kernels than its batched steps, and a resumed run
batches differently), which moves a sampled row's draw whenever it lands that close to the boundary between two
tokens (docs/generation.md).
"""

from __future__ import annotations

import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hilt.errors import UserError
from hilt.generation.request import SamplingParams

if TYPE_CHECKING:
    from hilt.generation.config import GenerationConfig


# what a .jsonl record may carry besides "prompt": an "id" copied to its result, and SamplingParams' fields
_RECORD_KEYS = (
    "id",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "stop",
    "stop_token_ids",
    "logprobs",
    "ignore_eos",
)


@dataclass
class PromptRecord:
    index: int  # its place in the file's prompts, from 0: the key of its result
    line: int  # for messages
    prompt: str
    params: dict  # SamplingParams fields the record sets
    id: object = None


def run_prompts_file(cfg: GenerationConfig) -> list[str]:
    """Checks the prompts file and ``cfg.out``, loads the model, runs the prompts not yet in ``cfg.out`` and returns
    the texts of the rows it generated."""
    records = read_prompts_file(cfg)
    done = read_finished_rows(cfg, records)
    # torch from here on: everything a user can get wrong in the two files has been said
    from hilt.checkpoint.store import load_model_and_tokenizer
    from hilt.device import autocast_dtype, cpu_threads, resolve_device

    with cpu_threads(cfg.threads):  # an explicit --threads holds for this command, not after it
        device = resolve_device(cfg.device)
        model, tokenizer, _ = load_model_and_tokenizer(
            cfg.model_path, device, requested={"d_model": cfg.model_dim}
        )
        return generate_rows(cfg, records, done, model, tokenizer, autocast_dtype(device, cfg.amp))


def read_prompts_file(cfg: GenerationConfig) -> list[PromptRecord]:
    """The prompts of ``cfg.prompts_file``: each non-blank line of a text file, or each record of a .jsonl file
    ({"prompt": ..., optional "id" and sampling fields}). Every record's settings are checked here, so a bad one
    stops the run before anything is generated, naming its line."""
    path = Path(cfg.prompts_file)
    if not path.is_file():
        raise UserError(f"--prompts_file {path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"--prompts_file {path} is not UTF-8 text") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if path.suffix != ".jsonl":
            record = PromptRecord(len(records), number, line, {})
        else:
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as e:
                from hilt.data.sources import json_error  # e.msg alone can end mid-sentence

                raise UserError(f"{where}: not a JSON record: {json_error(e)}") from None
            if not isinstance(fields, dict) or not isinstance(fields.get("prompt"), str):
                raise UserError(f'{where}: a record needs a "prompt" string')
            unknown = sorted(set(fields) - {"prompt", *_RECORD_KEYS})
            if unknown:
                raise UserError(
                    f"{where}: unknown field {unknown[0]!r} (known: prompt, {', '.join(_RECORD_KEYS)})"
                )
            params = {k: v for k, v in fields.items() if k not in ("prompt", "id")}
            record = PromptRecord(len(records), number, fields["prompt"], params, fields.get("id"))
        try:
            sampling = _sampling_params(cfg, record)
        except (ValueError, TypeError) as e:
            raise UserError(f"{where}: {e}") from None
        if cfg.reproducible and sampling.temperature > 0 and sampling.seed is None:
            raise UserError(
                f'{where}: --reproducible needs a seed for every sampled row: --seed, or a "seed" field'
            )
        records.append(record)
    if not records:
        raise UserError(f"--prompts_file {path} holds no prompts")
    return records


def _sampling_params(cfg: GenerationConfig, record: PromptRecord) -> SamplingParams:
    """The flags' settings, overridden by the record's own; with --seed, row i's seed is seed + i."""
    values = dict(
        max_new_tokens=cfg.max_len,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        seed=None if cfg.seed is None else cfg.seed + record.index,
    )
    values.update(record.params)
    return SamplingParams(**values)


def read_finished_rows(cfg: GenerationConfig, records: list[PromptRecord]) -> dict[int, dict]:
    """The rows already in ``cfg.out``, by index; reads only (the file is rewritten once the model has loaded).

    Without ``cfg.resume`` a non-empty ``--out`` is refused. The last line may be torn (a run killed while writing
    it): it is dropped with a warning naming its row, which runs again. Any other line that is not a row of this
    prompts file is an error, and the file stays as it is."""
    out_path = Path(cfg.out)
    if out_path.is_dir():
        raise UserError(f"--out {out_path} is a folder; name a file")
    if not out_path.parent.is_dir():
        raise UserError(f"--out {out_path}: no folder {out_path.parent}")
    if not out_path.exists() or not out_path.stat().st_size:
        return {}
    if not cfg.resume:
        raise UserError(f"--out {out_path} exists: --resume continues it, or remove it")
    lines = out_path.read_bytes().split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the newline that ends the last row
    done: dict[int, dict] = {}
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line.decode("utf-8"))  # a tear can split a character too
        except (UnicodeDecodeError, json.JSONDecodeError):
            if number < len(lines):
                raise UserError(f"--out {out_path}:{number} is not a result row; use another --out") from None
            torn = re.match(rb'\{"index": (\d+)', line)
            row_name = f"row {int(torn[1])}" if torn else "its row"
            print(
                f"warning: {out_path}:{number} is a torn line (a run stopped while writing it); "
                f"dropping it, {row_name} runs again",
                file=sys.stderr,
            )
            continue
        i = row.get("index") if isinstance(row, dict) else None
        if not isinstance(i, int) or not 0 <= i < len(records) or row.get("prompt") != records[i].prompt:
            raise UserError(f"--out {out_path} holds results of another prompts file; use another --out")
        done[i] = row
    return done


def generate_rows(
    cfg: GenerationConfig, records, done: dict[int, dict], model, tokenizer, compute_dtype
) -> list[str]:
    """Runs every prompt not in ``done`` through one engine and writes ``cfg.out`` (JSON lines, one per prompt).

    Rows are appended (and flushed) as they finish, so an interruption keeps every finished row; when all are
    done the file is rewritten in input order."""
    from tqdm import tqdm

    from hilt.files import atomic_write
    from hilt.generation.engine import Engine

    out_path = Path(cfg.out)

    def write_all(rows: list[dict]) -> None:
        atomic_write(
            out_path,
            lambda f: f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()),
        )

    write_all([done[i] for i in sorted(done)])  # drops a torn line before appending
    todo = [r for r in records if r.index not in done]
    context = model.config.max_seq_len

    def items():
        for r in todo:
            ids = (tokenizer.encode(r.prompt) or [tokenizer.bos_id])[-context:]
            yield ids, _sampling_params(cfg, r)

    # One slot makes every model call of a row the same whatever the other rows are: alone in its prefill, alone
    # in each decoding step, in the same slot. Batched, a row's steps run other kernels than its steps alone (and
    # on some CPUs other kernels per batch size), so its logits move in the last bits with its company. The thread
    # count stays fixed too, never "auto", which follows the machine's load: a parallel reduction can split by it.
    if cfg.reproducible:
        slots, threads = 1, cfg.threads  # None: the process's count
    else:
        slots, threads = cfg.max_slots, cfg.threads or "auto"
    texts, tokens, started = [], 0, time.perf_counter()
    bar = tqdm(total=len(records), initial=len(done), unit="prompt", file=sys.stderr, dynamic_ncols=True)
    try:
        with (
            Engine(model, tokenizer, max_slots=slots, compute_dtype=compute_dtype, threads=threads) as engine,
            out_path.open("a", encoding="utf-8") as f,
        ):
            for k, result in engine.generate_iter(items()):
                record = todo[k]
                row = {"index": record.index}
                if record.id is not None:
                    row["id"] = record.id
                row.update(
                    prompt=record.prompt,
                    text=result.text,
                    finish_reason=result.finish_reason,
                    prompt_tokens=len(result.prompt_ids),
                    completion_tokens=len(result.token_ids),
                )
                if result.logprobs is not None:
                    row.update(logprobs=result.logprobs, top_logprobs=result.top_logprobs)
                append_row(f, row)
                done[record.index] = row
                texts.append(result.text)
                tokens += len(result.token_ids)
                bar.update()
                bar.set_postfix_str(f"{tokens / (time.perf_counter() - started):.1f} tokens/s")
    except KeyboardInterrupt:
        bar.close()
        print(
            f"{len(done)} of {len(records)} rows are in {out_path}; --resume runs the rest", file=sys.stderr
        )
        raise
    bar.close()
    write_all([done[i] for i in sorted(done)])  # input order
    return texts


def append_row(f, row: dict) -> None:
    """One finished row, on disk at once (a test interrupts the run here)."""
    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()
