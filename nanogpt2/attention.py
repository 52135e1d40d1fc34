"""Attention dispatch: one function, `attention(q, k, v, mask, ...)`, three backends.

  "triton" - nanogpt2's fused kernels (kernels/flash_attention.py for prefill/training,
             kernels/decode_attention.py for one new token against the KV cache); CUDA tensors, or CPU
             under TRITON_INTERPRET=1 (slow, for debugging and tests)
  "sdpa"   - torch.nn.functional.scaled_dot_product_attention (the CPU default)
  "eager"  - softmax(q kᵀ · scale + mask) v written out; the only path that materialises probabilities,
             so every backend falls back to it for a call that asks for attention maps
  "auto"   - triton for CUDA tensors when the triton package is installed, sdpa otherwise (decided per call,
             so a model built on CPU and moved with .cuda() picks up the kernels)

The model never knows which backend ran; the backends never know about GPT-2. Masking is described once,
by `AttentionMask`: causal, plus an optional 2-D key padding mask that covers cached + new positions.
"""
from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "triton", "sdpa", "eager")


_UNLOADED = object()
_KERNELS = _UNLOADED


def _kernels():
    """The Triton kernels module, or None when the triton package is not installed (e.g. macOS, where sdpa and
    eager still work). Decided by whether triton is installed, never by catching an error: a kernel module that
    fails to import (a bug, a triton too old) raises here rather than quietly turning "auto" into sdpa.

    Cached in a module global, not functools.lru_cache: torch.compile traces through an lru_cache wrapper (and
    then breaks the graph at importlib's find_spec), while a global it reads as a constant. On CUDA machines the
    module loads when this file is imported (below), so a compiled model never traces the import itself; there a
    triton that is installed but broken (or too old for the kernels) fails `import nanogpt2` with its own
    error, rather than the first forward pass."""
    global _KERNELS
    if _KERNELS is _UNLOADED:
        if importlib.util.find_spec("triton") is None:
            _KERNELS = None
        else:
            from . import kernels   # on first use: triton's import costs ~1 s, and CPU runs rarely need it
            _KERNELS = kernels
    return _KERNELS


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"attn_implementation {name!r} is not one of {', '.join(map(repr, BACKENDS))}")
    if name == "triton" and _kernels() is None:
        raise ValueError("attn_implementation='triton' needs the triton package, which is not installed here; "
                         "install triton (Linux x86-64) or use 'sdpa'")
    return name


def _triton_ok(q: torch.Tensor) -> bool:
    return _kernels() is not None and q.shape[-1] in (16, 32, 64, 128) and (q.is_cuda or triton_interpreting())


def resolve_backend(name: str, q: torch.Tensor) -> str:
    """The backend that runs for this call: "auto" decided from the tensor's device."""
    if name == "auto":
        return "triton" if (q.is_cuda and _triton_ok(q)) else "sdpa"
    if name == "triton" and not _triton_ok(q):
        raise ValueError(
            f"attn_implementation='triton' cannot run on a {q.device.type} tensor with head dim {q.shape[-1]}: "
            "the kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU, for debugging) and head dim in "
            "16/32/64/128; use 'auto' or 'sdpa'")
    return name


