"""Weight-only quantized matmul in Triton: y = x·Wᵀ (+ bias) with W stored as int8 or int4, dequantized in registers.

Two formats (nn.Linear layout: N = out features, K = in features), as nanogpt2.quantize stores them:
    int8  weight int8 (N, K), scales (N,):             W[n, k] = weight[n, k] · scales[n]   (symmetric, |q| ≤ 127)
    int4  qweight uint8 (N, K/2), scales and zeros (N, K/G), G = group_size in {32, 64, 128}:
          W[n, k] = (q[n, k] − 8) · scales[n, k // G] + zeros[n, k // G],   q in [0, 15],
          q[n, 2j] in the low nibble (bits 0-3) of qweight[n, j], q[n, 2j+1] in the high nibble
          (gpt-fast's and torch's _weight_int4pack_mm convention, before its tile packing).
x is (..., K) in fp32/fp16/bf16; y comes back in x's dtype; products are accumulated in fp32.

Decoding reads every weight once per token, and the weight bytes are the whole cost: int8 halves bf16's,
int4 quarters it (the point of quantizing, ARCHITECTURE.md's performance model). So the float weights never
exist in memory: each program loads integer tiles and turns them into floats in registers. Two shapes of
kernel, picked by the number of rows M (tokens) of x:
    GEMV  (M ≤ GEMV_MAX_M: decoding)  one program per (row, BLOCK_N output features); it streams its rows of W
          with wide loads and sums products on the CUDA cores. tl.dot needs 16 rows, and padding 1 row to 16
          buys nothing for a kernel bound by memory; what a GEMV needs is many programs in flight (small
          BLOCK_N: GPT-2's 768 output features are only 48 programs at BLOCK_N = 16) and cheap
          integer-to-float conversion (below).
    GEMM  (M > GEMV_MAX_M: prefill)  Triton's tiled matmul (tutorial 03-matrix-multiplication: grouped tile
          order, fp32 accumulator, tensor cores through tl.dot), with each (BLOCK_K, BLOCK_N) weight tile
          dequantized to x's dtype in registers before the dot. Dequantizing costs BLOCK_K·BLOCK_N
          operations per tile, shared by BLOCK_M rows.
GEMV_MAX_M = 4: the GEMV rereads W for each row (from L2 after the first) and converts it each time, while the
GEMM converts it once per 16-128 rows but runs only N/BLOCK_N programs at small M. Where they cross is for
the GPU to say: `benchmarks/quant_matmul.py` times both over M = 1…32 (its "crossover" section); until a GPU
run has measured it, 4 is a guess that keeps batch-1 and beam-4 decoding on the GEMV.

Tricks, and where they come from:
- Integer-to-float without I2F. Converting int → fp32 is a 16-per-clock instruction on recent NVIDIA GPUs,
  an eighth of the fp32 add rate. A GEMV converts every weight once per row, so for int4 it could cost more
  than reading the bytes; an sm_90 compile of the int4 GEMM with plain conversions issued 64 I2F per thread
  per K-step, which by those rates is longer than the tile's tensor-core work. Instead, write the integer
  into the mantissa of a float whose exponent makes one mantissa step equal 1, and subtract that float:
  2^23 + n for n in [0, 2^23) has the bits 0x4B000000 | n (FasterTransformer's and Marlin's "magic number"
  dequantization, here in fp32). Triton's own int8 → fp16/bf16 conversion already avoids I2F, so the int8
  GEMM uses it.
- int4's scales and zeros act after the sums (GEMV): over a group, Σ_k ((q−8)·s + z)·x_k =
  s·Σ_k (q−8)·x_k + z·Σ_k x_k, so the GEMV multiplies by s and z once per (row, group), not once per weight.
- int4's two nibbles of a byte are neighbours in k (2j, 2j+1). The GEMV multiplies the low and the high
  nibbles by x's even and odd columns; the GEMM dequantizes both and interleaves them back into k order
  (tl.interleave), so that x is one contiguous tile, which Triton's pipeliner copies asynchronously.

Under TRITON_INTERPRET=1 (the CPU tests) tl.dot on bf16 operands is wrong (ARCHITECTURE.md), so there the GEMM
casts bf16 tiles to fp32 before the dot (DOT_F32); everything else is the same code. On a GPU bf16 goes to
the tensor cores as bf16.

Public entry points (custom ops torch.ops.nanogpt2.int8_linear / int4_linear, see _ops.py, so torch.compile
and CUDA graphs see one node; differentiable in x and bias, for adapters trained on a frozen base):
    int8_linear(x, weight, scales, bias=None, *, kernel=None)
    int4_linear(x, qweight, scales, zeros, group_size, bias=None, *, kernel=None)
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _ops

_INTERPRET = _ops.INTERPRET
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GROUP_SIZES = (32, 64, 128)
GEMV_MAX_M = 4   # rows of x up to which the GEMV runs (see the module docstring); `kernel=` overrides it
KERNELS = ("gemv", "gemm")


# ----------------------------------------------------------------------------------------------
# Integer -> float in registers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _int8_to_f32(q):
    """int8 -> fp32, exactly, with an integer add and a float subtract instead of a conversion instruction:
    1.5·2^23 has the bits 0x4B400000 and a mantissa step of 1, so adding q (|q| < 2^22) to its bits gives
    the float 1.5·2^23 + q."""
    return (q.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def _nibble_to_f32_minus_8(n):
    """An int32 holding a nibble n in [0, 15] -> the fp32 n − 8 (int4's zero point), exactly: 2^23 + n has
    the bits 0x4B000000 | n."""
    return (n | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0  # 2^23 + 8


# ----------------------------------------------------------------------------------------------
# GEMV: decoding (few rows)
# ----------------------------------------------------------------------------------------------


# M (the number of rows) changes from call to call; exempt from Triton's specialisation on ints equal
# to 1 or divisible by 16, it compiles once. N and K stay specialised: they are fixed per layer, and
# knowing K % 16 == 0 lets Triton prove that rows start aligned for wide loads.
@triton.jit(do_not_specialize=["M"])
def _int8_gemv_kernel(X, W, S, BIAS, Out, M, N, K, stride_xm, stride_xk, stride_om,
                      HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      EVEN_K: tl.constexpr):
    # grid = (cdiv(N, BLOCK_N)·M,): program -> (row m, output features [n0, n0 + BLOCK_N)). The rows of one
    # block of W are neighbours in launch order, so the second row's reads of W hit L2.
    pid = tl.program_id(0)
    m = pid % M
    pid_n = pid // M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N  # rows past N reread valid ones (no mask on the hot loads); the store drops them
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = W + rn[:, None].to(tl.int64) * K + offs_k[None, :]          # (BLOCK_N, BLOCK_K) int8
    x_ptrs = X + m.to(tl.int64) * stride_xm + offs_k * stride_xk          # (BLOCK_K,)
    # accumulate products elementwise and reduce over k once, after the loop
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs)
            x = tl.load(x_ptrs)
        else:
            k_in = offs_k < K - k0
            w = tl.load(w_ptrs, mask=k_in[None, :], other=0)
            x = tl.load(x_ptrs, mask=k_in, other=0.0)
        acc += _int8_to_f32(w) * x.to(tl.float32)[None, :]
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K * stride_xk
    # the scale is per output feature: one multiply per output, after the sum
    y = tl.sum(acc, axis=1) * tl.load(S + rn).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(BIAS + rn).to(tl.float32)
    tl.store(Out + m.to(tl.int64) * stride_om + offs_n, y.to(Out.dtype.element_ty), mask=offs_n < N)


@triton.jit(do_not_specialize=["M"])
def _int4_gemv_kernel(X, QW, S, Z, BIAS, Out, M, N, K, stride_xm, stride_xk, stride_om,
                      GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                      GROUPS: tl.constexpr, EVEN_GROUPS: tl.constexpr):
    # grid as the int8 GEMV's. Each K-step covers GROUPS whole quantization groups, held as a 3-D tile
    # (BLOCK_N, GROUPS, GROUP_SIZE/2) of bytes: one group per row of the middle axis, so that the sums
    # over a group are a reduction over the last axis and the scales a (BLOCK_N, GROUPS) tile.
    HALF: tl.constexpr = GROUP_SIZE // 2  # bytes per group
    pid = tl.program_id(0)
    m = pid % M
    pid_n = pid // M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n % N
    n_groups = K // GROUP_SIZE
    offs_g = tl.arange(0, GROUPS)
    byte = offs_g[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (GROUPS, HALF): bytes of this K-step
    q_ptrs = QW + rn[:, None, None].to(tl.int64) * (K // 2) + byte[None, :, :]  # (BLOCK_N, GROUPS, HALF)
    x_ptrs = X + m.to(tl.int64) * stride_xm + (2 * byte) * stride_xk  # x at k = 2j (even); +stride_xk: odd
    s_ptrs = S + rn[:, None].to(tl.int64) * n_groups + offs_g[None, :]  # (BLOCK_N, GROUPS)
    z_ptrs = Z + rn[:, None].to(tl.int64) * n_groups + offs_g[None, :]
    acc = tl.zeros([BLOCK_N, GROUPS], dtype=tl.float32)
    for g0 in range(0, n_groups, GROUPS):
        if EVEN_GROUPS:
            q = tl.load(q_ptrs)
            x_even = tl.load(x_ptrs)
            x_odd = tl.load(x_ptrs + stride_xk)
            s = tl.load(s_ptrs)
            z = tl.load(z_ptrs)
        else:  # the last step is short of groups: masked lanes load q = 0, x = 0, s = z = 0
            g_in = offs_g < n_groups - g0
            q = tl.load(q_ptrs, mask=g_in[None, :, None], other=0)
            x_even = tl.load(x_ptrs, mask=g_in[:, None], other=0.0)
            x_odd = tl.load(x_ptrs + stride_xk, mask=g_in[:, None], other=0.0)
            s = tl.load(s_ptrs, mask=g_in[None, :], other=0.0)
            z = tl.load(z_ptrs, mask=g_in[None, :], other=0.0)
        q = q.to(tl.int32)
        x_even = x_even.to(tl.float32)
        x_odd = x_odd.to(tl.float32)
        lo = _nibble_to_f32_minus_8(q & 0xF)   # weights at k = 2j, less the zero point 8
        hi = _nibble_to_f32_minus_8(q >> 4)    # k = 2j + 1
        dot_q = tl.sum(lo * x_even[None, :, :] + hi * x_odd[None, :, :], axis=2)  # Σ (q − 8)·x per group
        sum_x = tl.sum(x_even + x_odd, axis=1)                                     # Σ x per group
        acc += s.to(tl.float32) * dot_q + z.to(tl.float32) * sum_x[None, :]
        q_ptrs += GROUPS * HALF
        x_ptrs += GROUPS * GROUP_SIZE * stride_xk
        s_ptrs += GROUPS
        z_ptrs += GROUPS
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(BIAS + rn).to(tl.float32)
    tl.store(Out + m.to(tl.int64) * stride_om + offs_n, y.to(Out.dtype.element_ty), mask=offs_n < N)


# ----------------------------------------------------------------------------------------------
# GEMM: prefill (many rows)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (tile row, tile column), GROUP_M tile rows at a time (tutorial 03's "grouped ordering"):
    programs running together share columns of W, so a weight tile is read from DRAM once per group of
    GROUP_M·BLOCK_M rows rather than once per BLOCK_M. All on grid axis 0 (2^31 − 1 programs)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _store_tile(Out, acc, scale, BIAS, offs_m, offs_n, rn, M, N, stride_om, HAS_BIAS: tl.constexpr):
    """y = acc·scale (+ bias) in Out's dtype, rows < M and columns < N only."""
    y = acc * scale
    if HAS_BIAS:
        y += tl.load(BIAS + rn).to(tl.float32)[None, :]
    out_ptrs = Out + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, y.to(Out.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit(do_not_specialize=["M"])
def _int8_gemm_kernel(X, W, S, BIAS, Out, M, N, K, stride_xm, stride_xk, stride_om,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
                      DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M  # reads past the edges reread valid rows/columns; the store masks them
    rn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rm[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk   # (BLOCK_M, BLOCK_K)
    w_ptrs = W + rn[None, :].to(tl.int64) * K + offs_k[:, None]                       # (BLOCK_K, BLOCK_N) of Wᵀ
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_in = offs_k < K - k0
            x = tl.load(x_ptrs, mask=k_in[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_in[:, None], other=0)
        # |q| ≤ 127 is exact in fp16 and bf16: the weights enter the dot unrounded, the scale comes after
        if DOT_F32:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K
    scale = tl.load(S + rn).to(tl.float32)[None, :]
    _store_tile(Out, acc, scale, BIAS, offs_m, offs_n, rn, M, N, stride_om, HAS_BIAS)


@triton.jit(do_not_specialize=["M"])
def _int4_gemm_kernel(X, QW, S, Z, BIAS, Out, M, N, K, stride_xm, stride_xk, stride_om,
                      GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                      DOT_F32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    # BLOCK_K divides GROUP_SIZE (the launcher sees to it), so a K-step lies inside one quantization group:
    # one scale and one zero per output feature, and no masks on K (K is a multiple of GROUP_SIZE).
    HALF_K: tl.constexpr = BLOCK_K // 2
    pid_m, pid_n = _tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m % M
    rn = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    offs_j = tl.arange(0, HALF_K)  # bytes of this K-step: byte j holds k = 2j (low nibble) and 2j + 1 (high)
    x_ptrs = X + rm[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk   # (BLOCK_M, BLOCK_K)
    q_ptrs = QW + rn[:, None].to(tl.int64) * (K // 2) + offs_j[None, :]                # (BLOCK_N, HALF_K)
    n_groups = K // GROUP_SIZE
    s_ptrs = S + rn.to(tl.int64) * n_groups  # (BLOCK_N,): scale of group 0; group g at + g
    z_ptrs = Z + rn.to(tl.int64) * n_groups
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        g = k0 // GROUP_SIZE
        s = tl.load(s_ptrs + g).to(tl.float32)[:, None]
        z = tl.load(z_ptrs + g).to(tl.float32)[:, None]
        x = tl.load(x_ptrs)
        q = tl.load(q_ptrs).to(tl.int32)
        # dequantize in registers: the weights at k = 2j and 2j + 1, each (BLOCK_N, HALF_K), put back in
        # k order, (BLOCK_N, BLOCK_K); the tile is written to shared memory for the dot either way
        w_even = _nibble_to_f32_minus_8(q & 0xF) * s + z
        w_odd = _nibble_to_f32_minus_8(q >> 4) * s + z
        w = tl.interleave(w_even, w_odd)
        if DOT_F32:
            acc = tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
        x_ptrs += BLOCK_K * stride_xk
        q_ptrs += HALF_K
    _store_tile(Out, acc, 1.0, BIAS, offs_m, offs_n, rn, M, N, stride_om, HAS_BIAS)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------
# Hand-picked, as for the attention kernels: @triton.autotune with several configs breaks the CPU
# interpreter, benchmarks every new shape for seconds, and would run those benchmarks inside a CUDA graph
# capture or a torch.compile trace. Each GEMM list runs from the tile expected to be fastest down to small
# ones, taken when a GPU lacks the shared memory for the first (_ops.launch_first_fit). All are first
# guesses until `benchmarks/quant_matmul.py` has run on a GPU.

# GEMM tiles for fp16/bf16, (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), largest first; the
# launcher takes the largest whose grid still gives every SM a tile (tutorial 03's configs for the big ones)
_GEMM_TILES = [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (64, 64, 64, 4, 3), (32, 64, 64, 4, 3),
               (16, 64, 64, 4, 3), (16, 32, 64, 4, 2)]
# fp32 inputs with TF32 tensor cores (torch.set_float32_matmul_precision("high")), and with IEEE fp32 products
# (torch's default, "highest"), whose FMA dots hold whole tiles in registers: a 64×64×32 tile spilled 300+ bytes
# a thread in an sm_90 compile, 32×32×32 none
_GEMM_TILES_TF32 = [(64, 64, 32, 4, 2), (32, 64, 32, 4, 2), (16, 32, 32, 4, 1)]
_GEMM_TILES_IEEE = [(32, 32, 32, 4, 2), (16, 32, 32, 4, 1)]


def _gemm_configs(M, N, dtype, group_size, device):
    if _INTERPRET:  # small tiles: several tiles and K-steps on the tests' small shapes
        return [dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)]
    tiles = _GEMM_TILES
    if dtype == torch.float32:
        tiles = _GEMM_TILES_IEEE if _ops.dot_precision(dtype) == "ieee" else _GEMM_TILES_TF32
    rows = max(16, _ops.next_power_of_2(M))
    fitting = [t for t in tiles if t[0] <= rows] or tiles[-1:]  # no taller tile than there are rows
    enough = [t for t in fitting if _ops.cdiv(M, t[0]) * _ops.cdiv(N, t[1]) >= _ops.num_sms(device)]
    start = fitting.index(enough[0]) if enough else len(fitting) - 1
    configs = []
    for block_m, block_n, block_k, warps, stages in fitting[start:]:
        if group_size:  # int4: a K-step must stay inside one quantization group
            block_k = min(block_k, group_size)
        configs.append(dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
                            num_warps=warps, num_stages=stages))
    return configs


def _gemv_config(N, K, group_size, device):
    """BLOCK_N: the largest of 16, 8, 4 output features per program that still launches two programs per
    SM (768 output features on 132 SMs: BLOCK_N = 4, 192 programs). The K-step: up to 512 weights (int8:
    512 bytes a row, 16-byte loads for 4 warps at BLOCK_N = 4; int4: 256 bytes, whole groups), preferring a
    step that divides K when one at least half as long exists (K = 768: three steps of 256 rather than a
    full one and a half-masked one)."""
    unit = group_size or 1           # a K-step holds whole int4 groups
    units = K // unit                # weights (int8) or groups (int4) per row
    if _INTERPRET:                   # several K-steps and a ragged last one on the tests' small shapes
        block_n, step = 4, (2 if group_size else 32)
    else:
        block_n = next((b for b in (16, 8) if _ops.cdiv(N, b) >= 2 * _ops.num_sms(device)), 4)
        most = 512 // unit
        dividing = next(p for p in (most >> i for i in range(most.bit_length())) if p == 1 or units % p == 0)
        step = dividing if 2 * dividing >= most else min(most, _ops.next_power_of_2(max(units, 1)))
    if group_size is None:
        return dict(BLOCK_N=block_n, BLOCK_K=step, EVEN_K=K % step == 0, num_warps=4)
    return dict(BLOCK_N=block_n, GROUPS=step, EVEN_GROUPS=units % step == 0, num_warps=4)


def _pick_kernel(M, kernel):
    if kernel is None:
        return "gemv" if M <= GEMV_MAX_M else "gemm"
    return kernel


# ----------------------------------------------------------------------------------------------
# Python side: validation, launchers (as custom ops), autograd
# ----------------------------------------------------------------------------------------------


def _runs_on(device):
    """Whether the kernels can run on `device`: CUDA, or the CPU under Triton's interpreter."""
    return device.type == "cuda" or (device.type == "cpu" and _INTERPRET)


def _check_tensor(name, t, dtypes, shape=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        valid = ", ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} has dtype {t.dtype}; valid: {valid}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_inputs(x, named, bias, K, N, kernel):
    """Checks shared by both formats. `named`: the weight-side tensors (name, tensor), already checked for
    dtype and shape, which must be contiguous and on x's device."""
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"kernel must be None (pick by rows), 'gemv' or 'gemm'; got {kernel!r}")
    if bias is not None:
        _check_tensor("bias", bias, DTYPES, (N,))
        named = named + [("bias", bias)]
    for name, t in named:
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()}); "
                             f"call .contiguous() once when the weights are made")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if not _runs_on(x.device):
        raise ValueError(f"x is on {x.device}; the Triton kernels need CUDA tensors "
                         "(or TRITON_INTERPRET=1 set before triton is imported, to run them slowly on CPU)")


def _check_x(x, K, what):
    _check_tensor("x", x, DTYPES)
    if x.dim() == 0 or x.shape[-1] != K:
        got = "a 0-d tensor" if x.dim() == 0 else f"last dim {x.shape[-1]}"
        raise ValueError(f"x must be (..., K) with K = {K} in-features ({what}); got {got}")


def _check_int8(x, weight, scales, bias, kernel):
    _check_tensor("weight", weight, (torch.int8,))
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (N out-features, K in-features), got shape {tuple(weight.shape)}")
    N, K = weight.shape
    _check_x(x, K, f"weight is {N}×{K}")
    _check_tensor("scales", scales, DTYPES, (N,))
    _check_inputs(x, [("weight", weight), ("scales", scales)], bias, K, N, kernel)


def _check_int4(x, qweight, scales, zeros, group_size, bias, kernel):
    _check_tensor("qweight", qweight, (torch.uint8,))
    if qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D (N out-features, K/2 bytes), got shape {tuple(qweight.shape)}")
    N, K = qweight.shape[0], 2 * qweight.shape[1]
    _check_tensor("x", x, DTYPES)
    if x.dim() > 0 and x.shape[-1] % 2:
        raise ValueError(f"int4 packs two weights a byte, so K (x's last dim) must be even; got {x.shape[-1]}")
    _check_x(x, K, f"qweight is {N}×{K // 2} bytes")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    if K % group_size:
        raise ValueError(f"group_size {group_size} does not divide K = {K} in-features "
                         f"(valid here: {[g for g in GROUP_SIZES if K % g == 0] or 'none'})")
    _check_tensor("scales", scales, DTYPES, (N, K // group_size))
    _check_tensor("zeros", zeros, DTYPES, (N, K // group_size))
    _check_inputs(x, [("qweight", qweight), ("scales", scales), ("zeros", zeros)], bias, K, N, kernel)


def _launch(x, fmt, w, scales, zeros, bias, group_size, kernel):
    """Run one of the four kernels on x viewed as (M, K); returns (..., N) in x's dtype."""
    N = w.shape[0]
    K = x.shape[-1]
    M = x.numel() // K if K else 0
    out = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if K == 0:  # no in-features: y = bias, or 0
        return out.copy_(bias.expand_as(out)) if bias is not None else out.zero_()
    x2 = x.reshape(M, K)  # a view unless x's strides cannot be flattened (then a copy)
    bias_arg = bias if bias is not None else scales  # a dummy pointer, never read when HAS_BIAS=False
    common = (M, N, K, x2.stride(0), x2.stride(1), N)
    with _ops.on_device(x):
        if _pick_kernel(M, kernel) == "gemv":
            cfg = _gemv_config(N, K, group_size, x.device)
            grid = (_ops.cdiv(N, cfg["BLOCK_N"]) * M,)
            if fmt == "int8":
                _ops.launch(_int8_gemv_kernel)[grid](x2, w, scales, bias_arg, out, *common,
                                                     HAS_BIAS=bias is not None, **cfg)
            else:
                _ops.launch(_int4_gemv_kernel)[grid](x2, w, scales, zeros, bias_arg, out, *common,
                                                     GROUP_SIZE=group_size, HAS_BIAS=bias is not None, **cfg)
            return out
        configs = _gemm_configs(M, N, x.dtype, group_size, x.device)
        constexprs = dict(HAS_BIAS=bias is not None, DOT_PRECISION=_ops.dot_precision(x.dtype),
                          DOT_F32=x.dtype == torch.float32 or (_INTERPRET and x.dtype == torch.bfloat16))
        if fmt == "int8":
            kernel_fn, args = _int8_gemm_kernel, (x2, w, scales, bias_arg, out, *common)
            configs = [dict(c, EVEN_K=K % c["BLOCK_K"] == 0) for c in configs]
        else:
            kernel_fn, args = _int4_gemm_kernel, (x2, w, scales, zeros, bias_arg, out, *common)
            constexprs["GROUP_SIZE"] = group_size
        key = (f"{fmt}_gemm", x.dtype, tuple(configs[0].items()), x.device)
        _ops.launch_first_fit(key, _ops.launch(kernel_fn), configs,
                              lambda c: (_ops.cdiv(M, c["BLOCK_M"]) * _ops.cdiv(N, c["BLOCK_N"]),),
                              args, constexprs)
    return out


@_ops.register("nanogpt2::int8_linear")
def _int8_linear(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor],
                 kernel: Optional[str]) -> torch.Tensor:
    """The launcher, as a custom op (see _ops.py)."""
    return _launch(x, "int8", weight, scales, None, bias, None, kernel)


@_ops.register("nanogpt2::int4_linear")
def _int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, bias: Optional[torch.Tensor], kernel: Optional[str]) -> torch.Tensor:
    """The launcher, as a custom op (see _ops.py)."""
    return _launch(x, "int4", qweight, scales, zeros, bias, group_size, kernel)


# autograd: gradients for x and bias only (the integer weights, scales and zeros are frozen), so that
# adapters on a quantized base (QLoRA's setting) can train. dx = dy·W needs W in x's dtype: the backward
# dequantizes one layer's weight for the length of one matmul, as QLoRA's backward does
# (Dettmers et al., 2023, §3); the forward never does.


def dequantize_int8(weight, scales, dtype):
    """The (N, K) float weight of the int8 format, in `dtype` (plain PyTorch)."""
    return weight.to(dtype) * scales.to(dtype)[:, None]


def dequantize_int4(qweight, scales, zeros, group_size, dtype):
    """The (N, K) float weight of the int4 format, in `dtype` (plain PyTorch; computed in fp32)."""
    N = qweight.shape[0]
    q = torch.stack((qweight & 0xF, qweight >> 4), dim=-1).reshape(N, -1).float()  # k = 2j, 2j + 1
    s = scales.float().repeat_interleave(group_size, dim=1)
    z = zeros.float().repeat_interleave(group_size, dim=1)
    return ((q - 8) * s + z).to(dtype)


def _bias_grad(dy, needed):
    return dy.reshape(-1, dy.shape[-1]).sum(0) if needed else None


def _setup_int8(ctx, inputs, output):
    x, weight, scales, bias, kernel = inputs
    ctx.save_for_backward(weight, scales)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward_int8(ctx, dy):
    weight, scales = ctx.saved_tensors
    dx = dy @ dequantize_int8(weight, scales, dy.dtype) if ctx.needs_input_grad[0] else None
    db = _bias_grad(dy, ctx.needs_input_grad[3])
    return dx, None, None, None if db is None else db.to(ctx.bias_dtype), None


def _setup_int4(ctx, inputs, output):
    x, qweight, scales, zeros, group_size, bias, kernel = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.group_size = group_size
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward_int4(ctx, dy):
    qweight, scales, zeros = ctx.saved_tensors
    dx = None
    if ctx.needs_input_grad[0]:
        dx = dy @ dequantize_int4(qweight, scales, zeros, ctx.group_size, dy.dtype)
    db = _bias_grad(dy, ctx.needs_input_grad[5])
    return dx, None, None, None, None, None if db is None else db.to(ctx.bias_dtype), None


_int8_linear.register_autograd(_backward_int8, setup_context=_setup_int8)
_int4_linear.register_autograd(_backward_int4, setup_context=_setup_int4)


def int8_linear(x, weight, scales, bias=None, *, kernel=None):
    """y = (x·weightᵀ)·scales (+ bias): F.linear with an int8 weight and one scale per output feature.

    x: (..., K), fp32/fp16/bf16, any strides. weight: int8 (N, K), contiguous. scales: (N,) fp32/fp16/bf16.
    bias: optional (N,). Returns (..., N) in x's dtype (accumulated in fp32, rounded once).
    kernel: None picks the GEMV for at most GEMV_MAX_M rows of x and the GEMM above; "gemv" or "gemm"
        forces one (tests, benchmarks).
    A custom op (torch.ops.nanogpt2.int8_linear); differentiable in x and bias.
    """
    _check_int8(x, weight, scales, bias, kernel)
    return _int8_linear(x, weight, scales, bias, kernel)


def int4_linear(x, qweight, scales, zeros, group_size, bias=None, *, kernel=None):
    """y = x·Wᵀ (+ bias) with W[n, k] = (q[n, k] − 8)·scales[n, k // G] + zeros[n, k // G], G = group_size.

    x: (..., K), fp32/fp16/bf16, any strides, K even and a multiple of group_size (32, 64 or 128).
    qweight: uint8 (N, K/2), contiguous: q[n, 2j] in the low nibble of qweight[n, j], q[n, 2j+1] in the high.
    scales, zeros: (N, K/G) fp32/fp16/bf16, contiguous. bias: optional (N,).
    Returns (..., N) in x's dtype (accumulated in fp32). kernel: as for int8_linear.
    A custom op (torch.ops.nanogpt2.int4_linear); differentiable in x and bias.
    """
    _check_int4(x, qweight, scales, zeros, group_size, bias, kernel)
    return _int4_linear(x, qweight, scales, zeros, group_size, bias, kernel)
