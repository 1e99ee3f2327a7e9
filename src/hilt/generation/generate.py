"""Text generation: sampling filters, sampled/greedy decoding (as a token stream or all at once), beam search,
incremental text streaming, and the glue behind ``hilt generate`` / ``inference.py``.

Every decoder reads the model through one ``_Context``: the next-token logits of a batch of growing sequences,
taken either from a KV cache (one new token per step) or by recomputing the whole window. Both ways read the
same window of tokens (``context_start``), so cached and uncached decoding produce the same tokens.

    from hilt.generation.generate import generate
    out = generate(model, ids, 50, temperature=0.8, top_k=40, generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from typing import TextIO

import torch
import torch.nn.functional as F

from hilt.generation.config import GenerationConfig  # noqa: F401 (re-exported)
from hilt.generation.decoding import cache_dtype, decoding_weights, without_onednn
from hilt.model import HierarchicalTransformer
from hilt.model.kernels import greedy_tokens
from hilt.model.kv_cache import KVCache

# --- sampling filters: pure functions of the logits ----------------------------------------------------------


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keeps exactly the k largest logits of each row (ties broken by topk's order); the rest become -inf."""
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    if k >= logits.size(-1):
        return logits
    values, indices = logits.topk(k, dim=-1)  # (B, k)
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keeps the smallest set of most likely tokens whose probability reaches p (always at least
    the most likely one); the rest become -inf."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p >= 1.0:
        return logits  # the cumulative sum may round to 1 early; p = 1 must keep every token
    probs = logits.softmax(dim=-1)
    # Rank the 64 most likely tokens, and all of them only when some row's nucleus is longer: sorting all of
    # GPT-2's 50,260 takes ~5 ms a row on one CPU thread, several decoding steps' worth
    # (`git show ab15cea:benchmarks/sampling_bench.py`)
    for m in sorted({min(64, probs.size(-1)), probs.size(-1)}):
        top, order = probs.topk(m, dim=-1)  # (B, m), most likely first
        keep = top.cumsum(dim=-1) - top < p  # needed while the tokens ranked above have not yet reached p
        keep[..., 0] = True
        if not keep[..., -1].any():  # every row's nucleus ended among the m
            break
    kept = torch.zeros_like(probs, dtype=torch.bool).scatter_(-1, order, keep)  # back to vocabulary order
    return logits.masked_fill(~kept, float("-inf"))


