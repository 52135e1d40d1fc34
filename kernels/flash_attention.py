"""Fused (causal) attention in Triton, FlashAttention-2 style: forward, backward, and their custom ops.

softmax(q·kᵀ·scale)·v without ever materialising the [T, T] score matrix: each program keeps one
block of queries on chip and streams the keys and values past it, maintaining a running
("online") softmax. Follows Triton's 06-fused-attention tutorial and the FlashAttention-2 paper
(Dao, 2023, arXiv:2307.08691), which the comments cite as "FA2 §x".

Shapes: q, k, v are (B, nh, T, hs) with any strides (typically views of one fused (B, T, 3, nh, hs)
c_attn output); the kernels read them through their strides, so no copies are made. Outputs and
gradients are (B, nh, T, hs) views of (B, T, nh, hs) memory, so merging heads afterwards is free.
Public entry points:
    flash_attention(q, k, v, causal=True, sm_scale=None, kv_start=None)     differentiable
    flash_attention_with_lse(...)  -> (out, lse)                            differentiable, both outputs
    attention_probs_from_lse(q, k, lse, ...)                                pure torch, for attention maps
The launchers are custom ops (torch.ops.nanogpt2.flash_attention_fwd / _bwd, see _ops.py) with the
backward registered as their autograd formula: torch.compile and CUDA graphs see one op per call.
"""

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from . import _ops

# Triton's interpreter (TRITON_INTERPRET=1, read when triton is imported) runs these kernels on
# CPU with numpy; there we use small blocks so the tests stay fast.
_INTERPRET = _ops.INTERPRET

