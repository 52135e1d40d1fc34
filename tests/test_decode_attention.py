"""nanogpt2.kernels.decode_attention: one query per row against a KV cache, vs an fp64 reference.

Kernel cases run in a worker process (an out-of-bounds access under TRITON_INTERPRET kills the
process; see test_flash_attention.py). GPU-only cases (bf16, CUDA graphs, Inductor) skip elsewhere; they
run where CUDA is present and TRITON_INTERPRET is not "1". On a GPU, fp16/bf16 are judged by
FlashAttention's rule (helpers_kernels.assert_within_pytorch_error), not a flat tolerance.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from helpers_kernels import (ON_GPU, assert_within_pytorch_error, gpu_only, kernel_process,  # noqa: F401
                             record_launches, variants)
from nanogpt2.kernels import decode_attention, flash_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCES = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # atol = rtol (CPU, and fp32)


def _decode_module():
    import sys

    return sys.modules["nanogpt2.kernels.decode_attention"]


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


def pytorch_decode(q, k_cache, v_cache, cache_seqlens, kv_start=None, sm_scale=None):
    """PyTorch's own attention (SDPA) in q's dtype over the same cache positions (rows need >= 1 of them)."""
    S = k_cache.shape[2]
    pos = torch.arange(S, device=q.device)
    keep = pos[None, :] < cache_seqlens.long()[:, None]
    if kv_start is not None:
        keep = keep & (pos[None, :] >= kv_start.long()[:, None])
    out = F.scaled_dot_product_attention(q[:, :, None], k_cache, v_cache, attn_mask=keep[:, None, None, :],
                                         scale=sm_scale)
    return out[:, :, 0]


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
        if ON_GPU and dtype != torch.float32:
            assert_within_pytorch_error(f"num_splits={num_splits} kv_start={ks}", out, ref,
                                        pytorch_decode(q, k_cache, v_cache, seqlens, ks))
        else:
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


def _case_generation_compiles_each_kernel_once(padded):
    """A 1k-token generation through the eager KV cache (cache.KVCache.update hands the kernel views of
    a growing length) for GPT-2 small at batch 1: cache lengths 1..1024, default split counts. Returns
    {kernel: number of compiled variants} and the split counts used."""
    da = _decode_module()
    B, H, D, S = 1, 12, 64, 1024
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    k_buf, v_buf = torch.randn(2, B, H, S, D, device=DEVICE).to(dtype).unbind(0)
    q = torch.randn(B, H, D, device=DEVICE).to(dtype)
    kv_start = torch.tensor([5], dtype=torch.int32, device=DEVICE) if padded else None
    num_sms = da._num_sms
    if not ON_GPU:  # split counts as on an H100 (132 SMs), so the CPU sweep sees many of them
        da._num_sms = lambda device: 132
    try:
        with torch.no_grad(), record_launches(da._decode_split_kernel, da._decode_merge_kernel,
                                              execute=ON_GPU) as launches:
            for length in range(1, S + 1):
                seqlens = torch.full((B,), length, dtype=torch.int32, device=DEVICE)
                decode_attention(q, k_buf[:, :, :length], v_buf[:, :, :length], seqlens, kv_start=kv_start)
    finally:
        da._num_sms = num_sms
    splits = sorted({launch.grid[1] for launch in launches if launch.name == "_decode_split_kernel"})

    # the counter is not blind: H is an int Triton does specialise (1, a multiple of 16, other)
    with torch.no_grad(), record_launches(da._decode_split_kernel, execute=ON_GPU) as probe:
        for h in (1, 16, 17):
            decode_attention(q[:, :1].expand(B, h, D), k_buf[:, :1, :8].expand(B, h, 8, D),
                             v_buf[:, :1, :8].expand(B, h, 8, D), torch.full((B,), 8, dtype=torch.int32,
                                                                             device=DEVICE))
    return variants(launches), splits, variants(probe)


def _assert_generation_compiles_each_kernel_once(kernel_process, padded):
    counts, splits, probe = kernel_process.run(_case_generation_compiles_each_kernel_once, padded)
    assert counts == {"_decode_merge_kernel": 1, "_decode_split_kernel": 1}, counts
    assert splits[0] == 1 and len(splits) >= 4, f"the sweep should cover one split and several: {splits}"
    assert probe == {"_decode_split_kernel": 3}, probe


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_generation_compiles_each_kernel_once(kernel_process, padded):
    """Two compiled kernels serve a whole 1k-token generation: the split kernel (one split is a run-time
    branch that writes the output itself, not a constexpr variant) and the merge (it loops over the
    splits SPLITS_BLOCK at a time, so the count is a run-time value). The cache length, split size and
    split count are exempt from Triton's int specialisation. The old launcher compiled the merge once
    per split count (constexpr NUM_SPLITS), and the split kernel per length class of S_max: 8 + 5 variants
    for this sweep at the GPU's block size."""
    _assert_generation_compiles_each_kernel_once(kernel_process, padded)