# below this temperature the draw is an argmax unless two logits lie within ~1e-4 of each other, and dividing by it
# can overflow the logits to inf in float32 (1e-300 is 0 there), which makes NaN probabilities: greedy is the limit
GREEDY_BELOW = 1e-5


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). Temperature 0 is greedy (argmax); otherwise temperature, then top-k, then
    top-p, then one draw from ``generator``. A temperature below ``GREEDY_BELOW`` is greedy too."""
    if temperature < GREEDY_BELOW:
        return greedy_tokens(logits)
    logits = logits.float() / temperature
    candidates = None
    if top_k is not None and top_k < logits.size(-1):  # what top_k_filter keeps; the rest cannot be drawn
        logits, candidates = logits.topk(top_k, dim=-1)  # (B, k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    ids = draw(logits.softmax(dim=-1), generator)
    return ids if candidates is None else candidates.gather(-1, ids[:, None]).squeeze(-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One id per row of probs (B, V), by inverting the cumulative distribution at one uniform number per row.
    torch.multinomial draws an exponential per vocabulary entry instead: 1.4 ms a row for 50,260 ids on one CPU
    thread, most of a sampled decoding step; this takes ~0.13 ms."""
    wide = torch.float32 if probs.device.type == "mps" else torch.float64  # MPS has no float64
    cdf = probs.to(wide).cumsum(dim=-1)  # wide: the tail keeps its resolution over 50k additions
    # u in (0, total]: the first entry whose cumulative sum reaches u exists and has a probability above 0
    u = 1 - torch.rand(cdf.size(0), 1, generator=generator, dtype=wide, device=cdf.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1)


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not 0 <= temperature < math.inf:  # also refuses NaN
        raise ValueError(f"temperature must be >= 0 (0 = greedy) and finite, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


# --- the context window and the cache ------------------------------------------------------------------------


def context_start(length: int, max_seq_len: int) -> int:
    """Index of the first of ``length`` tokens the model reads when predicting the next one.

    Up to ``max_seq_len`` tokens it reads them all. Past that the window slides, in jumps of a quarter of the
    context: positions are absolute (added to the embeddings), so a cached key cannot move to a new position and
    every slide means recomputing the window; jumping rebuilds the cache once every max_seq_len // 4 tokens
    instead of every token, and the model always sees at least 3/4 of its context.
    """
    if length <= max_seq_len:
        return 0
    stride = max(1, max_seq_len // 4)
    return -(-(length - max_seq_len) // stride) * stride  # the smallest multiple of stride that fits


class _Context:
    """Next-token logits of a batch of growing sequences, with or without a KV cache, through the same window."""

    def __init__(
        self,
        model: HierarchicalTransformer,
        use_cache: bool,
        longest: int,
        compute_dtype: torch.dtype | None,
    ):
        self.model, self.head = decoding_weights(model, compute_dtype)
        self.max_seq_len = model.config.max_seq_len
        # the cache never holds more than one window, nor more than the sequences will ever be long
        dtype = cache_dtype(compute_dtype or self.head.weight.dtype, self.head.weight.device)
        self.cache = (
            KVCache(model.config.n_layers, min(self.max_seq_len, longest), dtype) if use_cache else None
        )
        self.start = 0  # the window start the cache's contents were computed for

    def next_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, n) -> logits of token n + 1 (B, V)."""
        n = tokens.size(1)
        start = context_start(n, self.max_seq_len)
        cache = self.cache
        if cache is None:
            new = tokens[:, start:]
        elif start == self.start and self.start + cache.length == n - 1:
            new = tokens[:, n - 1 :]  # (B, 1): the usual step
        else:
            # first call, or the window slid: recompute the window from scratch (prefill)
            cache.reset()
            self.start, new = start, tokens[:, start:]
        with without_onednn(tokens.device, new.numel()):
            # only the last position needs the head
            hidden = self.model.features(new, cache=cache)[:, -1]  # (B, C)
            return self.head(hidden).float()

    def reorder(self, rows: torch.Tensor) -> None:
        """The sequences were replaced by ``tokens[rows]`` (beam search); keep the cache in step."""
        if self.cache is not None:
            self.cache.reorder(rows)


# --- decoding ------------------------------------------------------------------------------------------------


@torch.inference_mode()
def stream_tokens(
    model: HierarchicalTransformer,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    compute_dtype: torch.dtype | None = None,
) -> Iterator[torch.Tensor]:
    """Yields the next token of every row, (B,), one step at a time, for up to ``max_new_tokens`` steps.

    A row that has produced ``eos_token_id`` keeps yielding it (padding) until every row has; then the stream
    ends. The model runs in eval mode (restored afterwards) under inference mode; inputs longer than
    ``config.max_seq_len`` are read through the sliding window of ``context_start``. ``compute_dtype`` (e.g.
    torch.bfloat16) runs every matrix product (layers, ILTs, LM head) in that precision, as training's autocast
    does, through ``lowered_copy``; None keeps the model's.
    """
    check_sampling_args(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    B, T = input_ids.shape
    if T < 1:
        raise ValueError("input_ids needs at least one token (e.g. <BOS>) to start from")
    # one buffer for the whole run, so a step appends instead of concatenating
    tokens = input_ids.new_empty(B, T + max_new_tokens)  # (B, T + N)
    tokens[:, :T] = input_ids
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    context = _Context(model, use_cache, T + max_new_tokens, compute_dtype)
    was_training = model.training
    model.eval()
    try:
        for n in range(T, T + max_new_tokens):
            logits = context.next_logits(tokens[:, :n])  # (B, V)
            next_ids = sample_next_token(
                logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
            )  # (B,)
            if eos_token_id is not None:
                next_ids = next_ids.masked_fill(done, eos_token_id)
                done |= next_ids == eos_token_id
            tokens[:, n] = next_ids
            yield next_ids
            if eos_token_id is not None and bool(done.all()):
                return
    finally:
        model.train(was_training)


def generate(
    model: HierarchicalTransformer,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.LongTensor:
    """input_ids (B, T) -> (B, T + n): the input followed by n <= max_new_tokens new tokens (fewer when every row
    has produced ``eos_token_id``; rows that finished early are padded with it). See ``stream_tokens``."""
    steps = list(
        stream_tokens(
            model,
            input_ids,
            max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            use_cache=use_cache,
            eos_token_id=eos_token_id,
            generator=generator,
            compute_dtype=compute_dtype,
        )
    )
    if not steps:
        return input_ids.clone()
    return torch.cat([input_ids, torch.stack(steps, dim=1)], dim=1)


@torch.inference_mode()
def beam_search(
    model: HierarchicalTransformer,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    beam_width: int,
    use_cache: bool = True,
    length_penalty: float = 1.0,
    eos_token_id: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.LongTensor:
    """input_ids (1, T) -> (1, T + n): the most likely continuation found by beam search.

    Keeps ``beam_width`` sequences; a beam that produces ``eos_token_id`` is finished. Hypotheses are ranked by
    sum of log-probabilities / (new tokens, <EOS> included) ** length_penalty. The search stops when
    ``beam_width`` hypotheses have finished and no running beam scores better than the worst of them (the
    Hugging Face heuristic), or after ``max_new_tokens``. With beam_width 1 it is greedy decoding.
    """
    if beam_width < 1:
        raise ValueError(f"beam_width must be >= 1, got {beam_width}")
    if input_ids.dim() != 2 or input_ids.size(0) != 1 or input_ids.size(1) < 1:
        raise ValueError(
            f"beam_search continues one sequence: input_ids must be (1, T >= 1), got {tuple(input_ids.shape)}"
        )
    T = input_ids.size(1)
    tokens = input_ids.new_empty(beam_width, T + max_new_tokens)  # (W, T + N): row i is beam i
    tokens[0, :T] = input_ids[0]
    scores = torch.zeros(1, device=input_ids.device)  # (beams,) summed log-probabilities
    finished: list[tuple[float, torch.Tensor]] = []  # (ranking score, ids)
    context = _Context(model, use_cache, T + max_new_tokens, compute_dtype)
    length = T  # of the running beams
    was_training = model.training
    model.eval()
    try:
        for step in range(max_new_tokens):
            n, n_beams = T + step, scores.size(0)
            logprobs = F.log_softmax(context.next_logits(tokens[:n_beams, :n]).float(), dim=-1)  # (beams, V)
            V = logprobs.size(-1)
            candidates = (scores[:, None] + logprobs).view(-1)  # (beams·V,)
            # 2W candidates always hold W that do not end in <EOS> (each beam has one <EOS> continuation)
            top_scores, top_idx = candidates.topk(min(2 * beam_width, candidates.numel()))
            sources, next_ids = top_idx // V, top_idx % V
            keep: list[int] = []
            for rank, token in enumerate(next_ids.tolist()):
                if token == eos_token_id:
                    if rank < beam_width:  # only an <EOS> among the W best finishes a hypothesis
                        ids = torch.cat([tokens[sources[rank], :n], next_ids[rank : rank + 1]])
                        finished.append((top_scores[rank].item() / (step + 1) ** length_penalty, ids))
                elif len(keep) < beam_width:
                    keep.append(rank)
            rows = torch.tensor(keep, dtype=torch.long, device=input_ids.device)
            src = sources[rows]
            tokens[: len(keep), :n] = tokens[src, :n]
            tokens[: len(keep), n] = next_ids[rows]
            scores, length = top_scores[rows], n + 1
            context.reorder(src)
            if not keep:
                break
            if len(finished) >= beam_width:
                worst_kept = sorted(s for s, _ in finished)[-beam_width]
                if scores[0].item() / (step + 1) ** length_penalty < worst_kept:
                    break
        penalty = max(length - T, 1) ** length_penalty
        finished += [(scores[i].item() / penalty, tokens[i, :length]) for i in range(scores.size(0))]
    finally:
        model.train(was_training)
    best = max(finished, key=lambda f: f[0])[1]
    return best.unsqueeze(0)


# --- text streaming ------------------------------------------------------------------------------------------


class TextStreamer:
    """Turns token ids into printable text as they arrive.

    Byte-level BPE can split one character over several tokens, and decoding a token alone may drop or change
    what depends on its neighbours; so each step decodes a short run of recent ids and emits only the text that
    a new token added, and only once it no longer ends in U+FFFD (an incomplete UTF-8 sequence). The pieces
    joined equal decoding all ids at once.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] were emitted and give the decoding context for what follows
        self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back (e.g. a character the generation cut in half)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before) :]


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
