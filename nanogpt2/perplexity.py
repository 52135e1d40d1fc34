"""Perplexity of a model on a long token sequence, with a sliding window (Hugging Face's recipe).

tools/eval_perplexity.py is its command line; tests/test_eval_perplexity.py checks it against transformers.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from tqdm import tqdm


@torch.no_grad()
def sliding_window_perplexity(model: nn.Module, ids: torch.Tensor, max_length: Optional[int] = None,
                              stride: int = 512, device=None, progress: bool = False) -> tuple[float, float, int]:
    """(perplexity, mean nll in nats, tokens scored) of a long token sequence `ids` (N,), by Hugging Face's
    "Perplexity of fixed-length models" recipe (https://huggingface.co/docs/transformers/perplexity):
    windows of max_length tokens start every `stride` tokens; each window scores only the tokens no earlier
    window scored (the others are context, label -100); a window's mean loss is weighted by its count of
    non-ignored labels minus one, exactly as the recipe does (its `num_loss_tokens`), so the numbers equal
    transformers' to fp tolerance. stride == max_length means disjoint windows (no overlap)."""
    max_length = max_length or model.config.n_positions
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    if max_length > model.config.n_positions:
        raise ValueError(f"max_length {max_length} exceeds the model's n_positions {model.config.n_positions}")
    ids = ids.reshape(1, -1)
    seq_len = ids.size(1)
    if seq_len < 2:
        raise ValueError(f"need at least 2 tokens to score, got {seq_len}")
    device = device or next(model.parameters()).device
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    starts = range(0, seq_len, stride)
    if progress:
        starts = tqdm(starts, desc="perplexity")
    for begin in starts:
        end = min(begin + max_length, seq_len)
        trg_len = end - prev_end  # tokens this window scores (stride, except at the ends)
        input_ids = ids[:, begin:end].to(device)
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        num_loss_tokens = int((target_ids != -100).sum()) - target_ids.size(0)
        if num_loss_tokens > 0:  # a 1-token tail window has nothing to score (the recipe would add 0 * nan)
            loss = model(input_ids, labels=target_ids).loss  # mean over the scored, shifted labels
            nll_sum += loss.item() * num_loss_tokens
            n_tokens += num_loss_tokens
        prev_end = end
        if end == seq_len:
            break
    mean_nll = nll_sum / n_tokens
    return math.exp(mean_nll), mean_nll, n_tokens
