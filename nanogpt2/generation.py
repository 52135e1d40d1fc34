"""Text generation over the KV cache: greedy, sampling and beam search, with transformers' arguments and results.

    generate(model, input_ids, **kw) -> (B * num_return_sequences, T + new) token ids, the prompt included
    stream(model, input_ids, **kw)   -> an iterator of (B * num_return_sequences,) new tokens, one per step

The loop is written by phase, as gpt-fast's generate.py is:
    prefill           the whole prompt in one forward; fills the cache; logits of the last position only
    decode_one_token  one new token per row against the cache: (N,) in, (N, V) logits out
    process           the logits processors (logits_process.py), then argmax or a sample, in the loops
                      `decode` (greedy, sampling) and `beam_search`
The cache is preallocated once (cache.py) for prompt + max_new_tokens - 1 positions (the last token is never
fed back), the prompt is run once per input row however many sequences it returns, and the loop's only host
sync per step is the "all rows finished?" check, made only when there is an eos token to finish on: a step
goes through `model.decode_step`, which skips forward's input checks (and their syncs). Beam search keeps
beams in the batch dimension (row = b * num_beams + beam) and reorders the cache with `KVCache.reorder` when
beams trade histories.

Speed (BENCHMARKS.md): on CPU the linear layers multiply with oneDNN-packed weights while generating
(packed.py; `pack_weights`), which is what makes decoding memory-bound at ~1.7x the weight-read floor;
`compile=True` runs a fixed-shape step through torch.compile (compiled.py), at ~1.0-1.2x the floor on CPU.

Semantics are transformers 5.x's (generation/utils.py, logits_process.py, stopping_criteria.py), pinned by
parity tests: argument names, defaults and meanings (top_k=50 when sampling; max_length counts the prompt;
20 new tokens when neither length is given), finished rows padded with pad_token_id (default: the first eos),
and beam search's scoring, length penalty, early stopping and output length (`beam_search` below).
Left-padded batches: positions come from the attention mask, and every row generates what it would alone.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, fields
from typing import Iterator, Optional, Union

import torch
import torch.nn.functional as F

from . import compiled
from . import logits_process as lp
from .attention import AttentionMask, positions_from_mask
from .cache import KVCache
from .inputs import check_mask_shape, check_token_ids
from .packed import available as packed_available, packed_linears

# transformers' placeholder for "impossible" in beam search: a finite number, so sums of scores stay ordered
BEAM_NEG = -1.0e9


@dataclass
class GenerationConfig:
    """generate()'s arguments: transformers' names, defaults and meanings (GenerationConfig, v5)."""
    max_new_tokens: Optional[int] = None   # new tokens at most; with max_length unset, 20 (transformers' default)
    max_length: Optional[int] = None       # prompt + new tokens at most (transformers' older spelling)
    min_new_tokens: int = 0                # eos is banned until this many tokens are generated
    do_sample: bool = False                # sample from the processed distribution instead of taking the argmax
    temperature: float = 1.0               # sampling only: scores / temperature
    top_k: Optional[int] = 50              # sampling only: keep the k most probable tokens (0 or None: all)
    top_p: float = 1.0                     # sampling only: keep the smallest set with probability >= top_p
    min_p: Optional[float] = None          # sampling only: keep tokens with p >= min_p * p(top token)
    repetition_penalty: float = 1.0        # > 1 discourages tokens already in the prompt or the output
    no_repeat_ngram_size: int = 0          # > 0: no n-gram of this size occurs twice
    num_beams: int = 1                     # > 1: beam search
    length_penalty: float = 1.0            # beam score = sum of log-probs / generated_length ** length_penalty
    early_stopping: Union[bool, str] = False  # beam search: True, False (a heuristic) or "never" (exact)
    num_return_sequences: int = 1          # per input row: the best beams, or independent samples
    eos_token_id: Union[int, list, None] = None  # default: the model config's
    pad_token_id: Optional[int] = None     # fills finished rows; default: the model config's, else the first eos
    # nanogpt2's own: multiply with oneDNN-packed weights on CPU (packed.py; ~2x faster decode, one more copy of
    # the weights while generating). None: on when the model is on CPU and PyTorch can pack; False: off.
    pack_weights: Optional[bool] = None
    # nanogpt2's own: torch.compile the decode step (compiled.py: fixed shapes). The first call per model, batch
    # size and cache-length bucket compiles: on CPU inductor freezes the weights into C++ micro-GEMMs
    # (compiled.CPU_COMPILE_OPTIONS; 15-60 s for 124M on 2 cores), then B=1 steps run ~1.4-1.7x faster than
    # pack_weights' (BENCHMARKS.md). For batches, and for weights that keep changing, keep the default.
    compile: bool = False

    def __post_init__(self):
        """Checks that need no model or prompt; generate() checks lengths and token ids against both."""
        for f in fields(self):   # None means "the default", as in transformers
            if getattr(self, f.name) is None and f.default is not None:
                setattr(self, f.name, f.default)

        def bad(name, rule):
            return ValueError(f"{name}={getattr(self, name)!r} is invalid: {rule}")

        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        if self.max_new_tokens is not None and (not is_int(self.max_new_tokens) or self.max_new_tokens < 1):
            raise bad("max_new_tokens", "must be an integer >= 1")
        if self.max_length is not None and (not is_int(self.max_length) or self.max_length < 1):
            raise bad("max_length", "must be an integer >= 1 (prompt + new tokens)")
        if not is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            raise bad("min_new_tokens", "must be an integer >= 0")
        if self.do_sample and not self.temperature > 0:
            raise bad("temperature", "must be > 0 when do_sample=True (use do_sample=False for greedy decoding)")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 0):
            raise bad("top_k", "must be an integer >= 0 (0 or None keeps every token)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1] (1 keeps every token)")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1] or None")
        if not self.repetition_penalty > 0:
            raise bad("repetition_penalty", "must be > 0 (1 is no penalty, > 1 discourages repeats)")
        if not is_int(self.no_repeat_ngram_size) or self.no_repeat_ngram_size < 0:
            raise bad("no_repeat_ngram_size", "must be an integer >= 0 (0 disables it)")
        if not is_int(self.num_beams) or self.num_beams < 1:
            raise bad("num_beams", "must be an integer >= 1 (1 is greedy or sampling)")
        if not isinstance(self.length_penalty, (int, float)) or isinstance(self.length_penalty, bool):
            raise bad("length_penalty", "must be a number")
        if self.early_stopping not in (True, False, "never") or not isinstance(self.early_stopping, (bool, str)):
            raise bad("early_stopping", "must be True, False or 'never'")
        if self.compile not in (True, False):
            raise bad("compile", "must be True or False")
        if self.pack_weights not in (None, True, False):
            raise bad("pack_weights", "must be None (automatic), True or False")
        if not is_int(self.num_return_sequences) or self.num_return_sequences < 1:
            raise bad("num_return_sequences", "must be an integer >= 1")
        if self.num_beams > 1 and self.num_return_sequences > self.num_beams:
            raise bad("num_return_sequences", f"beam search returns at most num_beams={self.num_beams} sequences")
        if self.num_beams == 1 and not self.do_sample and self.num_return_sequences > 1:
            raise bad("num_return_sequences", "greedy decoding returns 1 sequence per prompt; use do_sample=True "
                      "or num_beams >= num_return_sequences")


@dataclass
class Prompt:
    """The prepared input: what every decoding loop starts from."""
    ids: torch.Tensor            # (B, T) as given
    mask: Optional[torch.Tensor]  # (B, T) 1 = token, 0 = left padding; None when nothing is padding
    history: torch.Tensor        # (B, T) ids with padding replaced by V, for the processors (logits_process.py)
    max_new_tokens: int
    eos: Optional[torch.Tensor]  # (n_eos,) long, or None: rows never finish early
    pad: Optional[int]


def prepare(model, input_ids, attention_mask, cfg: GenerationConfig) -> Prompt:
    """Check the prompt against the model, settle lengths and special tokens (transformers' rules)."""
    V = model.config.vocab_size
    ids = check_token_ids(input_ids, V, "input_ids").to(model.device)
    eos, pad = special_tokens(model.config, cfg)
    max_new = new_token_count(cfg, ids.shape[1], model.config.n_positions)
    mask = left_padding(ids, attention_mask, pad, eos)
    history = ids if mask is None else ids.masked_fill(mask == 0, V)
    return Prompt(ids, mask, history, max_new, torch.tensor(eos, device=ids.device) if eos else None, pad)


def special_tokens(config, cfg: GenerationConfig) -> tuple[list[int], Optional[int]]:
    """(eos ids, pad id): the call's, else the model config's; pad falls back to the first eos, as in transformers.

    Ids passed to generate must be in the vocabulary (finished rows feed pad back to the model); ids from a config
    that the vocabulary cannot hold (a tiny model keeping GPT-2's 50256) are dropped: they could never occur."""
    V = config.vocab_size
    eos = cfg.eos_token_id
    if eos is not None:
        eos = [eos] if isinstance(eos, int) else list(eos)
        for e in eos:
            if not isinstance(e, int) or isinstance(e, bool) or not 0 <= e < V:
                raise ValueError(f"eos_token_id: {e!r} is not a token id in [0, {V})")
    else:
        eos = [e for e in _as_list(config.eos_token_id) if 0 <= e < V]
    pad = cfg.pad_token_id
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or not 0 <= pad < V):
        raise ValueError(f"pad_token_id: {pad!r} is not a token id in [0, {V})")
    if pad is None and isinstance(config.pad_token_id, int) and 0 <= config.pad_token_id < V:
        pad = config.pad_token_id
    if pad is None and eos:
        pad = eos[0]
    return eos, pad


