"""nanogpt2.kernels.flash_attention: outputs and every gradient against an fp64 PyTorch reference.

On CPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
There an out-of-bounds access kills the whole process, so each kernel case runs in a worker
process (helpers_kernels.py): a crash fails that one test, not the session. bf16 needs a GPU
(the interpreter's tl.dot on bf16 is wrong) and skips elsewhere.
"""

import math
import os

import pytest
import torch

from helpers_kernels import kernel_process  # noqa: F401  (the fixture)
from nanogpt2.kernels import attention_probs_from_lse, flash_attention, flash_attention_with_lse

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
# (dtype, forward atol, gradient atol); rtol is the same as atol. References are fp64.
TOLERANCES = {
    torch.float32: (1e-4, 1e-3),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (2e-2, 5e-2),
}


# ---------------------------------------------------------------------------------------------
# Reference and case bodies (module level, so the worker can import them)
# ---------------------------------------------------------------------------------------------


def split_heads(qkv):
    """(B, T, 3, nh, hs) -> q, k, v as (B, nh, T, hs) strided views: the model's layout after c_attn."""
    return [qkv[:, :, i].transpose(1, 2) for i in range(3)]


def reference_attention(q, k, v, *, causal, sm_scale, kv_start=None):
    """Masked softmax attention in plain PyTorch. Query rows with no valid key output zeros."""
    B, H, T, D = q.shape
    pos = torch.arange(T, device=q.device)
    keep = torch.ones(B, 1, T, T, dtype=torch.bool, device=q.device)
    if causal:
        keep = keep & (pos[:, None] >= pos[None, :])
    if kv_start is not None:
        real = pos[None, :] >= kv_start.long()[:, None]  # (B, T): not left padding
        keep = keep & real[:, None, None, :] & real[:, None, :, None]
    has_key = keep.any(-1, keepdim=True)
    scores = (q @ k.transpose(-2, -1)) * sm_scale
    scores = scores.masked_fill(~(keep | ~has_key), float("-inf"))  # empty rows: keep finite, zero below
    probs = torch.softmax(scores, dim=-1) * keep
    return probs @ v


def _case_matches_reference(B, H, T, D, dtype, causal, kv_start=None, sm_scale=None):
    torch.manual_seed(1000 * T + D)
    qkv = torch.randn(B, T, 3, H, D, device=DEVICE).to(dtype).requires_grad_()
    q, k, v = split_heads(qkv)
    ks = None if kv_start is None else torch.tensor(kv_start, dtype=torch.int32, device=DEVICE)
    out = flash_attention(q, k, v, causal=causal, sm_scale=sm_scale, kv_start=ks)
    assert out.shape == (B, H, T, D) and out.dtype == dtype
    # a strided upstream gradient, as from merging heads back to (B, T, C)
    dout = torch.randn(B, T, H, D, device=DEVICE).to(dtype).transpose(1, 2)
    (dqkv,) = torch.autograd.grad(out, qkv, dout)

    ref_qkv = qkv.detach().double().requires_grad_()
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    ref = reference_attention(*split_heads(ref_qkv), causal=causal, sm_scale=scale, kv_start=ks)
    (ref_dqkv,) = torch.autograd.grad(ref, ref_qkv, dout.double())

    fwd_tol, grad_tol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double(), ref, atol=fwd_tol, rtol=fwd_tol, msg=lambda m: f"out: {m}")
    for i, name in enumerate(("dq", "dk", "dv")):
        torch.testing.assert_close(dqkv[:, :, i].double(), ref_dqkv[:, :, i], atol=grad_tol, rtol=grad_tol,
                                   msg=lambda m, name=name: f"{name}: {m}")
    if kv_start is not None:  # padding positions: exactly zero output and zero gradients
        pad = torch.arange(T, device=DEVICE)[None, :] < ks.long()[:, None]  # (B, T)
        assert (out.transpose(1, 2)[pad] == 0).all()
        assert (dqkv[pad] == 0).all()


