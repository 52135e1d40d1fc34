"""nanogpt2.kernels.decode_attention: one query per row against a KV cache, vs an fp64 reference.

Kernel cases run in a worker process (an out-of-bounds access under TRITON_INTERPRET kills the
process; see test_flash_attention.py). GPU-only cases (bf16, CUDA-graph replay) skip elsewhere.
"""

import math
import os

import pytest
import torch

from helpers_kernels import kernel_process  # noqa: F401  (the fixture)
from nanogpt2.kernels import decode_attention, flash_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # atol = rtol


def reference_decode(q, k_cache, v_cache, cache_seqlens, kv_start=None, sm_scale=None):
    """softmax over cache positions [kv_start, cache_seqlens) in fp64; empty rows give zeros."""
    B, H, S, D = k_cache.shape
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    pos = torch.arange(S, device=q.device)
    keep = pos[None, :] < cache_seqlens.long()[:, None]  # (B, S)
    if kv_start is not None:
        keep = keep & (pos[None, :] >= kv_start.long()[:, None])
    scores = torch.einsum("bhd,bhsd->bhs", q.double(), k_cache.double()) * sm_scale
    keep = keep[:, None, :]
    scores = scores.masked_fill(~(keep | ~keep.any(-1, keepdim=True)), float("-inf"))
    probs = torch.softmax(scores, dim=-1) * keep
    return torch.einsum("bhs,bhsd->bhd", probs, v_cache.double())


def make_cache(B, H, S_max, D, dtype, seed=0):
    """q (B, nh, hs) and k, v caches (B, nh, S_max, hs) as strided views of one (B, S_max, 2, nh, hs)
    buffer, so the kernel has to honour every stride."""
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(B, S_max, 2, H, D, generator=g).to(dtype).to(DEVICE)
    q = torch.randn(B, 2, H, D, generator=g).to(dtype).to(DEVICE)[:, 1]
    return q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)


