"""KV-cache decode attention in Triton: one new query per row against its cache, split-K + merge.

During generation each step has one query token per row, so the work is B·nh dot products against
a cache of up to S_max keys: memory-bound (every K and V byte is read once), and for GPT-2's 12–25
heads B·nh programs are far too few to keep a GPU's ~100 SMs busy. So we also split the cache:
    phase 1  grid (B·nh, num_splits): each program runs an online softmax over its slice of the
             cache and writes a partial result (out_s normalised, lse_s = log-sum-exp of its scores)
    phase 2  grid (B·nh,): merge the splits, out = Σ_s exp(lse_s − lse)·out_s with lse = log Σ_s exp(lse_s)
This is "Flash-Decoding" (Dao, Haziza, Massa, Sizov, 2023): the split-K idea of FlashAttention-2 §3.2
applied to the key axis. With one split, phase 1 writes the output itself and phase 2 is skipped.

Everything is fixed-shape for CUDA graphs: per-row lengths live in an int32 tensor read on device
(no .item(), no host sync), and the number of splits depends only on S_max and B·nh. The split count
and the cache length are run-time arguments, never compile-time constants, so a generation whose cache
grows from 1 to 1024 positions compiles each kernel once (tests/test_decode_attention.py counts).
"""

import math
from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _ops

_INTERPRET = _ops.INTERPRET
LOG2E = 1.4426950408889634  # exp(x) == exp2(x·log2 e)
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_SPLITS = 128  # the most splits the default picks (each costs a partial write and a share of the merge)
SPLITS_BLOCK = 16  # the merge reads the partials this many splits at a time (a power of two: tl.arange)