def new_token_count(cfg: GenerationConfig, T: int, n_positions: int) -> int:
    """How many tokens to generate after a prompt of T: max_new_tokens wins; max_length counts the prompt;
    neither -> 20, capped by the context. Whatever the source, prompt + new must fit n_positions."""
    max_new = cfg.max_new_tokens
    if cfg.max_length is not None:
        if max_new is not None and cfg.max_length != T + max_new:
            raise ValueError(f"max_length={cfg.max_length} and max_new_tokens={max_new} disagree for a prompt of "
                             f"{T} tokens (max_length counts the prompt: it would be {T + max_new}); pass only one")
        if cfg.max_length <= T:
            raise ValueError(f"max_length={cfg.max_length} leaves no room after the prompt of {T} tokens: it must "
                             f"be > {T} (or pass max_new_tokens)")
        max_new = cfg.max_length - T
    elif max_new is None:
        max_new = max(1, min(20, n_positions - T))
    if T + max_new > n_positions:
        raise ValueError(f"prompt ({T} tokens) + max_new_tokens ({max_new}) = {T + max_new} exceeds the model's "
                         f"context n_positions={n_positions}: at most {max(n_positions - T, 0)} new tokens fit")
    return max_new


def left_padding(ids: torch.Tensor, attention_mask, pad: Optional[int], eos: list[int]) -> Optional[torch.Tensor]:
    """The prompt's padding as a (B, T) long mask (1 = token), or None when nothing is padding. transformers infers
    it from pad tokens when no mask is given and pad is not an eos; it must be on the left (generation appends on
    the right), and every row needs a real token."""
    B, T = ids.shape
    inferred = None
    if attention_mask is None and pad is not None and pad not in eos and bool((ids == pad).any()):
        attention_mask = inferred = (ids != pad).long()
    if attention_mask is None:
        return None
    real = check_mask_shape(attention_mask, (B, T), "B, T").to(ids.device) != 0
    n_pad = T - real.sum(-1)
    left = torch.arange(T, device=real.device)[None] >= n_pad[:, None]   # what left padding looks like
    if bool((n_pad == T).any()):
        raise ValueError(f"attention_mask row {int((n_pad == T).nonzero()[0])} has no real token")
    if not bool((left == real).all()):
        row = int((left != real).any(-1).nonzero()[0])
        source = "" if inferred is None else f" (inferred from pad_token_id={pad}, as transformers does)"
        raise ValueError(f"attention_mask{source} row {row} is not left-padded ({attention_mask[row].tolist()}): "
                         "generation appends on the right, so padding must come first (padding_side='left')")
    return None if bool(real.all()) else real.long()


