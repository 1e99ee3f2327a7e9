"""Text generation from Python: sampled/greedy decoding of one batch in lockstep (as a token stream or all at
once) and beam search. The sampling itself is ``sampling.py``; the glue behind ``hilt generate`` is ``run.py``.

Every decoder reads the model through one ``_Context``: the next-token logits of a batch of growing sequences,
taken either from a KV cache (one new token per step) or by recomputing the whole window. Both ways read the
same window of tokens (``context_start``), so cached and uncached decoding produce the same tokens.

    from hilt.generation.generate import generate
    out = generate(model, ids, 50, temperature=0.8, top_k=40, generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from hilt.generation.decoding import cache_dtype, decoding_weights, without_onednn
from hilt.generation.sampling import check_sampling_args, context_start, sample_next_token
from hilt.model import HierarchicalTransformer
from hilt.model.kv_cache import KVCache


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