@dataclass
class AttentionMask:
    """Which keys each query may see: causal, and (optionally) not the padding.

    Queries are the last `q_len` of `past_len + q_len` positions. `key_padding` is [B, S] bool (True = a
    real token), S = past_len + q_len, or None when no position is padding. A query at a padding
    position has no real key to attend to: its output is exactly zero and its probabilities a row of zeros, on
    every backend (the triton kernels' rule; `padding_queries`), so hidden states at padding positions do not
    depend on the backend (they stay meaningless: the pad token's embedding at position 1, through the MLPs).
    """
    past_len: int
    q_len: int
    key_padding: Optional[torch.Tensor] = None
    _dense: Optional[torch.Tensor] = None
    _blocked: Optional[torch.Tensor] = None
    _bias: Optional[torch.Tensor] = None
    _kv_start: Optional[torch.Tensor] = None
    _left_padded: Optional[bool] = None
    # fixed-shape decode (cache.StaticSlot): int32 (B,) valid positions per row, the keys being the whole buffer
    cache_seqlens: Optional[torch.Tensor] = None

    @classmethod
    def static_decode(cls, cache_seqlens: torch.Tensor, kv_start: torch.Tensor, max_len: int) -> "AttentionMask":
        """One query per row against a whole cache buffer of max_len positions, of which row b's valid keys are
        [kv_start[b], cache_seqlens[b]) (int32 (B,) tensors): no Python number changes from step to step."""
        k_pos = torch.arange(max_len, device=cache_seqlens.device)[None, :]
        valid = (k_pos < cache_seqlens[:, None]) & (k_pos >= kv_start[:, None])           # (B, S)
        return cls(max_len - 1, 1, valid, _dense=valid[:, None, None, :], _kv_start=kv_start, _left_padded=True,
                   cache_seqlens=cache_seqlens)

    @classmethod
    def build(cls, attention_mask: Optional[torch.Tensor], past_len: int, q_len: int) -> "AttentionMask":
        """From forward's (B, past_len + q_len) 0/1 mask. A mask costs host syncs on CUDA (is anything padding? is
        it all on the left, as the fused kernels need?): once per generate() call, once per step when training
        with a mask. Without a mask, and in generate's decode steps, nothing here reads a value."""
        key_padding = None
        if attention_mask is not None:
            key_padding = attention_mask.bool()
            # nothing is padding: keep the fast is_causal paths (a data-dependent test: skipped when compiling,
            # where it would break the graph; the dense mask it leaves gives the same result)
            if not torch.compiler.is_compiling() and bool(key_padding.all()):
                key_padding = None
        return cls(past_len, q_len, key_padding)

    @property
    def kv_len(self) -> int:
        return self.past_len + self.q_len

    def dense(self, device) -> Optional[torch.Tensor]:
        """[B or 1, 1, q_len, S] bool, True = attend; None when plain causal with q_len == S (sdpa's is_causal)
        or when a single query may see every key (decode without padding)."""
        if self._dense is None:
            if self.key_padding is None and (self.past_len == 0 or self.q_len == 1):
                return None  # causal from the start, or one query that sees every key
            q_pos = torch.arange(self.past_len, self.kv_len, device=device)[:, None]  # (T, 1)
            k_pos = torch.arange(self.kv_len, device=device)[None, :]                  # (1, S)
            causal = k_pos <= q_pos                                                   # (T, S)
            if self.key_padding is None:
                self._dense = causal[None, None]
            else:
                real = self.key_padding[:, None, None, :]                             # (B, 1, 1, S)
                self_only = (k_pos == q_pos)[None, None]
                self._dense = causal & (real | self_only)
        return self._dense

    def blocked(self, device) -> Optional[torch.Tensor]:
        """The positions a query may not see, [B or 1, 1, q_len, S] bool (True = masked), for the eager path's
        masked_fill; None when every query sees every key. Made once and shared by every layer of a forward."""
        if self._blocked is None:
            dense = self.dense(device)
            if dense is None and self.q_len > 1:   # square causal
                dense = torch.ones(self.q_len, self.kv_len, dtype=torch.bool, device=device).tril()
            self._blocked = None if dense is None else ~dense
        return self._blocked

    def bias(self, device, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """blocked() as an additive mask of `dtype`: finfo(dtype).min where a query may not look, 0 elsewhere (None
        when every query sees every key); made once per forward, like blocked(). Adding it is the eager path's
        masked_fill_ without the bool broadcast (half the time): in fp32 and bf16 a masked score becomes finfo.min
        exactly (a real score is far below the rounding step there); in fp16 it lands at or near finfo.min, or at
        -inf, and softmax gives 0 all the same, as no query is ever masked from every key."""
        blocked = self.blocked(device)
        if blocked is None:
            return None
        if self._bias is None or self._bias.dtype != dtype:
            bias = torch.zeros(blocked.shape, dtype=dtype, device=device)
            self._bias = bias.masked_fill_(blocked, torch.finfo(dtype).min)
        return self._bias

    def padding_queries(self) -> Optional[torch.Tensor]:
        """(B, 1, q_len, 1) bool, True where the query itself is padding; None when no query is. A fixed-shape
        decode step's one query is always a real token (its key_padding covers the whole buffer instead)."""
        if self.key_padding is None or self.cache_seqlens is not None:
            return None
        return ~self.key_padding[:, self.past_len:, None][:, None]

    def kv_start(self) -> Optional[torch.Tensor]:
        """int32 [B]: first real position of each row, when the padding is all on the left (else None)."""
        if self.key_padding is None:
            return None
        if self._left_padded is None:
            kp = self.key_padding
            n_pad = (~kp).sum(-1)
            # left padded <=> row b is n_pad[b] zeros then ones
            pos = torch.arange(kp.shape[-1], device=kp.device)
            self._left_padded = bool(((pos[None, :] >= n_pad[:, None]) == kp).all())
            self._kv_start = n_pad.to(torch.int32) if self._left_padded else None
        return self._kv_start


def positions_from_mask(attention_mask: Optional[torch.Tensor], past: int, T: int, device) -> torch.Tensor:
    """Position ids (B or 1, T) of the last T of past + T positions. With a padding mask (B, past + T), a row's
    first real token is position 0 wherever it sits (left padding), and padding gets position 1, as
    transformers' generate does; forward and every decode step use this one rule."""
    if attention_mask is None:
        return torch.arange(past, past + T, device=device)[None]
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(attention_mask == 0, 1)
    return pos[:, -T:].to(device)


def static_positions(cache_seqlens: torch.Tensor, kv_start: torch.Tensor) -> torch.Tensor:
    """positions_from_mask for a fixed-shape decode step (AttentionMask.static_decode): (N, 1) long, the count of
    a row's real tokens before its new one. Tensors in, tensors out: no Python number changes between steps."""
    return (cache_seqlens - 1 - kv_start).long()[:, None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, *, scale: float,
              backend: str = "auto", dropout_p: float = 0.0, need_weights: bool = False,
              upcast: bool = False, probs_hook=None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """q (B, H, T, D), k and v (B, H, S, D) -> ((B, H, T, D), probabilities (B, H, T, S) or None).

    `upcast` (GPT-2's reorder_and_upcast_attn) computes scores and softmax in fp32; sdpa and the triton
    kernels always accumulate in fp32, so the flag only changes the eager path. `probs_hook(probs)` may
    read or replace the probabilities before they weight v (analysis hooks); it implies the eager path.
    """
    if need_weights or probs_hook is not None:
        return _eager(q, k, v, mask, scale, dropout_p, upcast, probs_hook)
    backend = resolve_backend(backend, q)
    if backend == "triton" and dropout_p == 0.0:
        out = _triton(q, k, v, mask, scale)
        if out is not None:
            return out, None
    if backend == "eager":
        return _eager(q, k, v, mask, scale, dropout_p, upcast)
    # sdpa, and triton's fall-backs (attention dropout in training; non-left padding)
    dense = mask.dense(q.device)
    # No dense mask: square causal (nothing cached; also right for one query) or one query seeing every key.
    # Decided on past_len, a Python int: q_len may be symbolic under torch.compile, and sdpa wants a bool.
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, dropout_p=dropout_p,
                                         is_causal=dense is None and mask.past_len == 0, scale=scale)
    pad = mask.padding_queries()
    return (out if pad is None else out.masked_fill(pad, 0.0)), None


def _eager(q, k, v, mask, scale, dropout_p, upcast, probs_hook=None):
    if upcast:  # transformers' _upcast_and_reordered_attn: scale folded in before an fp32 matmul
        scores, scale = torch.matmul(q.float() * scale, k.float().transpose(-1, -2)), 1.0
    else:
        scores = torch.matmul(q, k.transpose(-1, -2))                          # (B, H, T, S)
    if scores.device.type == "cpu" and not scores.requires_grad and scores.dtype == torch.float32:
        # One buffer, two passes: bias + scale * scores, then the softmax over itself. On CPU a second buffer costs
        # more than its bandwidth (fresh pages are faulted in: 48 MB a layer at T = 1024 for GPT-2 small), and
        # run_with_cache keeps every layer's probabilities, so none is reused (BENCHMARKS.md, "Cost of the hook
        # points"). The same probabilities as the path below, bit for bit in fp32 (tests/test_hooks.py). fp32 only:
        # torch.add rounds `alpha` to the tensor's dtype, so in fp16/bf16 a scale such as 1/12 would change.
        bias = mask.bias(q.device, scores.dtype)
        if bias is not None:
            torch.add(bias, scores, alpha=scale, out=scores)
        elif scale != 1.0:
            scores.mul_(scale)
        probs = torch.softmax(scores, dim=-1, out=scores)
    else:  # autograd: in place up to the softmax (neither matmul nor a scalar mul saves its output for backward)
        if scale != 1.0:
            scores.mul_(scale)
        blocked = mask.blocked(q.device)
        if blocked is not None:
            scores.masked_fill_(blocked, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1)
    probs = probs.to(v.dtype)
    pad = mask.padding_queries()
    if pad is not None:   # a padding query attends to nothing (see AttentionMask)
        probs = probs.masked_fill(pad, 0.0)
    if probs_hook is not None:
        probs = probs_hook(probs)
    dropped = F.dropout(probs, p=dropout_p, training=True) if dropout_p > 0 else probs
    return torch.matmul(dropped, v), probs


def _triton(q, k, v, mask, scale):
    """The fused kernels, or None when this mask needs a dense form they do not take (non-left padding)."""
    kernels = _kernels()
    kv_start = mask.kv_start()
    if mask.key_padding is not None and kv_start is None:
        return None
    if mask.past_len == 0:                       # prefill / training: square causal attention
        return kernels.flash_attention(q, k, v, causal=True, sm_scale=scale, kv_start=kv_start)
    if mask.q_len == 1:                          # decode: one query against the cache
        B = q.shape[0]
        seqlens = mask.cache_seqlens
        if seqlens is None:
            seqlens = torch.full((B,), mask.kv_len, dtype=torch.int32, device=q.device)
        return kernels.decode_attention(q[:, :, 0], k, v, seqlens, kv_start=kv_start,
                                        sm_scale=scale).unsqueeze(2)
    return None                                  # several new tokens after a cache: sdpa


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


if torch.cuda.is_available():   # "auto" will pick the kernels: load them now, outside any torch.compile trace
    _kernels()