def _as_list(token_ids) -> list:
    return [] if token_ids is None else [token_ids] if isinstance(token_ids, int) else list(token_ids)


# ---- the phases ---------------------------------------------------------------------------------------------

def prefill(model, ids: torch.Tensor, mask: Optional[torch.Tensor], cache: KVCache) -> torch.Tensor:
    """Run the prompt (B, T) through the model's forward, filling the cache; return the last position's logits
    (B, V) fp32."""
    out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float()


def decode_one_token(model, token: torch.Tensor, mask: Optional[torch.Tensor], cache: KVCache,
                     kv_start: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One new token per row (N,) against the cache; `mask` (N, cached + 1) left padding then ones, or None;
    `kv_start` (N,) int32: each row's number of padding positions. Returns logits (N, V) fp32.

    Goes through `model.decode_step`, not forward: the inputs are the loop's own, so forward's checks (and
    their host syncs) are skipped, and the position and mask are built here without any."""
    if _needs_forward(model):   # torch module hooks on the model expect a forward call per token
        return prefill(model, token[:, None], mask, cache)   # forward's path, as for the prompt
    past = cache.length
    pos = positions_from_mask(mask, past, 1, token.device)   # (N or 1, 1), the rule forward uses
    attn = AttentionMask(past, 1) if mask is None else \
        AttentionMask(past, 1, mask.bool(), _kv_start=kv_start, _left_padded=True if kv_start is not None else None)
    return model.decode_step(token, pos, attn, cache).float()


def _needs_forward(model) -> bool:
    """Whether something expects model.forward to run for every token: torch forward (pre-)hooks registered on
    the model or its transformer, or globally. Then the step takes forward's path (checks included)."""
    import torch.nn.modules.module as mm
    if mm._global_forward_hooks or mm._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in (model, getattr(model, "transformer", model)))