# Triton compiles a new variant for every distinct value of a constexpr, and by default also when an
# int argument becomes 1 or a multiple of 16 (it specialises on both). s_max, split_size and num_splits
# change as the cache grows, so they are exempt (do_not_specialize): one compiled kernel serves them all.
@triton.jit(do_not_specialize=["s_max", "split_size", "num_splits"])
def _decode_split_kernel(Q, K, V, SEQLENS, KV_START, Out, O_PART, LSE_PART,
                         stride_qb, stride_qh, stride_qd,
                         stride_kb, stride_kh, stride_ks, stride_kd,
                         stride_vb, stride_vh, stride_vs, stride_vd,
                         stride_ob, stride_oh, stride_od,
                         H, s_max, split_size, num_splits, qk_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_KV_START: tl.constexpr):
    # grid = (B·nh, num_splits); this program covers cache positions [split·split_size, (split+1)·split_size).
    # B·nh on axis 0: CUDA caps axes 1 and 2 at 65535.
    qk_scale = tl.cast(qk_scale, tl.float32)  # fp64 under torch.compile (inductor's float args): keep the state fp32
    off_bh = tl.program_id(0)
    split = tl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H

    # valid cache positions of this row: [kv_lo, seqlen); clamped so bad values can't read out of bounds
    seqlen = tl.minimum(tl.maximum(tl.load(SEQLENS + off_b), 0), s_max)
    kv_lo = 0
    if HAS_KV_START:
        kv_lo = tl.maximum(tl.load(KV_START + off_b), 0)
    start = split * split_size  # split_size is a multiple of BLOCK_N: blocks stay aligned
    end = tl.minimum(start + split_size, seqlen)
    lo = tl.maximum(start, (kv_lo // BLOCK_N) * BLOCK_N)  # skip whole blocks of left padding

    offs_d = tl.arange(0, HEAD_DIM)
    k_base = K + off_b.to(tl.int64) * stride_kb + off_h.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_h.to(tl.int64) * stride_vh
    # One query row: too thin for tl.dot (which needs >= 16 rows), and this kernel is bound by
    # memory anyway, so the dot products are plain multiply + row sums on (BLOCK_N, HEAD_DIM) tiles.
    q = tl.load(Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh + offs_d * stride_qd)
    q = q.to(tl.float32) * qk_scale  # scores come out in log2 units (qk_scale = sm_scale·log2 e)

    # online softmax state (see flash_attention.py): running max, running sum, weighted sum of v
    m_i = tl.full([1], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    offs_n = lo + tl.arange(0, BLOCK_N)
    k_ptrs = k_base + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd  # (BLOCK_N, HEAD_DIM)
    v_ptrs = v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd
    k_step = BLOCK_N * stride_ks
    v_step = BLOCK_N * stride_vs
    for start_n in range(lo, end, BLOCK_N):
        valid = (offs_n >= kv_lo) & (offs_n < end)
        k = tl.load(k_ptrs, mask=valid[:, None], other=0.0)
        qk = tl.sum(q[None, :] * k.to(tl.float32), axis=1)  # (BLOCK_N,)
        qk = tl.where(valid, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=0))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # all-padding block: avoid -inf - -inf
        p = tl.math.exp2(qk - m_sub)
        alpha = tl.math.exp2(m_i - m_sub)
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
        offs_n += BLOCK_N
        k_ptrs += k_step
        v_ptrs += v_step

    # result of this split: normalised output (zeros when it saw no key) and its log2-sum-exp (-inf then)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe
    if num_splits == 1:
        # the whole cache was ours: this is the answer; no partials, no merge launch (a run-time branch,
        # not a constexpr, so the one-split and many-split steps of a generation share one compile)
        tl.store(Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh + offs_d * stride_od,
                 out.to(Out.dtype.element_ty))
    else:
        lse = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))
        part = off_bh.to(tl.int64) * num_splits + split  # partials are (B·nh, num_splits[, HEAD_DIM])
        tl.store(O_PART + part * HEAD_DIM + offs_d, out)
        tl.store(LSE_PART + part + tl.arange(0, 1), lse)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_merge_kernel(O_PART, LSE_PART, Out,
                         stride_ob, stride_oh, stride_od, H, num_splits,
                         HEAD_DIM: tl.constexpr, SPLITS_BLOCK: tl.constexpr):
    # grid = (B·nh,): combine the num_splits partials of one (row, head) with a log-sum-exp merge.
    # num_splits is a run-time value: we walk the partials SPLITS_BLOCK at a time (masking the tail),
    # so one compiled kernel merges any number of splits (as a constexpr, each count was a new compile).
    off_bh = tl.program_id(0)
    off_b = off_bh // H
    off_h = off_bh % H
    base = off_bh.to(tl.int64) * num_splits
    offs_d = tl.arange(0, HEAD_DIM)

    # pass 1: the largest partial lse, so that every weight below is at most 1 (no overflow)
    m_s = tl.full([SPLITS_BLOCK], float("-inf"), dtype=tl.float32)
    for s0 in range(0, num_splits, SPLITS_BLOCK):
        offs_s = s0 + tl.arange(0, SPLITS_BLOCK)
        lse = tl.load(LSE_PART + base + offs_s, mask=offs_s < num_splits, other=float("-inf"))
        m_s = tl.maximum(m_s, lse)
    m = tl.max(m_s, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no split saw a key (empty row): weights all 0

    # pass 2: out = Σ_s w_s·o_s / Σ_s w_s with w_s = 2^(lse_s − m), split s's share of the softmax denominator
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    w_sum = tl.zeros([SPLITS_BLOCK], dtype=tl.float32)
    for s0 in range(0, num_splits, SPLITS_BLOCK):
        offs_s = s0 + tl.arange(0, SPLITS_BLOCK)
        in_range = offs_s < num_splits
        lse = tl.load(LSE_PART + base + offs_s, mask=in_range, other=float("-inf"))
        o = tl.load(O_PART + (base + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                    mask=in_range[:, None], other=0.0)  # (SPLITS_BLOCK, HEAD_DIM)
        w = tl.math.exp2(lse - m)
        acc += tl.sum(w[:, None] * o, axis=0)
        w_sum += w
    denom = tl.sum(w_sum, axis=0)
    out = acc / tl.where(denom == 0.0, 1.0, denom)  # empty row -> zeros
    tl.store(Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh + offs_d * stride_od,
             out.to(Out.dtype.element_ty))


# ----------------------------------------------------------------------------------------------
# Python side
# ----------------------------------------------------------------------------------------------


def _block_n(head_dim):
    if _INTERPRET:
        return 16
    return 64 if head_dim <= 64 else 32  # a (BLOCK_N, HEAD_DIM) tile of ~4-8 KB per load


@lru_cache(maxsize=None)
def _num_sms(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # interpreter on CPU: any small number does


def _default_num_splits(batch_heads, s_max, block_n, device):
    """Enough programs to cover every SM a few times over, but never splits shorter than two blocks
    (each split costs a partial write and a share of the merge). Depends on shapes only."""
    want = _ops.cdiv(4 * _num_sms(device), batch_heads)
    most = _ops.cdiv(s_max, 2 * block_n)
    return max(1, min(want, most, MAX_SPLITS))


def _check_decode_inputs(q, k_cache, v_cache, cache_seqlens, kv_start, sm_scale, num_splits):
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("cache_seqlens", cache_seqlens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3:
        raise ValueError(f"q must be 3-D (B, nh, hs): one new token per row; got shape {tuple(q.shape)}")
    B, H, D = q.shape
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4 or t.shape[0] != B or t.shape[1] != H or t.shape[3] != D:
            raise ValueError(
                f"{name} must have shape (B, nh, S_max, hs) = ({B}, {H}, S_max, {D}), got {tuple(t.shape)}"
            )
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must have the same shape")
    if D not in HEAD_DIMS:
        raise ValueError(f"head dim {D} not supported; valid: {HEAD_DIMS}")
    if q.dtype not in DTYPES:
        raise TypeError(f"dtype {q.dtype} not supported; valid: {DTYPES}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"q, k_cache, v_cache must share a dtype; got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("cache_seqlens", cache_seqlens)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if not (q.device.type == "cuda" or (q.device.type == "cpu" and _INTERPRET)):
        raise ValueError(
            f"q is on {q.device}; the Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 set before triton is imported, to run them slowly on CPU)"
        )
    for name, t in (("cache_seqlens", cache_seqlens), ("kv_start", kv_start)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be an int32 tensor of shape ({B},), got {type(t).__name__}")
        if t.shape != (B,):
            raise ValueError(f"{name} must have shape (B,) = ({B},), got {tuple(t.shape)}")
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if sm_scale is not None and not (isinstance(sm_scale, (int, float)) and math.isfinite(sm_scale)):
        raise ValueError(f"sm_scale must be a finite float or None, got {sm_scale!r}")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        # int64 offsets for batch and head, int32 ones within a (batch, head) slice of the cache
        span = (t.shape[2] - 1) * abs(t.stride(2)) + (t.shape[3] - 1) * abs(t.stride(3))
        if span >= 2**31:
            raise ValueError(f"{name}: one (batch, head) slice spans {span} elements, more than the kernel's "
                             "int32 offsets address (2**31 - 1)")


@_ops.register("nanogpt2::decode_attention")
def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
            kv_start: Optional[torch.Tensor], sm_scale: float, num_splits: Optional[int]) -> torch.Tensor:
    """The launcher, as a custom op (see _ops.py): one split launch, plus a merge when splits > 1."""
    B, H, D = q.shape
    S_max = k_cache.shape[2]
    out = torch.empty((B, H, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if S_max == 0:
        return out.zero_()
    block_n = _block_n(D)
    if num_splits is None:
        num_splits = _default_num_splits(B * H, S_max, block_n, q.device)
    split_size = _ops.cdiv(_ops.cdiv(S_max, num_splits), block_n) * block_n
    if num_splits == 1:  # the split kernel writes `out` itself; the partials are never touched, but stay
        # fp32 pointers: an argument's dtype is part of what Triton compiles for (a new dtype, a new variant)
        o_part = lse_part = torch.empty((1,), dtype=torch.float32, device=q.device)
    else:
        o_part = torch.empty((B * H, num_splits, D), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((B * H, num_splits), dtype=torch.float32, device=q.device)
    kv = kv_start if kv_start is not None else cache_seqlens  # dummy pointer when HAS_KV_START=False

    with _ops.on_device(q):
        _ops.launch(_decode_split_kernel)[(B * H, num_splits)](
            q, k_cache, v_cache, cache_seqlens, kv, out, o_part, lse_part,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
            H, S_max, split_size, num_splits, sm_scale * LOG2E,
            HEAD_DIM=D, BLOCK_N=block_n, HAS_KV_START=kv_start is not None,
            num_warps=4, num_stages=2,
        )
        if num_splits > 1:
            _ops.launch(_decode_merge_kernel)[(B * H,)](
                o_part, lse_part, out, *out.stride(), H, num_splits,
                HEAD_DIM=D, SPLITS_BLOCK=SPLITS_BLOCK, num_warps=4,
            )
    return out


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, kv_start=None, sm_scale=None, num_splits=None):
    """Attention of one new query per row over its KV cache.

    q: (B, nh, hs). k_cache, v_cache: (B, nh, S_max, hs), any strides, same dtype as q.
    cache_seqlens: int32 (B,), the number of valid cache positions per row (the new token's key and
        value already written at index cache_seqlens[b] - 1). Values are clamped to [0, S_max].
    kv_start: optional int32 (B,): positions < kv_start[b] are left padding and masked out.
    num_splits: how many slices of the cache to process in parallel; default from S_max and B·nh
        (at most MAX_SPLITS = 128).
    Returns (B, nh, hs) in q's dtype; a row with no valid position gets zeros.
    A custom op (torch.ops.nanogpt2.decode_attention): torch.compile traces it as one node.
    """
    _check_decode_inputs(q, k_cache, v_cache, cache_seqlens, kv_start, sm_scale, num_splits)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    return _decode(q, k_cache, v_cache, cache_seqlens, kv_start, sm_scale, num_splits)
