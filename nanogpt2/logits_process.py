"""Logits processors: what generation does to the next-token scores between the model and the choice of token.

Each is a pure function: scores (N, V) fp32 in, new scores out (the input is never modified). The arithmetic is
transformers' (generation/logits_process.py, v5), op for op, so the processed scores are identical, ties included;
generation.py applies them in transformers' order (`_get_logits_processor`):

    repetition_penalty -> no_repeat_ngram -> min_new_tokens (eos banned)      every decoding mode
    temperature -> top_k -> top_p -> min_p                                    sampling only

A filtered token gets -inf, so softmax gives it probability 0. `history` is the (N, L) token ids so far, prompt
included, with left padding replaced by V (the vocab size): an id no score column has, so padding is never
"a repeated token" nor part of an n-gram. transformers skips the padding for the repetition penalty the same way
(`prompt_ignore_length` from the attention mask); for n-grams it does not (see no_repeat_ngram).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NEG_INF = -float("inf")


def temperature(scores: torch.Tensor, t: float) -> torch.Tensor:
    """Divide by t: t < 1 sharpens the distribution, t > 1 flattens it (TemperatureLogitsWarper)."""
    return scores / t


def top_k(scores: torch.Tensor, k: int, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep the k highest scores per row (TopKLogitsWarper; Fan et al. 2018). Tokens tied with the k-th score
    are all kept, so a row may keep more than k."""
    k = min(max(k, min_tokens_to_keep), scores.shape[-1])
    kth = torch.topk(scores, k)[0][..., -1, None]                     # (N, 1)
    return scores.masked_fill(scores < kth, NEG_INF)


def top_p(scores: torch.Tensor, p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus filtering (TopPLogitsWarper; Holtzman et al. 2019): keep the smallest set of most probable tokens
    whose probabilities sum to at least p. Computed from the least probable end: drop every token whose
    cumulative probability, counted from the bottom, is <= 1 - p."""
    sorted_scores, order = torch.sort(scores, descending=False)      # ascending: (N, V)
    cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cum <= (1 - p)
    remove[..., -min_tokens_to_keep:] = False                         # the most probable tokens always stay
    remove = remove.scatter(1, order, remove)                         # back to vocabulary order
    return scores.masked_fill(remove, NEG_INF)


def min_p(scores: torch.Tensor, p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep tokens whose probability is at least p times the top token's (MinPLogitsWarper; Nguyen et al. 2024):
    strict when the model is confident, lenient when it is not."""
    probs = torch.softmax(scores, dim=-1)
    remove = probs < p * probs.amax(dim=-1, keepdim=True)
    keep = torch.topk(probs, min(min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
    remove.scatter_(-1, keep, False)
    return scores.masked_fill(remove, NEG_INF)


def repetition_penalty(scores: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (Keskar et al. 2019, RepetitionPenaltyLogitsProcessor): a token already in `history` gets
    its score divided by `penalty` if positive, multiplied if negative; once, however often it occurred.
    history (N, L) may hold V for "no token" (padding): it lands in a spare column that is dropped."""
    V = scores.shape[-1]
    padded = F.pad(scores, (0, 1))                                     # (N, V + 1)
    seen = padded.gather(1, history)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return padded.scatter(1, history, seen)[..., :V]


def no_repeat_ngram(scores: torch.Tensor, history: torch.Tensor, n: int) -> torch.Tensor:
    """Ban every token that would complete an n-gram already in `history` (NoRepeatNGramLogitsProcessor,
    after fairseq's sequence_generator). The last n-1 tokens are the prefix; every earlier window of n tokens
    that starts with it bans its last token.

    Deviation from transformers, on purpose: transformers reads left padding as real pad tokens, so a prompt
    that contains the pad id itself can match n-grams made of padding, and a padded row may generate other
    tokens than the same row alone. Here padding is V, which matches no real token: batch-invariant, and equal
    to transformers whenever the pad id does not occur inside the text."""
    L = history.shape[-1]
    if L < n:                                                          # no complete n-gram yet
        return scores
    prefix = history[:, L + 1 - n:]                                   # (N, n - 1)
    windows = history.unfold(1, n, 1)                                  # (N, L - n + 1, n)
    matches = (windows[..., :-1] == prefix[:, None]).all(dim=-1)       # (N, L - n + 1)
    V = scores.shape[-1]
    # non-matching windows (and banned "padding") go to a spare column past the vocabulary
    banned = scores.new_zeros((scores.shape[0], V + 1), dtype=torch.bool)
    banned.scatter_(1, torch.where(matches, windows[..., -1].clamp(max=V), V), True)
    return scores.masked_fill(banned[:, :V], NEG_INF)


def ban_tokens(scores: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Give the listed tokens -inf (min_new_tokens bans eos this way: MinNewTokensLengthLogitsProcessor)."""
    banned = torch.isin(torch.arange(scores.shape[-1], device=scores.device), token_ids)
    return torch.where(banned, NEG_INF, scores)