def cache_length(model, needed: int, cfg: "GenerationConfig") -> int:
    """Positions to preallocate: exactly what is needed, or with compile=True a bucketed length
    (compiled.cache_length), so that nearby lengths run the same compiled graph."""
    return compiled.cache_length(model.config.n_positions, needed) if cfg.compile else needed


class EagerStep:
    """decode_one_token over `cache`, as a step object: what make_step returns without compile=True."""

    def __init__(self, model, cache: KVCache, kv_start: Optional[torch.Tensor]):
        self.model, self.cache, self.kv_start = model, cache, kv_start

    def __call__(self, token: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        return decode_one_token(self.model, token, mask, self.cache, self.kv_start)

    def release(self) -> None:   # nothing shared to give back (compiled.StaticDecode has)
        pass


def make_step(model, cache: KVCache, kv_start: Optional[torch.Tensor], cfg: "GenerationConfig"):
    """The per-token step the loops call: step(token (N,), mask (N, cached + 1) or None) -> logits (N, V) fp32,
    over `step.cache` (the prefilled `cache`, or with compile=True a static copy of it: compiled.StaticDecode).

    compile=True falls back to the eager step, on purpose, when something must see each token in Python: torch
    module hooks (they want forward itself) or named hooks (model.hooks(...): a captured graph would skip them)."""
    if cfg.compile and not _needs_forward(model) and not model.hooks_active():
        return compiled.compiled_decode(model).step(cache, kv_start)
    return EagerStep(model, cache, kv_start)


def process(scores: torch.Tensor, history: torch.Tensor, n_new: int, cfg: GenerationConfig, prompt: Prompt,
            min_tokens_to_keep: int = 1) -> torch.Tensor:
    """The logits processors, in transformers' order (`_get_logits_processor`); warpers only when sampling."""
    if cfg.repetition_penalty != 1.0:
        scores = lp.repetition_penalty(scores, history, cfg.repetition_penalty)
    if cfg.no_repeat_ngram_size:
        scores = lp.no_repeat_ngram(scores, history, cfg.no_repeat_ngram_size)
    if n_new < cfg.min_new_tokens and prompt.eos is not None:
        scores = lp.ban_tokens(scores, prompt.eos)
    if cfg.do_sample:
        if cfg.temperature != 1.0:
            scores = lp.temperature(scores, cfg.temperature)
        if cfg.top_k:
            scores = lp.top_k(scores, cfg.top_k, min_tokens_to_keep)
        if cfg.top_p < 1.0:
            scores = lp.top_p(scores, cfg.top_p, min_tokens_to_keep)
        if cfg.min_p is not None:
            scores = lp.min_p(scores, cfg.min_p, min_tokens_to_keep)
    return scores


def new_cache(model, rows: int, max_len: int) -> KVCache:
    w = model.transformer.wpe.weight    # a float weight (lm_head's may be integers: quantization.py)
    return KVCache.for_model(model.config, rows, max_len=max_len, dtype=w.dtype, device=w.device)


def repeat_rows(cache: KVCache, n: int) -> KVCache:
    """A cache whose row b * n + i is row b of `cache`: n continuations of one prompt run once (its k/v are
    copied, all max_len positions, so the new cache has the same fixed shape)."""
    if n == 1:
        return cache
    L, B, H, S, D = cache.k.shape
    out = KVCache(L, B * n, H, S, D, dtype=cache.k.dtype, device=cache.k.device)
    out.k.copy_(cache.k.repeat_interleave(n, dim=1))
    out.v.copy_(cache.v.repeat_interleave(n, dim=1))
    out.length = cache.length
    return out


def padding(prompt: Prompt) -> Optional[torch.Tensor]:
    """(B,) int32: how many padding positions each prompt row starts with; None without padding."""
    return None if prompt.mask is None else (prompt.mask.shape[1] - prompt.mask.sum(-1)).to(torch.int32)


def expand(x: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    return x if x is None or n == 1 else x.repeat_interleave(n, dim=0)


# ---- greedy and sampling ------------------------------------------------------------------------------------

def decode(model, prompt: Prompt, cfg: GenerationConfig,
           generator: Optional[torch.Generator]) -> Iterator[torch.Tensor]:
    """Greedy or sampling: yield the new tokens (N,) of each step, N = B * num_return_sequences.

    A finished row (it produced an eos) gets pad from then on, as in transformers' `_sample`. Stops after
    max_new_tokens, or once every row has finished.
    """
    n = cfg.num_return_sequences
    B, T = prompt.ids.shape
    N, max_new = B * n, prompt.max_new_tokens
    # the last new token is never fed back, so the cache needs T + max_new - 1 positions
    cache = new_cache(model, B, cache_length(model, T + max_new - 1, cfg))
    logits = expand(prefill(model, prompt.ids, prompt.mask, cache), n)    # (N, V): the prompt runs once per row
    cache = repeat_rows(cache, n)

    seq = torch.empty(N, T + max_new, dtype=torch.long, device=prompt.ids.device)   # history for the processors
    seq[:, :T] = expand(prompt.history, n)
    mask = None
    if prompt.mask is not None:   # the prompt's padding, then ones for every new token
        mask = torch.ones(N, T + max_new, dtype=torch.long, device=seq.device)
        mask[:, :T] = expand(prompt.mask, n)
    step = make_step(model, cache, expand(padding(prompt), n), cfg)
    unfinished = torch.ones(N, dtype=torch.bool, device=seq.device)
    try:
        for i in range(max_new):
            scores = process(logits, seq[:, :T + i], i, cfg, prompt)
            if cfg.do_sample:
                token = torch.multinomial(F.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)
            else:
                token = scores.argmax(dim=-1)
            if prompt.eos is not None:
                token = torch.where(unfinished, token, prompt.pad)
                unfinished &= ~torch.isin(token, prompt.eos)
            seq[:, T + i] = token
            yield token
            if i + 1 == max_new or (prompt.eos is not None and not bool(unfinished.any())):  # the one sync
                return
            logits = step(token, None if mask is None else mask[:, :T + i + 1])
    finally:   # a stream closed early or an error: the step's static buffers are free for the next decode
        step.release()


# ---- beam search --------------------------------------------------------------------------------------------

def beam_search(model, prompt: Prompt, cfg: GenerationConfig, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Beam search (beam sampling with do_sample=True), transformers' vectorised `_beam_search` step for step.

    Each step every running beam extends by every token: scores (B, num_beams * V) of summed log-probs. The best
    K = max(2, 1 + n_eos) * num_beams candidates are kept, so that num_beams of them can continue even if the
    best all end. Candidates that end (eos, or the length limit) and rank among the top num_beams enter the
    finished pool with score sum_logprobs / generated_length ** length_penalty (generated_length counts the
    eos); the best num_beams unfinished ones continue. It stops when
      - early_stopping=True:    every batch row has num_beams finished hypotheses;
      - early_stopping=False:   the best running beam, scored at the current length, cannot beat the worst
                                finished one (a heuristic: a longer beam may still score better);
      - early_stopping="never": the same with the best possible length (max_length if length_penalty > 0):
                                the canonical beam search stopping rule;
      - and always when no running beam can continue (max length).
    Returns the best num_return_sequences finished hypotheses per row, (B * num_return_sequences, T + new),
    cut to the longest returned and padded with pad_token_id.
    """
    nb, n_ret = cfg.num_beams, cfg.num_return_sequences
    B, T = prompt.ids.shape
    max_length = T + prompt.max_new_tokens
    n_eos = 0 if prompt.eos is None else len(prompt.eos)
    K = max(2, 1 + n_eos) * nb
    dev = prompt.ids.device
    # transformers fills unwritten positions with `pad_token_id or eos_token_id[0]` (its tensor truth test
    # picks eos[0] when pad is 0; we use pad, the documented meaning). Without an eos nothing finishes early,
    # so the fill never shows.
    fill = prompt.pad if prompt.pad is not None else -1
    # in sampling mode, top-k/top-p must leave a non-eos continuation per beam (transformers' min_tokens_to_keep)
    keep = n_eos + 1 if n_eos else 2

    cache = new_cache(model, B, cache_length(model, max_length - 1, cfg))
    logits = expand(prefill(model, prompt.ids, prompt.mask, cache), nb)   # (B * nb, V)
    cache = repeat_rows(cache, nb)
    mask = None
    if prompt.mask is not None:
        mask = torch.ones(B * nb, max_length, dtype=torch.long, device=dev)
        mask[:, :T] = expand(prompt.mask, nb)
    # beams trade histories within a row, never its padding
    step = make_step(model, cache, expand(padding(prompt), nb), cfg)

    running = torch.full((B, nb, max_length), fill, dtype=torch.long, device=dev)
    running[:, :, :T] = prompt.history[:, None]
    running_scores = torch.zeros(B, nb, device=dev)
    running_scores[:, 1:] = BEAM_NEG          # all beams start equal: let only the first one propose tokens
    finished = running.clone()                # the pool of finished hypotheses, best first
    finished_scores = torch.full((B, nb), BEAM_NEG, device=dev)
    finished_len = torch.zeros(B, nb, dtype=torch.long, device=dev)   # generated tokens of each
    is_finished = torch.zeros(B, nb, dtype=torch.bool, device=dev)
    may_improve = torch.ones(B, 1, dtype=torch.bool, device=dev)      # the early-stopping heuristic per row
    top_nb = torch.arange(K, device=dev) < nb                         # candidate ranks allowed to finish
    row_offset = torch.arange(B, device=dev)[:, None] * nb

    try:
        for cur in range(T, max_length):   # cur: length of the running sequences
            V = logits.shape[-1]
            log_probs = process(F.log_softmax(logits, dim=-1), running.view(B * nb, -1)[:, :cur], cur - T, cfg,
                                prompt, min_tokens_to_keep=keep)
            log_probs = (log_probs.view(B, nb, V) + running_scores[:, :, None]).view(B, nb * V)

            # the K best continuations over all beams (or K sampled without replacement, best first)
            if cfg.do_sample:
                idx = torch.multinomial(F.softmax(log_probs, dim=-1), K, generator=generator)
                cand_scores, order = log_probs.gather(1, idx).sort(dim=-1, descending=True)
                idx = idx.gather(1, order)
            else:
                cand_scores, idx = torch.topk(log_probs, K)               # (B, K)
            beam, token = idx // V, idx % V
            cand = running.gather(1, beam[:, :, None].expand(B, K, max_length))   # (B, K, max_length), a copy
            cand[:, :, cur] = token
            ended = torch.full((B, K), cur + 1 >= max_length, device=dev)   # transformers' stopping criteria:
            if n_eos:                                                         # max length, or an eos token
                ended |= torch.isin(token, prompt.eos)

            # the best num_beams candidates that did not end keep running
            alive_scores = cand_scores + ended.to(torch.float32) * BEAM_NEG
            top = torch.topk(alive_scores, k=nb)[1]                       # (B, nb)
            running = cand.gather(1, top[:, :, None].expand(B, nb, max_length))
            running_scores = alive_scores.gather(1, top)
            parent = (beam + row_offset).gather(1, top)                   # the cache row each new beam extends

            # candidates that ended, among the top num_beams, enter the pool if they beat what is there
            just_ended = ended & top_nb[None]
            scores = cand_scores / ((cur + 1 - T) ** cfg.length_penalty)
            pool_full = is_finished.all(dim=-1, keepdim=True) & (cfg.early_stopping is True)
            scores += pool_full.to(torch.float32) * BEAM_NEG
            scores += (~may_improve).to(torch.float32) * BEAM_NEG
            scores += (~just_ended) * BEAM_NEG
            merged_scores = torch.cat((finished_scores, scores), dim=1)   # (B, nb + K)
            best = torch.topk(merged_scores, k=nb)[1]
            finished = torch.cat((finished, cand), dim=1).gather(1, best[:, :, None].expand(B, nb, max_length))
            finished_scores = merged_scores.gather(1, best)
            finished_len = torch.cat((finished_len, torch.full_like(scores, cur + 1 - T, dtype=torch.long)),
                                     dim=1).gather(1, best)
            is_finished = torch.cat((is_finished, just_ended), dim=1).gather(1, best)

            # can a running beam still beat the worst finished hypothesis? (transformers' _check_early_stop_heuristic)
            n_gen = cur + 1 - T
            if cfg.early_stopping == "never" and cfg.length_penalty > 0.0:
                n_gen = max_length - T                                    # the best length a beam may still reach
            best_running = running_scores[:, :1] / (n_gen ** cfg.length_penalty)
            worst_finished = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], BEAM_NEG)
            may_improve = may_improve & (best_running > worst_finished).any(dim=-1, keepdim=True)
            all_full = is_finished.all() & (cfg.early_stopping is True)
            if not bool(may_improve.any() & ~all_full & ~ended.all()):    # the one host sync per step
                break
            step.cache.reorder(parent.flatten())
            logits = step(running[:, :, cur].flatten(), None if mask is None else mask[:, :cur + 1])
    finally:
        step.release()

    # the best hypotheses per row, cut to the longest one returned (transformers counts their generated tokens)
    out = finished[:, :n_ret].flatten(0, 1)
    out = out[:, :T + int(finished_len[:, :n_ret].max())]
    out[:, :T] = expand(prompt.ids, n_ret)                             # the prompt as given, padding included
    return out


# ---- the public entry points --------------------------------------------------------------------------------

def _setup(model, input_ids, attention_mask, kwargs) -> tuple[Prompt, GenerationConfig]:
    cfg = GenerationConfig(**kwargs)
    return prepare(model, input_ids, attention_mask, cfg), cfg


def packing(model, cfg: GenerationConfig, rows: int):
    """The weight packing generate() runs under (packed.py): on CPU unless pack_weights=False."""
    on_cpu = model.device.type == "cpu"
    if cfg.pack_weights is True and not (on_cpu and packed_available()):
        raise ValueError(f"pack_weights=True needs a CPU model and a PyTorch build with oneDNN (the model is on "
                         f"{model.device}; oneDNN packing available: {packed_available()}); use None or False")
    if cfg.compile and cfg.pack_weights:
        raise ValueError("pack_weights=True and compile=True exclude each other (packed weights are opaque to "
                         "torch.compile); pass one of them")
    use = cfg.pack_weights is not False and not cfg.compile and on_cpu
    return packed_linears(model, rows) if use else nullcontext()


def _token_sink(streamer, prompt_ids):
    """Accept a plain callable `streamer(tokens)` or a transformers streamer (`put`/`end`, e.g. TextStreamer),
    which, as in transformers, first receives the prompt. Returns (per-step function, end function)."""
    if streamer is None:
        return None, None
    if hasattr(streamer, "put"):
        streamer.put(prompt_ids.cpu())
        return (lambda t: streamer.put(t.cpu())), getattr(streamer, "end", None)
    if not callable(streamer):
        raise TypeError(f"streamer must be callable (called with each step's new tokens) or have put()/end(), "
                        f"got {type(streamer).__name__}")
    return streamer, None


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
             generator: Optional[torch.Generator] = None, streamer=None, **kwargs) -> torch.Tensor:
    """Continue each prompt row; returns (B * num_return_sequences, T + new) ids: the prompt, then new tokens.

    kwargs are GenerationConfig's fields (transformers' names and meanings): max_new_tokens, max_length,
    min_new_tokens, do_sample, temperature, top_k, top_p, min_p, repetition_penalty, no_repeat_ngram_size,
    num_beams, length_penalty, early_stopping, num_return_sequences, eos_token_id, pad_token_id; and
    nanogpt2's pack_weights (None: oneDNN-packed weights on CPU, packed.py) and compile (torch.compile a
    fixed-shape decode step, compiled.py). `attention_mask` (B, T): 0 marks left padding. `generator` (a torch.Generator on the model's device)
    makes sampling reproducible without touching the global RNG (which it uses otherwise, as transformers
    does). `streamer(tokens)` is called with each step's new tokens (N,) (greedy and sampling only; a
    transformers streamer with put()/end() works too). Output rows are b * num_return_sequences + i.
    """
    prompt, cfg = _setup(model, input_ids, attention_mask, kwargs)
    if cfg.num_beams > 1:
        if streamer is not None:
            raise ValueError("streamer cannot be used with beam search (num_beams > 1): beams are only decided "
                             "at the end (transformers refuses it too)")
        with packing(model, cfg, prompt.ids.shape[0] * cfg.num_beams):
            return beam_search(model, prompt, cfg, generator)
    put, end = _token_sink(streamer, prompt.ids)
    new = []
    with packing(model, cfg, prompt.ids.shape[0] * cfg.num_return_sequences):
        for token in decode(model, prompt, cfg, generator):
            new.append(token)
            if put is not None:
                put(token)
    if end is not None:
        end()
    return torch.cat([expand(prompt.ids, cfg.num_return_sequences), torch.stack(new, dim=1)], dim=1)


def stream(model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
           generator: Optional[torch.Generator] = None, **kwargs) -> Iterator[torch.Tensor]:
    """generate() as an iterator: yields each step's new tokens (B * num_return_sequences,) as they are made.

    Arguments are checked now, not at the first next(). Greedy and sampling only (beam search decides its
    tokens at the end)."""
    prompt, cfg = _setup(model, input_ids, attention_mask, kwargs)
    if cfg.num_beams > 1:
        raise ValueError(f"stream() needs num_beams=1 (got {cfg.num_beams}): beam search decides its tokens "
                         "only at the end; use generate()")

    packed = packing(model, cfg, prompt.ids.shape[0] * cfg.num_return_sequences)   # checked now; packs later

    @torch.no_grad()   # on a generator function, torch enters no_grad around each step only, not in between
    def tokens():   # packed until exhausted or closed (a dropped iterator is closed when collected)
        with packed:
            yield from decode(model, prompt, cfg, generator)

    return tokens()