def _case_lse_and_probs(causal):
    torch.manual_seed(0)
    B, H, T, D = 2, 2, 40, 32
    q, k, v = split_heads(torch.randn(B, T, 3, H, D, device=DEVICE))
    ks = torch.tensor([0, 9], dtype=torch.int32, device=DEVICE)
    out, lse = flash_attention_with_lse(q, k, v, causal=causal, kv_start=ks)
    assert lse.shape == (B, H, T) and lse.dtype == torch.float32
    scale = 1.0 / math.sqrt(D)
    # lse is the natural-log log-sum-exp of each row's valid scaled scores; +inf for padding rows
    scores = (q.double() @ k.double().transpose(-2, -1)) * scale
    pos = torch.arange(T, device=DEVICE)
    keep = (pos[:, None] >= pos[None, :]) if causal else torch.ones(T, T, dtype=torch.bool, device=DEVICE)
    want = scores[0].masked_fill(~keep, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse[0].double(), want, atol=1e-5, rtol=1e-5)
    assert torch.isinf(lse[1, :, :9]).all() and (lse[1, :, :9] > 0).all()

    probs = attention_probs_from_lse(q, k, lse, causal=causal, kv_start=ks)
    ref_out = reference_attention(q.double(), k.double(), torch.eye(T, dtype=torch.double, device=DEVICE)
                                  .expand(B, H, T, T), causal=causal, sm_scale=scale, kv_start=ks)
    torch.testing.assert_close(probs.double(), ref_out, atol=1e-5, rtol=1e-5)  # P @ I == P
    torch.testing.assert_close(probs @ v, out, atol=1e-5, rtol=1e-5)


