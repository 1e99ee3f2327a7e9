"""Text generation: sampling filters, sampled/greedy decoding (as a token stream or all at once), beam search,
incremental text streaming, and the glue behind ``hilt generate`` / ``inference.py``.

Every decoder reads the model through one ``_Context``: the next-token logits of a batch of growing sequences,
taken either from a KV cache (one new token per step) or by recomputing the whole window. Both ways read the
same window of tokens (``context_start``), so cached and uncached decoding produce the same tokens.

    from hilt.generate import generate
    out = generate(model, ids, 50, temperature=0.8, top_k=40, generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import copy
import sys
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TextIO

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from hilt.errors import UserError
from hilt.kernels import MixedDtypeLinear
from hilt.kv_cache import KVCache
from hilt.model import HierarchicalTransformer

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
    sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # a token is needed while the tokens before it have not yet reached p; the first is always needed
    drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). Temperature 0 is greedy (argmax); otherwise temperature, then top-k, then
    top-p, then one draw from ``generator``."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not temperature >= 0:  # also refuses NaN
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
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


def lowered_copy(model: HierarchicalTransformer, dtype: torch.dtype) -> HierarchicalTransformer:
    """An eval-mode copy of ``model`` whose main and ILT layers hold their matrices in ``dtype`` (e.g. bf16): what
    training's autocast computes (``hilt.kernels.MixedDtypeLinear`` casts the fp32 activations), without casting
    every weight at every token. The embedding, norms and positions stay the model's own tensors, shared, not
    copied. Building one takes ~31 ms at the default size: ``decoding_weights`` keeps it between calls."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    # plain tensors even when called under inference mode: the copy outlives this call in the cache
    with torch.inference_mode(False), torch.no_grad():
        lowered = copy.deepcopy(model, memo=shared).eval()
        for module in (*lowered.layers.modules(), *lowered.ilts.modules()):
            if isinstance(module, nn.Linear):
                module.__class__ = MixedDtypeLinear
                for name, param in list(module.named_parameters(recurse=False)):
                    setattr(module, name, nn.Parameter(param.detach().to(dtype), requires_grad=False))
    return lowered


# --- the decoding copy, kept between calls -------------------------------------------------------------------
# A lowered copy (and the head's bf16 weight) stays valid while the model's matrices keep their values. How a
# stale copy is noticed, without torch's private Tensor._version:
# - every optimizer step in the process bumps a counter (torch's public hook common to all optimizers): training
#   steps are how weights change between two samples, and one rebuild (~31 ms) after a step costs nothing next
#   to the step;
# - load_state_dict on the model bumps the model's own counter (a post-hook registered with the first copy);
# - the identity of every copied matrix (object, data_ptr, shape, dtype, device) catches .to(), a reassigned
#   parameter or a new storage;
# - a sampled checksum (every n-th element of each copied matrix, ~64 per matrix, summed in fp64) is the backstop
#   for in-place edits that go through none of the above (a hand-written update under no_grad, a submodule's
#   own load_state_dict); it costs ~0.5 ms, not the 80 MB read a full checksum would. A change to a few elements
#   that the sample misses goes unnoticed: call ``forget_decoding_weights(model)`` after such surgery.
# Comparing data_ptrs alone would miss every one of the usual changes: optimizer steps and load_state_dict
# write into the same storage.
_optimizer_steps = 0
_loads: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
_decoding_cache: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()
_cache_lock = threading.Lock()


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def _count_load(module: nn.Module, incompatible_keys) -> None:
    _loads[module] = _loads.get(module, 0) + 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _copied_matrices(model: HierarchicalTransformer) -> list[torch.Tensor]:
    linears = (*model.layers.modules(), *model.ilts.modules())
    return [m.weight for m in linears if isinstance(m, nn.Linear)] + [model.head.weight]


