"""The glue behind ``hilt generate`` and ``inference.py``: a checkpoint loaded for generation, prompts through
the engine (or beam search), text printed as it comes; ``--prompts_file`` hands over to ``prompts_file``.
"""

from __future__ import annotations

import sys
from typing import TextIO

import torch

from hilt.generation.config import GenerationConfig
from hilt.generation.generate import beam_search

# --- glue: from settings to printed text ---------------------------------------------------------------------


def load_for_generation(cfg: GenerationConfig, device: torch.device):
    """Model (eval mode, on ``device``) and the tokenizer it was trained with, from ``cfg.model_path``."""
    from hilt.checkpoint.store import load_model_and_tokenizer

    model, tokenizer, _ = load_model_and_tokenizer(
        cfg.model_path, device, requested={"d_model": cfg.model_dim}
    )
    return model, tokenizer


def run_generation(cfg: GenerationConfig, out: TextIO | None = None) -> list[str]:
    """Loads the checkpoint, generates ``cfg.num_samples`` continuations of the prompt, prints each (prompt +
    continuation) to ``out`` (default: stdout) and returns the continuations. With ``cfg.prompts_file``, runs
    the whole file instead (``run_prompts_file``) and returns the texts of the rows it generated."""
    from hilt.device import cpu_threads

    with cpu_threads(cfg.threads):  # an explicit --threads holds for this command, not after it
        return _run_generation(cfg, out)


def _run_generation(cfg: GenerationConfig, out: TextIO | None) -> list[str]:
    if cfg.prompts_file is not None:
        from hilt.generation.prompts_file import run_prompts_file

        return run_prompts_file(cfg)
    out = out or sys.stdout
    from hilt.device import autocast_dtype, cpu_threads, resolve_device
    from hilt.generation.engine import Engine, SamplingParams
    from hilt.generation.threads import threads_that_fit

    device = resolve_device(cfg.device)
    model, tokenizer = load_for_generation(cfg, device)
    compute_dtype = autocast_dtype(device, cfg.amp)
    ids = tokenizer.encode(cfg.prompt) or [tokenizer.bos_id]  # an empty prompt starts from <BOS>
    context = model.config.max_seq_len
    if len(ids) > context:
        print(
            f"warning: the prompt is {len(ids)} tokens, longer than the model's context of {context}; "
            f"keeping its last {context}",
            file=sys.stderr,
        )
        ids = ids[-context:]

    if cfg.use_beam_search:
        print(cfg.prompt, end="", file=out, flush=True)
        # beam search decodes on this thread, not the engine's: no --threads takes the cores free right now
        threads = cfg.threads or (threads_that_fit() if device.type == "cpu" else None)
        with cpu_threads(threads):
            new = beam_search(
                model,
                torch.tensor([ids], dtype=torch.long, device=device),
                cfg.max_len,
                beam_width=cfg.beam_width,
                use_cache=cfg.use_cache,
                eos_token_id=tokenizer.eos_id,
                compute_dtype=compute_dtype,
            )[0, len(ids) :].tolist()
        text = tokenizer.decode([t for t in new if t != tokenizer.eos_id])
        print(text, file=out, flush=True)
        return [text]

    # the samples decode together, each with its own generator (seed, seed + 1, ...), so --stream and the
    # number of samples never change a sample's text
    seed = cfg.seed if cfg.seed is not None else int(torch.seed() % 2**62)
    texts = []
    with Engine(
        model,
        tokenizer,
        max_slots=min(cfg.num_samples, cfg.max_slots),
        compute_dtype=compute_dtype,
        threads=cfg.threads or "auto",  # no --threads: the decode thread picks (hilt.generation.threads)
    ) as engine:
        requests = [
            engine.submit(
                ids,
                SamplingParams(
                    max_new_tokens=cfg.max_len,
                    temperature=cfg.temperature,
                    top_k=cfg.top_k,
                    top_p=cfg.top_p,
                    seed=seed + i,
                ),
            )
            for i in range(cfg.num_samples)
        ]
        for i, request in enumerate(requests):
            if cfg.num_samples > 1:
                print(f"--- sample {i + 1}/{cfg.num_samples} ---", file=out)
            print(cfg.prompt, end="", file=out, flush=True)
            if cfg.stream:
                pieces = []
                for step in request:
                    pieces.append(step.text)
                    print(step.text, end="", file=out, flush=True)
                text = "".join(pieces)
                print(file=out, flush=True)
            else:  # waits for the end only, not woken at every token
                text = request.result().text
                print(text, file=out, flush=True)
            texts.append(text)
    return texts