def _case_with_lse_matches_autograd_path():
    torch.manual_seed(0)
    q, k, v = split_heads(torch.randn(1, 50, 3, 2, 64, device=DEVICE))
    out, _ = flash_attention_with_lse(q, k, v)
    torch.testing.assert_close(out, flash_attention(q, k, v), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

# (B, nh, T, hs): T covers one row, less than a block, exact blocks, and ragged tails past 2-16
# blocks (the CPU interpreter's blocks are 16-32 wide). Fewer heads at long T keep the tests fast.
SHAPES = [(2, 3, 1, 32), (2, 3, 7, 64), (2, 3, 64, 32), (2, 3, 100, 64), (2, 2, 129, 32), (1, 2, 257, 32)]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("B,H,T,D", SHAPES)
def test_fp32_matches_reference(kernel_process, B, H, T, D, causal):
    kernel_process.run(_case_matches_reference, B, H, T, D, torch.float32, causal)


@pytest.mark.parametrize("B,H,T,D,causal", [(2, 3, 7, 32, True), (2, 3, 100, 64, False), (1, 2, 257, 64, True)])
def test_fp16_matches_reference(kernel_process, B, H, T, D, causal):
    kernel_process.run(_case_matches_reference, B, H, T, D, torch.float16, causal)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("T", [64, 100])
def test_left_padding_kv_start(kernel_process, T, causal):
    # row 3 is padding up to its last position; row 4 is padding throughout (all zeros, no NaN)
    kernel_process.run(_case_matches_reference, 5, 1, T, 32, torch.float32, causal, [0, 5, 16, T - 1, T])


def test_custom_sm_scale(kernel_process):
    kernel_process.run(_case_matches_reference, 1, 2, 33, 16, torch.float32, True, None, 0.3)


def test_head_dim_128(kernel_process):
    kernel_process.run(_case_matches_reference, 1, 1, 40, 128, torch.float32, True)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_lse_and_attention_probs(kernel_process, causal):
    kernel_process.run(_case_lse_and_probs, causal)


def test_with_lse_matches_flash_attention(kernel_process):
    kernel_process.run(_case_with_lse_matches_autograd_path)


@pytest.mark.skipif(not ON_GPU, reason="bf16 tl.dot needs a GPU (wrong under the CPU interpreter)")
@pytest.mark.parametrize("T,causal", [(1, True), (100, True), (257, False), (1024, True)])
def test_bf16_matches_reference_gpu(kernel_process, T, causal):
    kernel_process.run(_case_matches_reference, 2, 3, T, 64, torch.bfloat16, causal, [0, 3])


# -- input validation: these raise before any kernel launches, so they run in-process -----------


def _qkv(shape=(1, 2, 8, 32), dtype=torch.float32):
    return [torch.randn(shape, device=DEVICE).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("make,match", [
    (lambda: (*_qkv((2, 8, 32)),), r"4-D \(B, nh, T, hs\), got shape \(2, 8, 32\)"),
    (lambda: (*_qkv((1, 2, 8, 48)),), r"head dim 48 not supported; valid: \(16, 32, 64, 128\)"),
    (lambda: (*_qkv(dtype=torch.float64),), r"dtype torch.float64 not supported"),
    (lambda: (_qkv()[0], _qkv()[1].half(), _qkv()[2]), r"share a dtype.*k torch.float16"),
    (lambda: (_qkv()[0], _qkv((1, 2, 9, 32))[1], _qkv()[2]), r"same shape.*k \(1, 2, 9, 32\)"),
])
def test_rejects_bad_inputs(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        flash_attention(*make())


@pytest.mark.parametrize("kv_start,match", [
    (torch.zeros(3, dtype=torch.int32), r"kv_start must have shape \(B,\) = \(1,\), got \(3,\)"),
    (torch.zeros(1, dtype=torch.int64), r"kv_start must be int32, got torch.int64"),
    ([0], r"kv_start must be an int32 tensor"),
])
def test_rejects_bad_kv_start(kv_start, match):
    with pytest.raises((ValueError, TypeError), match=match):
        flash_attention(*_qkv(), kv_start=kv_start)


def test_rejects_kv_start_on_another_device():
    with pytest.raises(ValueError, match=r"kv_start is on meta but q is on"):
        flash_attention(*_qkv(), kv_start=torch.zeros(1, dtype=torch.int32, device="meta"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mismatch with")
def test_rejects_device_mismatch():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="one device"):
        flash_attention(q, k.cpu(), v)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    import sys

    monkeypatch.setattr(sys.modules["nanogpt2.kernels.flash_attention"], "_INTERPRET", False)
    with pytest.raises(ValueError, match=r"q is on cpu; the Triton kernels need CUDA tensors"):
        flash_attention(*[t.cpu() for t in _qkv()])


def test_launch_falls_back_to_smaller_tiles_when_shared_memory_runs_out():
    # A GPU with less shared memory than the first config needs (e.g. a consumer card) must still
    # run: Triton raises OutOfResources before launching, and the next config in the list is tried.
    import sys

    from triton.runtime.errors import OutOfResources

    fa = sys.modules["nanogpt2.kernels.flash_attention"]
    launched = []

    class FakeKernel:
        def __getitem__(self, grid):
            def launch(*args, BLOCK_M, BLOCK_N, **kwargs):
                if BLOCK_M * BLOCK_N > 64 * 64:
                    raise OutOfResources(BLOCK_M * BLOCK_N, 64 * 64, "shared memory")
                launched.append((grid, BLOCK_M, BLOCK_N))
            return launch

    kernel, configs = FakeKernel(), [(128, 64, 4, 3), (64, 64, 4, 2), (16, 16, 4, 1)]
    args, constexprs = (torch.empty(1),), dict(HEAD_DIM=64)
    for _ in range(2):
        fa._launch(kernel, configs, lambda bm, bn: (100 // bm + 1,), args, constexprs, "cuda:0")
    assert launched == [((2,), 64, 64), ((2,), 64, 64)]