# exp(x) == exp2(x·log2 e); exp2 is the native instruction on GPUs. (The kernels spell out
# log2 e = 1.4426950408889634 and ln 2 = 0.6931471805599453 as literals: @triton.jit functions
# can't read plain Python globals.)
LOG2E = 1.4426950408889634
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _key_block_ranges(start_m, kv_lo, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Which key blocks the query rows [start_m, start_m + BLOCK_M) attend to, cut into three runs.

    Keys [kv_lo, T) are real (kv_lo > 0 for left-padded rows); with CAUSAL a query sees keys <= itself.
    Returns lo, head_hi, mid_lo, mid_hi, hi; walk the key blocks as
        [lo, head_hi)      masked: the one block holding kv_lo, partly padding (empty when kv_lo % BLOCK_N == 0)
        [mid_lo, mid_hi)   unmasked: every (query, key) pair is valid, so no compare/select per score
        [mid_hi, hi)       masked: the diagonal blocks (causal) and the ragged last block (any T)
    FA2 §3.1.1 ("causal masking"): blocks entirely above the diagonal are skipped (we stop the loop
    at the diagonal), and only blocks that straddle it pay for the mask.
    """
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, T)
        mid_hi = start_m  # a multiple of BLOCK_N because BLOCK_M % BLOCK_N == 0
    else:
        hi = T
        mid_hi = (T // BLOCK_N) * BLOCK_N
    lo = (kv_lo // BLOCK_N) * BLOCK_N
    mid_lo = tl.cdiv(kv_lo, BLOCK_N) * BLOCK_N
    mid_hi = tl.maximum(mid_hi, mid_lo)
    head_hi = tl.minimum(mid_lo, hi)
    return lo, head_hi, mid_lo, mid_hi, hi


@triton.jit
def _query_block(CAUSAL: tl.constexpr):
    """Index of this program's query block along grid axis 1, heaviest first when CAUSAL.

    With causal masking, query block i visits i + 1 key blocks, so the last block does the most work.
    GPUs hand out programs in launch order (axis 0 fastest), so launching the heavy blocks first and the
    light ones last fills the tail of the run with short programs instead of leaving one long straggler:
    "longest processing time first", as FlashAttention-3's causal tile scheduler does
    (SingleTileLPTScheduler in flash_attn's tile_scheduler).
    """
    pid_m = tl.program_id(1)
    if CAUSAL:
        pid_m = tl.num_programs(1) - 1 - pid_m
    return pid_m


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q,
                    k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                    offs_m, offs_d, lo, hi, kv_lo, T, qk_scale,
                    BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """Fold key/value blocks [lo, hi) into the running softmax state of one query block (FA2 Algorithm 1).

    State per query row: m_i = running max of the scores (log2 units), l_i = running sum of
    exp2(score - m_i), acc = running sum of exp2(score - m_i)·v (fp32, [BLOCK_M, HEAD_DIM]).
    When a new block raises the max, the old sums are rescaled by alpha = exp2(m_old - m_new);
    the division by l_i happens once, after the last block (FA2 §3.1.1, "fewer non-matmul FLOPs").
    """
    offs_n = lo + tl.arange(0, BLOCK_N)
    # (BLOCK_N, HEAD_DIM) tiles of pointers, built once and advanced by BLOCK_N rows per step
    k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
    v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
    k_step = BLOCK_N * stride_kt
    v_step = BLOCK_N * stride_vt
    for start_n in range(lo, hi, BLOCK_N):
        if MASKED:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < T, other=0.0)
        else:
            k = tl.load(k_ptrs)
        # scores in log2 units: qk_scale = sm_scale · log2(e), so exp2(qk) == exp(q·k·sm_scale)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N] fp32
        if MASKED:
            keep = (offs_n[None, :] >= kv_lo) & (offs_n[None, :] < T)
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # A row can have no valid key in this block (or yet): then m_new is -inf and
        # qk - m_new = -inf - (-inf) = NaN. Subtract 0 instead: every exp2 below is then exp2(-inf) = 0.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_sub[:, None])
        alpha = tl.math.exp2(m_i - m_sub)  # rescales what was summed under the old max
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            v = tl.load(v_ptrs, mask=offs_n[:, None] < T, other=0.0)
        else:
            v = tl.load(v_ptrs)
        # second matmul in v's dtype (fp16/bf16 tensor cores), accumulated in fp32
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
        offs_n += BLOCK_N
        k_ptrs += k_step
        v_ptrs += v_step
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["T"])  # see _launch: one compiled kernel for every sequence length
def _attn_fwd(Q, K, V, Out, LSE, KV_START,
              stride_qb, stride_qh, stride_qt, stride_qd,
              stride_kb, stride_kh, stride_kt, stride_kd,
              stride_vb, stride_vh, stride_vt, stride_vd,
              stride_ob, stride_oh, stride_ot, stride_od,
              H, T, qk_scale,
              HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # grid = (B·nh, cdiv(T, BLOCK_M)): one program per block of BLOCK_M query rows of one head.
    # Parallelising over query blocks as well as batch·heads is FA2 §3.2 (better occupancy at long T).
    # B·nh goes on axis 0 because CUDA caps grid axes 1 and 2 at 65535 (axis 0 at 2**31 - 1).
    # torch.compile passes Python floats as fp64 scalars (inductor: "Python floats are natively fp64"), which
    # would turn the fp32 softmax state fp64 and fail Triton's loop-carried type check: fp32 from here on
    qk_scale = tl.cast(qk_scale, tl.float32)
    off_bh = tl.program_id(0)
    start_m = _query_block(CAUSAL) * BLOCK_M
    off_b = off_bh // H
    off_h = off_bh % H
    # int64 base offsets: B·stride_b can pass 2**31 elements for big batches
    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    k_base = K + off_b.to(tl.int64) * stride_kb + off_h.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_h.to(tl.int64) * stride_vh
    o_base = Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_in = offs_m < T  # the last query block may hang past T

    # keys before kv_start[b] are left padding; clamp so a bad value can't send loads out of bounds
    kv_lo = 0
    if HAS_KV_START:
        kv_lo = tl.minimum(tl.maximum(tl.load(KV_START + off_b), 0), T)

    # the query block stays in registers for the whole loop: (BLOCK_M, HEAD_DIM)
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_in[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    lo, head_hi, mid_lo, mid_hi, hi = _key_block_ranges(start_m, kv_lo, T, BLOCK_M, BLOCK_N, CAUSAL)
    if HAS_KV_START:  # the block holding kv_start (partly padding)
        acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd,
                                        stride_vt, stride_vd, offs_m, offs_d, lo, head_hi, kv_lo, T,
                                        qk_scale, BLOCK_N, CAUSAL, True, DOT_PRECISION)
    # blocks strictly below the diagonal: no masking at all
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd,
                                    stride_vt, stride_vd, offs_m, offs_d, mid_lo, mid_hi, kv_lo, T,
                                    qk_scale, BLOCK_N, CAUSAL, False, DOT_PRECISION)
    # the diagonal (causal) / the ragged end of the sequence
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd,
                                    stride_vt, stride_vd, offs_m, offs_d, mid_hi, hi, kv_lo, T,
                                    qk_scale, BLOCK_N, CAUSAL, True, DOT_PRECISION)

    # A row with no valid key (a padding row: position < kv_start) outputs zeros, and gets
    # lse = +inf so that the backward's exp(s - lse) is exactly 0 for it: zero gradients.
    empty = l_i == 0.0
    if HAS_KV_START:
        empty = empty | (offs_m < kv_lo)
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    # log-sum-exp of the scaled scores in natural-log units, saved for the backward (FA2 §3.1.1):
    # lse = ln Σ exp(s) = (m + log2 l)·ln 2 with m, l in log2 units
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # ·ln 2
    tl.store(LSE + off_bh.to(tl.int64) * T + offs_m, lse, mask=row_in)
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=row_in[:, None])


# ----------------------------------------------------------------------------------------------
# Backward (FA2 §3.1.2, Algorithm 2):
#   dP = dO·Vᵀ,  dS = P ∘ (dP − Δ) with Δ = rowsum(dO ∘ O),  dQ = dS·K·scale,  dK = dSᵀ·Q·scale,  dV = Pᵀ·dO
# where P = exp(S − lse) is recomputed from the saved lse instead of being stored.
# FA2 runs one pass over key blocks and adds each block's share of dQ with atomics. Like Triton's
# tutorial we use two kernels instead, one owning key blocks (dK, dV) and one owning query blocks
# (dQ): P is recomputed twice, but there are no atomics and the result is deterministic.
# ----------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["T"])
def _attn_bwd_preprocess(O, DO, Delta,
                         stride_ob, stride_oh, stride_ot, stride_od,
                         stride_dob, stride_doh, stride_dot, stride_dod,
                         H, T, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    # Δ_i = Σ_d dO_id·O_id  (= Σ_j P_ij·dP_ij), one fp32 per query row: (B, nh, T); grid (B·nh, cdiv(T, BLOCK_M))
    off_bh = tl.program_id(0)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    off_b = off_bh // H
    off_h = off_bh % H
    offs_d = tl.arange(0, HEAD_DIM)
    row_in = offs_m < T
    o = tl.load(O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                mask=row_in[:, None], other=0.0)
    do = tl.load(DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
                 + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=row_in[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(Delta + off_bh.to(tl.int64) * T + offs_m, delta, mask=row_in)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v,
                         q_base, do_base, lse_base, delta_base,
                         stride_qt, stride_qd, stride_dot, stride_dod,
                         offs_n, offs_d, lo, hi, T, qk_scale,
                         BLOCK_M: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key block over query rows [lo, hi). Works on transposed tiles
    (keys along rows) so that dk, dv come out as (BLOCK_N, HEAD_DIM) without a final transpose."""
    offs_m = lo + tl.arange(0, BLOCK_M)
    q_ptrs = q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
    do_ptrs = do_base + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod
    q_step = BLOCK_M * stride_qt
    do_step = BLOCK_M * stride_dot
    for start_m in range(lo, hi, BLOCK_M):
        row_in = offs_m < T
        q = tl.load(q_ptrs, mask=row_in[:, None], other=0.0)
        # rows past T read lse = +inf, so their P is 0 and they contribute nothing
        lse = tl.load(lse_base + offs_m, mask=row_in, other=float("inf")) * 1.4426950408889634  # log2 units
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        pT = tl.math.exp2(qkT * qk_scale - lse[None, :])  # Pᵀ recomputed from the saved lse
        if MASKED:  # the diagonal: query row must be >= key position
            pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
        do = tl.load(do_ptrs, mask=row_in[:, None], other=0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)  # dV += Pᵀ·dO
        delta = tl.load(delta_base + offs_m, mask=row_in, other=0.0)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # dPᵀ = V·dOᵀ
        dsT = pT * (dpT - delta[None, :])  # dSᵀ = Pᵀ ∘ (dPᵀ − Δ)
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)  # dK += dSᵀ·Q (scaled later)
        offs_m += BLOCK_M
        q_ptrs += q_step
        do_ptrs += do_step
    return dk, dv


@triton.jit(do_not_specialize=["T"])
def _attn_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, Delta, KV_START,
                   stride_qb, stride_qh, stride_qt, stride_qd,
                   stride_kb, stride_kh, stride_kt, stride_kd,
                   stride_vb, stride_vh, stride_vt, stride_vd,
                   stride_dob, stride_doh, stride_dot, stride_dod,
                   stride_dkb, stride_dkh, stride_dkt, stride_dkd,
                   stride_dvb, stride_dvh, stride_dvt, stride_dvd,
                   H, T, sm_scale, qk_scale,
                   HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # grid = (B·nh, cdiv(T, BLOCK_N)): one program owns one key block and loops over query blocks,
    # so it alone writes its rows of dK and dV (FA2 §3.2: parallelise the backward over keys).
    # Causal: key block 0 is seen by every query, so the heaviest programs already launch first.
    sm_scale = tl.cast(sm_scale, tl.float32)  # fp64 under torch.compile: see _attn_fwd
    qk_scale = tl.cast(qk_scale, tl.float32)
    off_bh = tl.program_id(0)
    start_n = tl.program_id(1) * BLOCK_N
    off_b = off_bh // H
    off_h = off_bh % H
    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    k_base = K + off_b.to(tl.int64) * stride_kb + off_h.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_h.to(tl.int64) * stride_vh
    do_base = DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh
    lse_base = LSE + off_bh.to(tl.int64) * T
    delta_base = Delta + off_bh.to(tl.int64) * T

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_in = offs_n < T
    k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=key_in[:, None], other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                mask=key_in[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)

    # Query rows that can see this key block: all of them, or (causal) rows >= start_n.
    # Rows before kv_start are padding (lse = +inf, so P = 0): skip them whole blocks at a time.
    q_lo = 0
    q_hi = T
    if HAS_KV_START:
        kv_lo = tl.minimum(tl.maximum(tl.load(KV_START + off_b), 0), T)
        q_lo = (kv_lo // BLOCK_M) * BLOCK_M
        q_hi = tl.where(start_n + BLOCK_N > kv_lo, T, q_lo)  # a key block of pure padding: no work
    if CAUSAL:
        q_lo = tl.maximum(q_lo, start_n)  # BLOCK_N % BLOCK_M == 0, so still block-aligned
        diag_hi = tl.minimum(tl.maximum(start_n + BLOCK_N, q_lo), q_hi)
        dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                      stride_qt, stride_qd, stride_dot, stride_dod,
                                      offs_n, offs_d, q_lo, diag_hi, T, qk_scale,
                                      BLOCK_M, True, DOT_PRECISION)
        q_lo = diag_hi
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                  stride_qt, stride_qd, stride_dot, stride_dod,
                                  offs_n, offs_d, q_lo, q_hi, T, qk_scale,
                                  BLOCK_M, False, DOT_PRECISION)

    dk = dk * sm_scale  # S = scale·Q·Kᵀ, so dK = scale·dSᵀ·Q
    if HAS_KV_START:  # padding keys were never attended to: their gradients are exactly zero
        key_real = offs_n >= kv_lo
        dk = tl.where(key_real[:, None], dk, 0.0)
        dv = tl.where(key_real[:, None], dv, 0.0)
    dk_base = DK + off_b.to(tl.int64) * stride_dkb + off_h.to(tl.int64) * stride_dkh
    dv_base = DV + off_b.to(tl.int64) * stride_dvb + off_h.to(tl.int64) * stride_dvh
    tl.store(dk_base + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=key_in[:, None])
    tl.store(dv_base + offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=key_in[:, None])


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta,
                       k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                       offs_m, offs_d, lo, hi, kv_lo, T, qk_scale,
                       BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, MASKED: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [lo, hi)."""
    offs_n = lo + tl.arange(0, BLOCK_N)
    k_ptrs = k_base + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd
    v_ptrs = v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
    k_step = BLOCK_N * stride_kt
    v_step = BLOCK_N * stride_vt
    for start_n in range(lo, hi, BLOCK_N):
        if MASKED:
            k = tl.load(k_ptrs, mask=offs_n[:, None] < T, other=0.0)
            v = tl.load(v_ptrs, mask=offs_n[:, None] < T, other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        if MASKED:
            keep = (offs_n[None, :] >= kv_lo) & (offs_n[None, :] < T)
            if CAUSAL:
                keep = keep & (offs_m[:, None] >= offs_n[None, :])
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # dP = dO·Vᵀ
        ds = p * (dp - delta[:, None])  # dS = P ∘ (dP − Δ)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)  # dQ += dS·K (scaled later)
        offs_n += BLOCK_N
        k_ptrs += k_step
        v_ptrs += v_step
    return dq


@triton.jit(do_not_specialize=["T"])
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, Delta, KV_START,
                 stride_qb, stride_qh, stride_qt, stride_qd,
                 stride_kb, stride_kh, stride_kt, stride_kd,
                 stride_vb, stride_vh, stride_vt, stride_vd,
                 stride_dob, stride_doh, stride_dot, stride_dod,
                 stride_dqb, stride_dqh, stride_dqt, stride_dqd,
                 H, T, sm_scale, qk_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 CAUSAL: tl.constexpr, HAS_KV_START: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # grid = (B·nh, cdiv(T, BLOCK_M)): one program owns one query block and loops over key blocks,
    # the same walk as the forward (so the same three runs of masked/unmasked blocks, heaviest first).
    sm_scale = tl.cast(sm_scale, tl.float32)  # fp64 under torch.compile: see _attn_fwd
    qk_scale = tl.cast(qk_scale, tl.float32)
    off_bh = tl.program_id(0)
    start_m = _query_block(CAUSAL) * BLOCK_M
    off_b = off_bh // H
    off_h = off_bh % H
    q_base = Q + off_b.to(tl.int64) * stride_qb + off_h.to(tl.int64) * stride_qh
    k_base = K + off_b.to(tl.int64) * stride_kb + off_h.to(tl.int64) * stride_kh
    v_base = V + off_b.to(tl.int64) * stride_vb + off_h.to(tl.int64) * stride_vh
    do_base = DO + off_b.to(tl.int64) * stride_dob + off_h.to(tl.int64) * stride_doh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_in = offs_m < T
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=row_in[:, None], other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=row_in[:, None], other=0.0)
    # padding rows and rows past T have lse = +inf: P = 0, so their dQ is 0
    lse = tl.load(LSE + off_bh.to(tl.int64) * T + offs_m, mask=row_in, other=float("inf"))
    lse = lse * 1.4426950408889634  # to log2 units, like the scores
    delta = tl.load(Delta + off_bh.to(tl.int64) * T + offs_m, mask=row_in, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    kv_lo = 0
    if HAS_KV_START:
        kv_lo = tl.minimum(tl.maximum(tl.load(KV_START + off_b), 0), T)
    lo, head_hi, mid_lo, mid_hi, hi = _key_block_ranges(start_m, kv_lo, T, BLOCK_M, BLOCK_N, CAUSAL)
    if HAS_KV_START:
        dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd,
                                stride_vt, stride_vd, offs_m, offs_d, lo, head_hi, kv_lo, T,
                                qk_scale, BLOCK_N, CAUSAL, True, DOT_PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd,
                            stride_vt, stride_vd, offs_m, offs_d, mid_lo, mid_hi, kv_lo, T,
                            qk_scale, BLOCK_N, CAUSAL, False, DOT_PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd,
                            stride_vt, stride_vd, offs_m, offs_d, mid_hi, hi, kv_lo, T,
                            qk_scale, BLOCK_N, CAUSAL, True, DOT_PRECISION)

    dq = dq * sm_scale
    dq_base = DQ + off_b.to(tl.int64) * stride_dqb + off_h.to(tl.int64) * stride_dqh
    tl.store(dq_base + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=row_in[:, None])


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------
# One hand-picked config per (kernel, head dim, dtype) rather than @triton.autotune: autotuning
# with several configs needs a GPU (it breaks the CPU interpreter) and costs seconds per shape.
# Each list runs from the config we expect to be fastest down to small tiles; when a GPU lacks the
# shared memory for one (consumer cards have ~100 KB per block, an A100 163 KB, an H100 227 KB),
# Triton raises OutOfResources before launching and we take the next.
# Entries are (BLOCK_M, BLOCK_N, num_warps, num_stages).
#
# The first configs were sized by compiling each kernel for sm_90 ahead of time (Triton 3.9's
# frontend and ptxas -v, no GPU needed) so that none spills registers; the bigger candidates did:
#   forward d=128, 128×64 on 4 warps: 1004 B of spills; 128×128 on 8 warps: 12-168 B
#   dK/dV d=64, 32×128 on 4 warps: 48 B
#   fp32 with IEEE dots (torch's default "highest"): FMA dots hold whole tiles in registers, so a
#   64×32 forward spilled 1-8 KB and the d=128 backward 43-91 KB (and took a minute to compile)
# tests/test_flash_attention.py::test_compiled_kernel_resources_gpu reads the real numbers on a GPU.


def _tutorial_keeps(config):
    """Triton's 06-fused-attention prunes forward configs with 8 warps on tiles smaller than 128×128
    (`keep()`, applied on Hopper): 8 warps then hold too few rows each to feed wgmma well. Every
    forward config below passes this rule on every GPU (tests/test_flash_attention.py checks)."""
    block_m, block_n, num_warps, _ = config
    return not (block_m * block_n < 128 * 128 and num_warps == 8)


def _fwd_configs(head_dim, dtype):
    if _INTERPRET:  # BLOCK_M > BLOCK_N on purpose: the CPU tests then cover multi-block diagonals
        return [(32, 16, 4, 1)]
    if dtype == torch.float32:  # small tiles: fp32 is the accurate path, not the fast one
        return [(32, 32, 4, 2), (16, 16, 4, 1)] if head_dim <= 64 else [(16, 16, 4, 2), (16, 16, 4, 1)]
    if head_dim <= 64:
        return [(128, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 1), (16, 16, 4, 1)]
    # head dim 128: the (128, HEAD_DIM) fp32 accumulator alone is 128 registers a thread at 128×N on
    # 4 warps (it spilled), and 8 warps on a tile under 128×128 is what the tutorial prunes: 64×64.
    return [(64, 64, 4, 3), (64, 32, 4, 2), (16, 16, 4, 1)]


def _bwd_dkdv_configs(head_dim, dtype):
    # (BLOCK_M = query rows per step, BLOCK_N = keys owned by the program, ...); BLOCK_N % BLOCK_M == 0.
    # dK and dV are two (BLOCK_N, HEAD_DIM) fp32 accumulators: 8 warps share them (4 spilled at d=64).
    if _INTERPRET:
        return [(16, 32, 4, 1)]
    if dtype == torch.float32:
        return [(16, 32, 4, 2), (16, 16, 4, 1)] if head_dim <= 64 else [(16, 16, 4, 2), (16, 16, 4, 1)]
    return [(32, 128, 8, 2), (32, 64, 4, 2), (16, 32, 4, 1), (16, 16, 4, 1)]


def _bwd_dq_configs(head_dim, dtype):
    # (BLOCK_M = query rows owned by the program, BLOCK_N = keys per step, ...); BLOCK_M % BLOCK_N == 0
    if _INTERPRET:
        return [(32, 16, 4, 1)]
    if dtype == torch.float32:
        return [(32, 16, 4, 2), (16, 16, 4, 1)] if head_dim <= 64 else [(16, 16, 4, 2), (16, 16, 4, 1)]
    if head_dim <= 64:
        return [(128, 32, 4, 3), (64, 32, 4, 2), (32, 16, 4, 1), (16, 16, 4, 1)]
    return [(128, 32, 8, 2), (64, 32, 4, 2), (32, 16, 4, 1), (16, 16, 4, 1)]


_CONFIG_THAT_FITS = {}  # (kernel name, head dim, dtype, device) -> index of the first config that fit


def _launch(name, kernel, configs, grid_for, args, constexprs, device):
    """Launch kernel[grid](*args) with the first config that fits this GPU; remember the choice.

    Runs inside a custom op (see _ops.py), so torch.compile never traces this try/except: eagerly it
    runs on every call; under compile once, on fake tensors, where nothing raises and the config
    remembered from an eager call (else the first) is the one Inductor compiles.
    """
    key = (name, constexprs["HEAD_DIM"], args[0].dtype, device)
    first = _CONFIG_THAT_FITS.get(key, 0)
    for i in range(first, len(configs)):
        block_m, block_n, num_warps, num_stages = configs[i]
        try:
            kernel[grid_for(block_m, block_n)](*args, **constexprs, BLOCK_M=block_m, BLOCK_N=block_n,
                                               num_warps=num_warps, num_stages=num_stages)
        except OutOfResources:  # raised at compile/load time, before anything ran
            if i == len(configs) - 1:
                raise
            continue
        _CONFIG_THAT_FITS[key] = i
        return


def _dot_precision(dtype):
    # fp32 inputs: follow torch's own matmul setting (torch.set_float32_matmul_precision), so
    # "highest" gets true fp32 products and "high"/"medium" get TF32 tensor cores.
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


# ----------------------------------------------------------------------------------------------
# Python side: validation, launchers (as custom ops), autograd
# ----------------------------------------------------------------------------------------------

# Grid axis 1 holds the query (or key) blocks: CUDA allows 65535 there, and the smallest block is 16 rows.
MAX_T = 65535 * 16


def _check_device(t, name):
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and _INTERPRET:
        return
    raise ValueError(
        f"{name} is on {t.device}; the Triton kernels need CUDA tensors "
        "(or TRITON_INTERPRET=1 set before triton is imported, to run them slowly on CPU)"
    )


def _check_slice_fits_int32(t, name):
    # The kernels add int64 offsets for batch and head, then int32 ones within a (batch, head) slice.
    span = sum((n - 1) * abs(s) for n, s in zip(t.shape[2:], t.stride()[2:]))
    if span >= 2**31:
        raise ValueError(f"{name}: one (batch, head) slice spans {span} elements, more than the kernels' "
                         f"int32 offsets address (2**31 - 1); make it contiguous or split the sequence")


def _check_inputs(q, k, v, kv_start, sm_scale):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, nh, T, hs), got shape {tuple(t.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"q, k, v must have the same shape (B, nh, T, hs); got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    head_dim = q.shape[-1]
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head dim {head_dim} not supported; valid: {HEAD_DIMS}")
    if q.shape[2] > MAX_T:
        raise ValueError(f"sequence length {q.shape[2]} exceeds {MAX_T} (65535 query blocks of 16 rows)")
    if q.dtype not in DTYPES:
        raise TypeError(f"dtype {q.dtype} not supported; valid: {DTYPES}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype; got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device; got q {q.device}, k {k.device}, v {v.device}")
    _check_device(q, "q")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_slice_fits_int32(t, name)
    if sm_scale is not None and not (isinstance(sm_scale, (int, float)) and math.isfinite(sm_scale)):
        raise ValueError(f"sm_scale must be a finite float or None, got {sm_scale!r}")
    if kv_start is not None:
        if not isinstance(kv_start, torch.Tensor):
            raise TypeError(f"kv_start must be an int32 tensor of shape ({q.shape[0]},), got {type(kv_start).__name__}")
        if kv_start.shape != (q.shape[0],):
            raise ValueError(f"kv_start must have shape (B,) = ({q.shape[0]},), got {tuple(kv_start.shape)}")
        if kv_start.dtype != torch.int32:
            raise TypeError(f"kv_start must be int32, got {kv_start.dtype}")
        if kv_start.device != q.device:
            raise ValueError(f"kv_start is on {kv_start.device} but q is on {q.device}")


def _strides(t):
    return tuple(t.stride())


def _empty_bthd(B, H, T, D, dtype, device):
    """A (B, nh, T, hs) tensor laid out as (B, T, nh, hs) in memory, as SDPA returns when q is a view of
    c_attn's output: the model's head merge `.transpose(1, 2).reshape(B, T, C)` is then a view, not a copy."""
    return torch.empty_strided((B, H, T, D), (T * H * D, D, H * D, 1), dtype=dtype, device=device)


@_ops.register("nanogpt2::flash_attention_fwd")
def _flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_start: Optional[torch.Tensor],
               causal: bool, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel. Returns out (B, nh, T, hs) in q's dtype and lse (B, nh, T) fp32."""
    B, H, T, D = q.shape
    out = _empty_bthd(B, H, T, D, q.dtype, q.device)
    lse = torch.empty((B, H, T), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    kv = kv_start if kv_start is not None else lse  # dummy pointer, never read when HAS_KV_START=False
    args = (q, k, v, out, lse, kv, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            H, T, sm_scale * LOG2E)
    constexprs = dict(HEAD_DIM=D, CAUSAL=causal, HAS_KV_START=kv_start is not None,
                      DOT_PRECISION=_dot_precision(q.dtype))
    with _ops.on_device(q):
        _launch("fwd", _ops.launch(_attn_fwd), _fwd_configs(D, q.dtype),
                lambda bm, bn: (B * H, _ops.cdiv(T, bm)), args, constexprs, q.device)
    return out, lse


@_ops.register("nanogpt2::flash_attention_bwd")
def _flash_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
               lse: torch.Tensor, dlse: Optional[torch.Tensor], kv_start: Optional[torch.Tensor],
               causal: bool, sm_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the backward kernels. dlse, the gradient of lse (None when lse was not used), enters as
    Δ − dlse: ∂lse_i/∂s_ij = P_ij, so it adds dlse_i·P_ij to dS_ij = P_ij·(dP_ij − Δ_i)."""
    B, H, T, D = q.shape
    dq = _empty_bthd(B, H, T, D, q.dtype, q.device)
    dk = _empty_bthd(B, H, T, D, k.dtype, k.device)
    dv = _empty_bthd(B, H, T, D, v.dtype, v.device)
    if q.numel() == 0:
        return dq, dk, dv
    delta = torch.empty_like(lse)
    kv = kv_start if kv_start is not None else lse
    has_kv = kv_start is not None
    prec = _dot_precision(q.dtype)
    with _ops.on_device(q):
        pre_block = 16 if _INTERPRET else 128
        _ops.launch(_attn_bwd_preprocess)[(B * H, _ops.cdiv(T, pre_block))](
            out, do, delta, *_strides(out), *_strides(do), H, T, HEAD_DIM=D, BLOCK_M=pre_block)
        if dlse is not None:
            delta -= dlse  # in place: delta stays (B, nh, T) contiguous, as the kernels index it
        common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
        _launch("bwd_dkdv", _ops.launch(_attn_bwd_dkdv), _bwd_dkdv_configs(D, q.dtype),
                lambda bm, bn: (B * H, _ops.cdiv(T, bn)),
                (q, k, v, do, dk, dv, lse, delta, kv, *common, *_strides(dk), *_strides(dv),
                 H, T, sm_scale, sm_scale * LOG2E),
                dict(HEAD_DIM=D, CAUSAL=causal, HAS_KV_START=has_kv, DOT_PRECISION=prec), q.device)
        _launch("bwd_dq", _ops.launch(_attn_bwd_dq), _bwd_dq_configs(D, q.dtype),
                lambda bm, bn: (B * H, _ops.cdiv(T, bm)),
                (q, k, v, do, dq, lse, delta, kv, *common, *_strides(dq), H, T, sm_scale, sm_scale * LOG2E),
                dict(HEAD_DIM=D, CAUSAL=causal, HAS_KV_START=has_kv, DOT_PRECISION=prec), q.device)
    return dq, dk, dv


# autograd glue: the forward saves (q, k, v, out, lse); the backward recomputes P from lse. Registered on
# the custom op (not an autograd.Function around it) so that AOTAutograd sees one forward op and one
# backward op, and torch.compile traces training steps without a graph break.
def _setup_context(ctx, inputs, output):
    q, k, v, kv_start, causal, sm_scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_start)
    ctx.causal = causal
    ctx.sm_scale = sm_scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, kv_start = ctx.saved_tensors
    if dout is None:  # only lse was used
        dout = torch.zeros_like(out)
    dq, dk, dv = _flash_bwd(dout, q, k, v, out, lse, dlse, kv_start, ctx.causal, ctx.sm_scale)
    return dq, dk, dv, None, None, None


_flash_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(q, k, v, *, causal=True, sm_scale=None, kv_start=None):
    """softmax(q·kᵀ·sm_scale [+ causal mask])·v, fused; differentiable in q, k, v.

    q, k, v: (B, nh, T, hs), any strides, one dtype out of fp32/fp16/bf16, hs in {16, 32, 64, 128}.
    sm_scale: defaults to 1/sqrt(hs).
    kv_start: optional int32 (B,) for left-padded batches: in row b, keys at positions < kv_start[b]
        are masked out, and query rows at those positions output zeros (and get zero gradients).
    Returns (B, nh, T, hs) in q's dtype, stored as (B, T, nh, hs) (a transposed view, as SDPA does).
    A custom op (torch.ops.nanogpt2.flash_attention_fwd): torch.compile traces it as one node.
    """
    return flash_attention_with_lse(q, k, v, causal=causal, sm_scale=sm_scale, kv_start=kv_start)[0]


def flash_attention_with_lse(q, k, v, *, causal=True, sm_scale=None, kv_start=None):
    """flash_attention that also returns lse (B, nh, T) fp32: the natural-log log-sum-exp of each query
    row's scaled scores (+inf for rows with no valid key). Both outputs are differentiable. Feed lse to
    attention_probs_from_lse to get the attention probabilities without a second softmax pass."""
    _check_inputs(q, k, v, kv_start, sm_scale)
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    return _flash_fwd(q, k, v, kv_start, bool(causal), sm_scale)


def attention_probs_from_lse(q, k, lse, *, causal=True, sm_scale=None, kv_start=None):
    """Attention probabilities (B, nh, T, T) = exp(q·kᵀ·sm_scale − lse), masked; pure PyTorch.

    Materialises the full (T, T) matrix per head, so use it for attention maps (output_attentions),
    not in a training loop. Rows of padding queries (and masked keys) come out as exact zeros.
    Returned in q's dtype; computed in fp32.
    """
    if lse.shape != q.shape[:-1]:
        raise ValueError(f"lse must have shape (B, nh, T) = {tuple(q.shape[:-1])}, got {tuple(lse.shape)}")
    if k.shape != q.shape:
        raise ValueError(f"q and k must have the same shape, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    T = q.shape[-2]
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * sm_scale  # (B, nh, T, T)
    keep = torch.ones(T, T, dtype=torch.bool, device=q.device)
    if causal:
        keep = torch.tril(keep)
    keep = keep.expand(q.shape[0], 1, T, T)
    if kv_start is not None:
        pos = torch.arange(T, device=q.device)
        real = pos[None, :] >= kv_start.to(q.device).long()[:, None]  # (B, T)
        keep = keep & real[:, None, None, :] & real[:, None, :, None]
    probs = torch.exp(scores - lse.float()[..., None])
    return torch.where(keep, probs, torch.zeros((), device=q.device)).to(q.dtype)