@gpu_only
def test_generation_compiles_each_kernel_once_gpu(kernel_process):  # counting real compiles (1024 launches)
    _assert_generation_compiles_each_kernel_once(kernel_process, False)


def _case_torch_compile(backend, mode=None):
    """torch.compile(fullgraph=True) of a decode step: one custom op, no graph break, eager's numbers;
    with mode="reduce-overhead" (CUDA graphs), replays with new lengths written into the same tensor."""
    dtype = torch.float16 if ON_GPU else torch.float32
    q, k_cache, v_cache = make_cache(2, 4, 300, 64, dtype)
    seqlens = torch.tensor([300, 17], dtype=torch.int32, device=DEVICE)
    kv_start = torch.tensor([0, 3], dtype=torch.int32, device=DEVICE)

    def step(q, k_cache, v_cache, seqlens, kv_start):
        return decode_attention(q, k_cache, v_cache, seqlens, kv_start=kv_start) * 2

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=backend, mode=mode, fullgraph=True)
    # bit for bit on CPU; on a GPU Inductor compiles the kernels itself: one unit in the last place
    tol = torch.finfo(dtype).eps if backend == "inductor" else 0.0
    # CUDA graph trees warm up on the first call, record on the second, replay from the third on
    for lengths in ([300, 17], [5, 250], [1, 300], [299, 2], [64, 65]):
        seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        got = compiled(q, k_cache, v_cache, seqlens, kv_start)
        want = step(q, k_cache, v_cache, seqlens, kv_start)
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m: f"{backend} {mode} {lengths}: {m}")


@pytest.mark.parametrize("S_max", [1, 17, 128, 300])
def test_fp32_matches_reference(kernel_process, S_max):
    # 33 splits: more than SPLITS_BLOCK (the merge loops), and some splits start past every row's end
    kernel_process.run(_case_matches_reference, S_max, torch.float32, (1, 2, 4, 7, 33, None))


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_fullgraph(kernel_process, backend):
    kernel_process.run(_case_torch_compile, backend)


@gpu_only
def test_torch_compile_inductor_gpu(kernel_process):
    kernel_process.run(_case_torch_compile, "inductor")


@gpu_only
@pytest.mark.cuda_graphs
def test_torch_compile_cuda_graphs_gpu(kernel_process):  # mode="reduce-overhead": Inductor's CUDA graph trees
    kernel_process.run(_case_torch_compile, "inductor", "reduce-overhead")


def test_fp16_matches_reference(kernel_process):
    kernel_process.run(_case_matches_reference, 100, torch.float16, (3, None))


def test_empty_rows_are_zero_not_nan(kernel_process):
    kernel_process.run(_case_empty_rows_are_zero)


def test_matches_prefill_last_row(kernel_process):
    kernel_process.run(_case_matches_prefill_last_row)


def test_custom_scale_and_head_dim_128(kernel_process):
    kernel_process.run(_case_custom_scale_and_head_dim_128)


@gpu_only
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_matches_reference_gpu(kernel_process, dtype):
    kernel_process.run(_case_matches_reference, 1024, dtype, (1, 8, 33, None))


@gpu_only
@pytest.mark.cuda_graphs
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