def _fingerprint(model: HierarchicalTransformer) -> tuple:
    matrices = _copied_matrices(model)
    identity = tuple((id(w), w.data_ptr(), tuple(w.shape), w.dtype, w.device) for w in matrices)
    with torch.no_grad():
        sample = torch.stack(
            [w.detach().reshape(-1)[:: max(1, w.numel() // 64)].sum(dtype=torch.float64) for w in matrices]
        )
    return _optimizer_steps, _loads.get(model, 0), identity, tuple(sample.tolist())


def decoding_weights(
    model: HierarchicalTransformer, compute_dtype: torch.dtype | None
) -> tuple[HierarchicalTransformer, torch.Tensor]:
    """The module that decodes and the LM head's weight: the model itself and its head for ``compute_dtype``
    None, else ``lowered_copy`` and a copy of the head in that dtype, built once per model and dtype and rebuilt
    when the model's weights change (see above)."""
    if compute_dtype is None:
        return model, model.head.weight.detach()
    fingerprint = _fingerprint(model)
    with _cache_lock:
        if model not in _decoding_cache:
            _decoding_cache[model] = {}
            model.register_load_state_dict_post_hook(_count_load)
        entry = _decoding_cache[model].get(compute_dtype)
        if entry is None or entry[0] != fingerprint:
            # Decoding one token reads every LM-head weight (12.9 M at GPT-2's vocabulary) for a matrix-vector
            # product: memory-bound, so a bf16 copy halves the bytes (measured 6.4 -> 1.7 ms per token on CPU).
            with torch.inference_mode(False), torch.no_grad():
                head = model.head.weight.detach().to(compute_dtype)
            entry = (fingerprint, lowered_copy(model, compute_dtype), head)
            _decoding_cache[model][compute_dtype] = entry
    return entry[1], entry[2]


def forget_decoding_weights(model: HierarchicalTransformer) -> None:
    """Drops the kept decoding copies of ``model`` (after weight surgery the checks above could miss)."""
    with _cache_lock:
        _decoding_cache.pop(model, None)


@contextmanager
def onednn_disabled() -> Iterator[None]:
    """torch's CPU matmuls without oneDNN until exit, when the previous setting comes back.

    Not thread-safe: ``torch.backends.mkldnn.enabled`` is one flag for the whole process, so every thread's
    matmuls run without oneDNN meanwhile, and two threads entering and leaving in an interleaved order can leave
    it off. Apply it only on the thread that owns the decoding loop (``hilt.engine.Engine`` has one decode thread
    and applies it there), never around work another thread may be doing."""
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


def without_onednn(device: torch.device, tokens: int) -> AbstractContextManager:
    """``onednn_disabled`` for a model call of one token in all, else nothing; same thread rules (not thread-safe).

    torch runs CPU bf16 matmuls through oneDNN, which spends ~50 us setting up each matrix-vector product,
    where torch's own GEMV kernel streams the weights at memory speed (decoding one sequence with bf16 weights,
    measured: 120 tokens/s with oneDNN, 205 without; the LM head alone 1.25 -> 0.96 ms). From a few rows on oneDNN
    is faster (4 rows: 35 vs 56 us; 1024 rows: 1.1 vs 14 ms), so only single-row steps go without it. The switch
    is process-wide: decoding in one thread while another trains in bf16 would slow that training down for the
    duration of each step."""
    return onednn_disabled() if device.type == "cpu" and tokens == 1 else nullcontext()


class _Context:
    """Next-token logits of a batch of growing sequences, with or without a KV cache, through the same window."""

    def __init__(
        self,
        model: HierarchicalTransformer,
        use_cache: bool,
        longest: int,
        compute_dtype: torch.dtype | None,
    ):
        self.model, self.head_weight = decoding_weights(model, compute_dtype)
        self.max_seq_len = model.config.max_seq_len
        # the cache never holds more than one window, nor more than the sequences will ever be long
        self.cache = KVCache(model.config.n_layers, min(self.max_seq_len, longest)) if use_cache else None
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
            return F.linear(hidden.to(self.head_weight.dtype), self.head_weight).float()

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


@dataclass(kw_only=True)
class GenerationConfig:
    """How to generate (the model comes from the checkpoint). Field names are the CLI's flags."""

    model_path: str
    prompt: str = "The quick brown"  # "" starts from the <BOS> token
    max_len: int = 50  # new tokens at most
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    use_beam_search: bool = False
    beam_width: int = 5
    use_cache: bool = False  # beam search only: sampling always runs through the engine's cache
    seed: int | None = None  # None = a fresh random seed
    num_samples: int = 1
    stream: bool = False
    device: str = "auto"
    amp: bool = True  # matmuls in bf16 where the hardware has it (as training's autocast); False = fp32
    model_dim: int | None = None  # accepted for compatibility; must match the checkpoint
    prompts_file: str | None = None  # batch mode: one prompt per line (.txt) or record (.jsonl)
    out: str | None = None  # batch mode: the results, one JSON record per prompt
    resume: bool = False  # batch mode: keep the finished rows of --out and run the rest
    max_slots: int = 16  # sequences decoded together

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise UserError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise UserError(f"--top_p must be in (0, 1], got {self.top_p}")
        for name in ("top_k", "beam_width", "max_len", "num_samples", "max_slots"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name} must be >= 1, got {value}")
        if self.use_beam_search and self.num_samples > 1:
            raise UserError("--num_samples needs sampling; beam search gives one deterministic result")
        if self.prompts_file is None and (self.out is not None or self.resume):
            raise UserError("--out and --resume belong to --prompts_file")
        if self.prompts_file is not None:
            if self.out is None:
                raise UserError("--prompts_file needs --out (the results file)")
            if self.use_beam_search or self.num_samples > 1:
                raise UserError(
                    "--prompts_file samples one continuation per prompt (no beam search, no --num_samples)"
                )


def load_for_generation(cfg: GenerationConfig, device: torch.device):
    """Model (eval mode, on ``device``) and the tokenizer it was trained with, from ``cfg.model_path``."""
    from hilt.checkpoint import load_model_and_tokenizer

    model, tokenizer, _ = load_model_and_tokenizer(
        cfg.model_path, device, requested={"d_model": cfg.model_dim}
    )
    return model, tokenizer


def run_generation(cfg: GenerationConfig, out: TextIO | None = None) -> list[str]:
    """Loads the checkpoint, generates ``cfg.num_samples`` continuations of the prompt, prints each (prompt +
    continuation) to ``out`` (default: stdout) and returns the continuations. With ``cfg.prompts_file``, runs
    the whole file instead (``run_prompts_file``) and returns the texts of the rows it generated."""
    out = out or sys.stdout
    from hilt.device import autocast_dtype, resolve_device
    from hilt.engine import Engine, SamplingParams

    if cfg.prompts_file is not None:
        records = read_prompts_file(cfg)  # bad input fails before the model loads
    device = resolve_device(cfg.device)
    model, tokenizer = load_for_generation(cfg, device)
    compute_dtype = autocast_dtype(device, cfg.amp)
    if cfg.prompts_file is not None:
        return run_prompts_file(cfg, records, model, tokenizer, compute_dtype)
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
        model, tokenizer, max_slots=min(cfg.num_samples, cfg.max_slots), compute_dtype=compute_dtype
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
            pieces = []
            for step in request:
                pieces.append(step.text)
                if cfg.stream and step.text:
                    print(step.text, end="", file=out, flush=True)
            text = "".join(pieces)
            print("" if cfg.stream else text, file=out, flush=True)
            texts.append(text)
    return texts


# --- batch mode: a file of prompts through the engine --------------------------------------------------------

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


def read_prompts_file(cfg: GenerationConfig) -> list[PromptRecord]:
    """The prompts of ``cfg.prompts_file``: each non-blank line of a text file, or each record of a .jsonl file
    ({"prompt": ..., optional "id" and sampling fields}). Every record's settings are checked here, so a bad one
    stops the run before anything is generated, naming its line."""
    import json
    from pathlib import Path

    from hilt.engine import SamplingParams

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
            records.append(PromptRecord(len(records), number, line, {}))
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not a JSON record ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UserError(f'{where}: a record needs a "prompt" string')
        unknown = sorted(set(record) - {"prompt", *_RECORD_KEYS})
        if unknown:
            raise UserError(
                f"{where}: unknown field {unknown[0]!r} (known: prompt, {', '.join(_RECORD_KEYS)})"
            )
        params = {k: v for k, v in record.items() if k not in ("prompt", "id")}
        try:
            _sampling_params(cfg, params, 0, SamplingParams)
        except (ValueError, TypeError) as e:
            raise UserError(f"{where}: {e}") from None
        records.append(PromptRecord(len(records), number, record["prompt"], params, record.get("id")))
    if not records:
        raise UserError(f"--prompts_file {path} holds no prompts")
    return records


def _sampling_params(cfg: GenerationConfig, own: dict, index: int, cls):
    """The flags' settings, overridden by the record's own; with --seed, row i's seed is seed + i."""
    values = dict(
        max_new_tokens=cfg.max_len,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        seed=None if cfg.seed is None else cfg.seed + index,
    )
    values.update(own)
    return cls(**values)


def run_prompts_file(cfg: GenerationConfig, records, model, tokenizer, compute_dtype) -> list[str]:
    """Runs every prompt of the file through one engine and writes ``cfg.out`` (JSON lines, one per prompt).

    Rows are appended (and flushed) as they finish, so an interruption keeps every finished row; when all are
    done the file is rewritten in input order. ``cfg.resume`` keeps the rows already in ``cfg.out`` (a torn last
    line is dropped) and runs only the others."""
    import json
    from pathlib import Path

    from tqdm import tqdm

    from hilt.engine import Engine, SamplingParams
    from hilt.files import atomic_write

    out_path = Path(cfg.out)
    done: dict[int, dict] = {}
    if out_path.exists() and out_path.stat().st_size:
        if not cfg.resume:
            raise UserError(f"--out {out_path} exists: --resume continues it, or remove it")
        for line in out_path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line a hard kill tore
            i = row.get("index") if isinstance(row, dict) else None
            if not isinstance(i, int) or not 0 <= i < len(records) or row.get("prompt") != records[i].prompt:
                raise UserError(f"--out {out_path} holds results of another prompts file; use another --out")
            done[i] = row

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
            yield ids, _sampling_params(cfg, r.params, r.index, SamplingParams)

    texts, tokens, started = [], 0, time.perf_counter()
    bar = tqdm(total=len(records), initial=len(done), unit="prompt", file=sys.stderr, dynamic_ncols=True)
    try:
        with (
            Engine(model, tokenizer, max_slots=cfg.max_slots, compute_dtype=compute_dtype) as engine,
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
    import json

    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()