def _case_matches_reference(S_max, dtype, split_counts):
    B, H, D = 4, 2, 32
    q, k_cache, v_cache = make_cache(B, H, S_max, D, dtype, seed=S_max)
    # full cache, half full, a single position, and a left-padded row whose valid range is one position
    seqlens = torch.tensor([S_max, max(S_max // 2, 1), 1, S_max], dtype=torch.int32, device=DEVICE)
    kv_start = torch.tensor([0, S_max // 4, 0, S_max - 1], dtype=torch.int32, device=DEVICE)
    # (num_splits, kv_start): the default split count without padding, then each split count with it
    runs = [(None, None)] + [(num_splits, kv_start) for num_splits in split_counts]
    for num_splits, ks in runs:
        out = decode_attention(q, k_cache, v_cache, seqlens, kv_start=ks, num_splits=num_splits)
        assert out.shape == (B, H, D) and out.dtype == dtype
        ref = reference_decode(q, k_cache, v_cache, seqlens, ks)
        tol = TOLERANCES[dtype]
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol,
                                   msg=lambda m: f"num_splits={num_splits} kv_start={ks}: {m}")


def _case_empty_rows_are_zero():
    q, k_cache, v_cache = make_cache(3, 2, 40, 16, torch.float32)
    seqlens = torch.tensor([0, 40, 10], dtype=torch.int32, device=DEVICE)
    kv_start = torch.tensor([0, 40, 25], dtype=torch.int32, device=DEVICE)  # rows 1, 2: start >= end
    for num_splits in (1, 3):
        out = decode_attention(q, k_cache, v_cache, seqlens, kv_start=kv_start, num_splits=num_splits)
        assert not out.isnan().any()
        assert (out == 0).all()


def _case_matches_prefill_last_row():
    # The model's contract: decoding token t against the cache equals row t of full causal attention.
    torch.manual_seed(0)
    B, H, T, D, S_max = 2, 2, 37, 64, 64
    q, k, v = torch.randn(3, B, H, T, D, device=DEVICE).unbind(0)
    kv_start = torch.tensor([0, 6], dtype=torch.int32, device=DEVICE)
    full = flash_attention(q, k, v, causal=True, kv_start=kv_start)
    k_cache = torch.zeros(B, H, S_max, D, device=DEVICE)
    v_cache = torch.zeros(B, H, S_max, D, device=DEVICE)
    k_cache[:, :, :T], v_cache[:, :, :T] = k, v
    seqlens = torch.full((B,), T, dtype=torch.int32, device=DEVICE)
    out = decode_attention(q[:, :, -1], k_cache, v_cache, seqlens, kv_start=kv_start)
    torch.testing.assert_close(out, full[:, :, -1], atol=1e-5, rtol=1e-5)


def _case_custom_scale_and_head_dim_128():
    q, k_cache, v_cache = make_cache(2, 1, 50, 128, torch.float32)
    seqlens = torch.tensor([50, 21], dtype=torch.int32, device=DEVICE)
    out = decode_attention(q, k_cache, v_cache, seqlens, sm_scale=0.05, num_splits=2)
    ref = reference_decode(q, k_cache, v_cache, seqlens, sm_scale=0.05)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def _case_cuda_graph_replay():
    # fixed shapes + lengths read on device: one captured graph serves every decode step
    B, H, S_max, D = 2, 12, 256, 64
    q, k_cache, v_cache = make_cache(B, H, S_max, D, torch.float16)
    seqlens = torch.tensor([5, 9], dtype=torch.int32, device=DEVICE)
    decode_attention(q, k_cache, v_cache, seqlens)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k_cache, v_cache, seqlens)
    for lengths in ([5, 9], [200, 17], [256, 1]):
        seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        graph.replay()
        torch.testing.assert_close(out.double(), reference_decode(q, k_cache, v_cache, seqlens), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("S_max", [1, 17, 128, 300])
def test_fp32_matches_reference(kernel_process, S_max):
    kernel_process.run(_case_matches_reference, S_max, torch.float32, (1, 2, 4, 7, None))


def test_fp16_matches_reference(kernel_process):
    kernel_process.run(_case_matches_reference, 100, torch.float16, (3, None))


def test_empty_rows_are_zero_not_nan(kernel_process):
    kernel_process.run(_case_empty_rows_are_zero)


def test_matches_prefill_last_row(kernel_process):
    kernel_process.run(_case_matches_prefill_last_row)


def test_custom_scale_and_head_dim_128(kernel_process):
    kernel_process.run(_case_custom_scale_and_head_dim_128)


@pytest.mark.skipif(not ON_GPU, reason="bf16 needs a GPU (the CPU interpreter's bf16 math is unreliable)")
def test_bf16_matches_reference_gpu(kernel_process):
    kernel_process.run(_case_matches_reference, 1024, torch.bfloat16, (1, 8, None))


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_gpu(kernel_process):
    kernel_process.run(_case_cuda_graph_replay)


# -- input validation (raises before any launch, so in-process) ------------------------------------


def _inputs(B=2, H=3, S=16, D=32, dtype=torch.float32):
    q, k, v = make_cache(B, H, S, D, dtype)
    return q, k, v, torch.full((B,), S, dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("change,match", [
    (lambda q, k, v, n: (q[:, :, None], k, v, n), r"q must be 3-D \(B, nh, hs\)"),
    (lambda q, k, v, n: (q, k[:, :2], v, n), r"k_cache must have shape \(B, nh, S_max, hs\) = \(2, 3, S_max, 32\)"),
    (lambda q, k, v, n: (q, k, v[:, :, :8], n), r"k_cache \(2, 3, 16, 32\) and v_cache \(2, 3, 8, 32\)"),
    (lambda q, k, v, n: (q, k.half(), v, n), r"share a dtype"),
    (lambda q, k, v, n: (q, k, v, n.long()), r"cache_seqlens must be int32, got torch.int64"),
    (lambda q, k, v, n: (q, k, v, n[:1]), r"cache_seqlens must have shape \(B,\) = \(2,\), got \(1,\)"),
    (lambda q, k, v, n: (q, k, v, [16, 16]), r"cache_seqlens must be a torch.Tensor"),
    (lambda q, k, v, n: (q.double(), k.double(), v.double(), n), r"dtype torch.float64 not supported"),
])
def test_rejects_bad_inputs(change, match):
    with pytest.raises((ValueError, TypeError), match=match):
        decode_attention(*change(*_inputs()))


def test_rejects_bad_head_dim_kv_start_and_splits():
    with pytest.raises(ValueError, match=r"head dim 24 not supported; valid: \(16, 32, 64, 128\)"):
        decode_attention(*_inputs(D=24))
    with pytest.raises(TypeError, match=r"kv_start must be int32, got torch.float32"):
        decode_attention(*_inputs(), kv_start=torch.zeros(2, device=DEVICE))
    with pytest.raises(ValueError, match=r"num_splits must be a positive int or None, got 0"):
        decode_attention(*_inputs(), num_splits=0)
