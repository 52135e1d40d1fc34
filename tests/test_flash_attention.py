"""nanogpt2.kernels.flash_attention: outputs and every gradient against an fp64 PyTorch reference.

On CPU the kernels run under Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
There an out-of-bounds access kills the whole process, so each kernel case runs in a worker
process (helpers_kernels.py): a crash fails that one test, not the session. bf16 needs a GPU
(the interpreter's tl.dot on bf16 is wrong) and skips elsewhere, as do the other *_gpu tests: they
run where CUDA is present and TRITON_INTERPRET is not "1" (`TRITON_INTERPRET=0 pytest ...`).
On a GPU, fp16/bf16 are judged as FlashAttention's own tests judge them: error against fp64 at most
twice PyTorch's own (SDPA in the same dtype), plus a rounding floor (helpers_kernels.py).
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

from helpers_kernels import (CPU_STAND_IN, ON_GPU, assert_within_pytorch_error, case_without_interpreter,  # noqa: F401
                             compile_in_parallel, gpu_only, kernel_process, record_launches, variants)
from nanogpt2.kernels import attention_probs_from_lse, flash_attention, flash_attention_with_lse

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (dtype, forward atol, gradient atol); rtol is the same as atol. References are fp64. On a GPU,
# fp16/bf16 use the FlashAttention rule instead (see _case_matches_reference).
TOLERANCES = {
    torch.float32: (1e-4, 1e-3),
    torch.float16: (2e-3, 1e-2),
    torch.bfloat16: (2e-2, 5e-2),
}


def _flash_module():
    import sys

    return sys.modules["nanogpt2.kernels.flash_attention"]


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


def pytorch_attention(q, k, v, *, causal, sm_scale, kv_start=None):
    """PyTorch's own attention (SDPA) in q's dtype, with the kernels' rule for left padding: a padding
    query outputs zeros (it may see only itself here, which keeps its softmax finite, then is zeroed)."""
    if kv_start is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=sm_scale)
    T = q.shape[2]
    pos = torch.arange(T, device=q.device)
    real = pos[None, :] >= kv_start.long()[:, None]  # (B, T)
    keep = real[:, None, None, :] | (pos[:, None] == pos[None, :])  # (B, 1, T, T)
    if causal:
        keep = keep & (pos[:, None] >= pos[None, :])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=sm_scale)
    return out.masked_fill(~real[:, None, :, None], 0.0)


def _case_matches_reference(B, H, T, D, dtype, causal, kv_start=None, sm_scale=None):
    """Output and dq, dk, dv of strided (B, T, 3, nh, hs) views vs fp64; padding rows and their
    gradients exactly 0. Returns [(name, error, PyTorch's error, floor)] when judged by the GPU rule."""
    torch.manual_seed(1000 * T + D)
    qkv = torch.randn(B, T, 3, H, D, device=DEVICE).to(dtype).requires_grad_()
    q, k, v = split_heads(qkv)
    ks = None if kv_start is None else torch.tensor(kv_start, dtype=torch.int32, device=DEVICE)
    out = flash_attention(q, k, v, causal=causal, sm_scale=sm_scale, kv_start=ks)
    assert out.shape == (B, H, T, D) and out.dtype == dtype
    # a strided upstream gradient, as from merging heads back to (B, T, C)
    dout = torch.randn(B, T, H, D, device=DEVICE).to(dtype).transpose(1, 2)
    (dqkv,) = torch.autograd.grad(out, qkv, dout)
    assert not out.isnan().any() and not dqkv.isnan().any()

    ref_qkv = qkv.detach().double().requires_grad_()
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    ref = reference_attention(*split_heads(ref_qkv), causal=causal, sm_scale=scale, kv_start=ks)
    (ref_dqkv,) = torch.autograd.grad(ref, ref_qkv, dout.double())

    report = []
    if ON_GPU and dtype != torch.float32:  # FlashAttention's rule, against PyTorch in the same dtype
        pt_qkv = qkv.detach().clone().requires_grad_()
        pt = pytorch_attention(*split_heads(pt_qkv), causal=causal, sm_scale=scale, kv_start=ks)
        (pt_dqkv,) = torch.autograd.grad(pt, pt_qkv, dout)
        report.append(("out", *assert_within_pytorch_error(f"T={T} out", out, ref, pt)))
        for i, name in enumerate(("dq", "dk", "dv")):
            report.append((name, *assert_within_pytorch_error(f"T={T} {name}", dqkv[:, :, i], ref_dqkv[:, :, i],
                                                              pt_dqkv[:, :, i])))
    else:
        fwd_tol, grad_tol = TOLERANCES[dtype]
        torch.testing.assert_close(out.double(), ref, atol=fwd_tol, rtol=fwd_tol, msg=lambda m: f"out: {m}")
        for i, name in enumerate(("dq", "dk", "dv")):
            torch.testing.assert_close(dqkv[:, :, i].double(), ref_dqkv[:, :, i], atol=grad_tol, rtol=grad_tol,
                                       msg=lambda m, name=name: f"{name}: {m}")
    if kv_start is not None:  # padding positions: exactly zero output and zero gradients
        pad = torch.arange(T, device=DEVICE)[None, :] < ks.long()[:, None]  # (B, T)
        assert (out.transpose(1, 2)[pad] == 0).all()
        assert (dqkv[pad] == 0).all()
    return report


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


def _case_lse_gradient():
    # lse is an output of the autograd op too: its gradient enters the backward as Δ − dlse
    torch.manual_seed(0)
    qkv = torch.randn(2, 30, 3, 2, 32, device=DEVICE).requires_grad_()
    out, lse = flash_attention_with_lse(*split_heads(qkv))
    w = torch.randn_like(lse)
    (got,) = torch.autograd.grad((out.square().sum() + (w * lse).sum()), qkv)
    ref_qkv = qkv.detach().double().requires_grad_()
    q, k, v = split_heads(ref_qkv)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(32)
    scores = scores.masked_fill(~torch.ones(30, 30, dtype=torch.bool, device=DEVICE).tril(), float("-inf"))
    ref_out = torch.softmax(scores, -1) @ v
    (want,) = torch.autograd.grad(ref_out.square().sum() + (w.double() * scores.logsumexp(-1)).sum(), ref_qkv)
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def _case_head_merge_is_a_view():
    # the output lives as (B, T, nh, hs): the model's `.transpose(1, 2).reshape(B, T, C)` must not copy
    B, H, T, D = 2, 3, 20, 16
    q, k, v = split_heads(torch.randn(B, T, 3, H, D, device=DEVICE, requires_grad=True))
    out = flash_attention(q, k, v)
    merged = out.transpose(1, 2).reshape(B, T, H * D)
    assert merged._is_view() and merged.data_ptr() == out.data_ptr()
    # the gradients come back in the same layout, so autograd's view backward of q, k, v is free too
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for g in (dq, dk, dv):
        assert g.transpose(1, 2).is_contiguous()

    # and in the model: c_proj's input is a view of the kernel's output, not a copy
    from nanogpt2 import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=101, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    model = model.to(DEVICE).eval()  # eval: attention dropout would send the call to sdpa
    model.set_attn_implementation("triton")
    seen = []
    model.transformer.h[0].attn.c_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]._is_view()))
    with torch.no_grad():
        model(torch.randint(0, 101, (2, 9), device=DEVICE))
    assert seen == [True]


def _case_torch_compile(backend):
    """torch.compile(fullgraph=True) of a training step's attention and of lse: one custom op each way,
    no graph break (fullgraph raises on one), and the same numbers as eager."""
    torch.manual_seed(0)
    B, H, T, D = 2, 2, 40, 32
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    qkv = torch.randn(B, T, 3, H, D, device=DEVICE).to(dtype)
    ks = torch.tensor([0, 5], dtype=torch.int32, device=DEVICE)

    def step(qkv, ks):
        out, lse = flash_attention_with_lse(*split_heads(qkv), kv_start=ks)
        return out.transpose(1, 2).reshape(B, T, H * D), lse

    def run(fn):
        x = qkv.clone().requires_grad_()
        y, lse = fn(x, ks)
        (y.float().square().sum() + lse[:, :, 8:].sum()).backward()  # lse is +inf on padding rows
        return y.detach(), lse.detach(), x.grad

    torch._dynamo.reset()
    want = run(step)
    got = run(torch.compile(step, backend=backend, fullgraph=True))
    # the same kernels run either way: bit for bit on CPU; on a GPU Inductor compiles them itself, so allow
    # one unit in the last place of the output dtype
    tol = torch.finfo(dtype).eps if backend == "inductor" else 0.0
    for g, w, name in zip(got, want, ("out", "lse", "dqkv")):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol, msg=lambda m, name=name: f"{backend} {name}: {m}")


def _case_traced_as_triton_ops():
    """The GPU registration (torch.library.triton_op), traced on CPU: TRITON_INTERPRET unset, a stand-in
    Triton driver that reports an sm_90 target, launches recorded but not run. AOTAutograd must turn each
    launch into a triton_kernel_wrapper_functional node (what Inductor compiles) and, from its analysis of
    the kernels' stores, copy only the buffers the kernels write: never q, k, v or a KV cache.
    Returns {kernel name: tensors it clones} over the forward, backward and decode graphs."""
    import sys

    import triton
    from torch._dynamo.backends.common import aot_autograd
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from triton.backends.compiler import GPUTarget

    from nanogpt2.kernels import decode_attention

    class Sm90Driver:  # what the tracer asks Triton's driver; nothing here launches a kernel
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    triton.runtime.driver.set_active(Sm90Driver())
    fa = _flash_module()
    da = sys.modules["nanogpt2.kernels.decode_attention"]
    fa._INTERPRET = da._INTERPRET = True  # let the input checks accept CPU tensors

    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    backend = aot_autograd(fw_compiler=keep_graph, bw_compiler=keep_graph)
    B, H, T, D = 2, 2, 40, 32

    def train(qkv, ks):
        out, lse = flash_attention_with_lse(*split_heads(qkv), kv_start=ks)
        return out.transpose(1, 2).reshape(B, T, H * D), lse

    def decode(q, k_cache, v_cache, seqlens):
        return decode_attention(q, k_cache, v_cache, seqlens)

    kernels = (fa._attn_fwd, fa._attn_bwd_preprocess, fa._attn_bwd_dkdv, fa._attn_bwd_dq,
               da._decode_split_kernel, da._decode_merge_kernel)
    with record_launches(*kernels, execute=False):
        qkv = torch.randn(B, T, 3, H, D, dtype=torch.bfloat16, requires_grad=True)
        y, lse = torch.compile(train, backend=backend, fullgraph=True)(qkv, torch.tensor([0, 5], dtype=torch.int32))
        (y.float().sum() + lse[:, :, 8:].sum()).backward()
        cache = torch.randn(2, B, H, 300, D, dtype=torch.bfloat16)
        torch.compile(decode, backend=backend, fullgraph=True)(
            torch.randn(B, H, D, dtype=torch.bfloat16), cache[0], cache[1], torch.tensor([300, 4], dtype=torch.int32))

    clones = {}
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
                kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
                while not hasattr(kernel, "arg_names"):  # num_warps/num_stages arrive as a one-config autotuner
                    kernel = kernel.fn
                clones[kernel.fn.__name__] = sorted(node.kwargs["tensors_to_clone"])
    return clones


def _case_prompt_lengths_compile_once():
    """Prefill at every prompt length 1..160: the forward compiles once (T is exempt from Triton's
    specialisation on ints equal to 1 or divisible by 16, which would make three variants)."""
    fa = _flash_module()
    qkv = torch.randn(1, 160, 3, 2, 64, device=DEVICE)
    with torch.no_grad(), record_launches(fa._attn_fwd, execute=ON_GPU) as launches:
        for T in range(1, 161):
            flash_attention(*split_heads(qkv[:, :T]))
    assert len(launches) == 160
    assert variants(launches) == {"_attn_fwd": 1}


def _case_gpu_sweep(D, dtype, causal):
    """GPU.md's first-run sweep for one (head dim, dtype, causal): every T with every kv_start edge value
    at once (one batch row each), and at D=64 also without kv_start (HAS_KV_START=False is its own
    compiled variant; the others are D-independent code). Returns the worst error ratio, for the log."""
    worst = (0.0, None)
    for T in GPU_SWEEP_T:
        runs = [_kv_start_edges(T)] + ([None] if D == 64 else [])
        for kv_start in runs:
            B = 2 if kv_start is None else len(kv_start)
            # nh = 2 everywhere: nh = 1 would be another compiled variant (Triton specialises ints equal to 1)
            for name, err, base, floor in _case_matches_reference(B, 2, T, D, dtype, causal, kv_start):
                ratio = err / (2 * base + floor)
                if ratio > worst[0]:
                    worst = (ratio, f"T={T} kv_start={'none' if kv_start is None else 'edges'} {name}: "
                                    f"{err:.2e} vs PyTorch {base:.2e}")
    return worst


def _case_compile_variant(D, dtype, causal, has_kv_start):
    """Forward and backward once on tiny inputs laid out like the tests' (strided qkv views, nh = 2, a
    transposed upstream gradient), so that Triton compiles the variant the tests will ask for."""
    qkv = torch.randn(2, 20, 3, 2, D, device=DEVICE).to(dtype).requires_grad_()
    ks = torch.tensor([0, 3], dtype=torch.int32, device=DEVICE) if has_kv_start else None
    out = flash_attention(*split_heads(qkv), causal=causal, kv_start=ks)
    out.backward(torch.randn(2, 20, 2, D, device=DEVICE).to(dtype).transpose(1, 2))
    torch.cuda.synchronize()


def _case_compiled_resources():
    """Registers, spills and shared memory of every compiled kernel (the first config of each list),
    from the compiled kernel objects (triton 3.x: .n_regs, .n_spills, .metadata.shared)."""
    import sys

    fa = _flash_module()
    da = sys.modules["nanogpt2.kernels.decode_attention"]
    from nanogpt2.kernels import decode_attention

    kernels = (fa._attn_fwd, fa._attn_bwd_preprocess, fa._attn_bwd_dkdv, fa._attn_bwd_dq,
               da._decode_split_kernel, da._decode_merge_kernel)
    with record_launches(*kernels) as launches:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for D in (64, 128):
                qkv = torch.randn(2, 1024, 3, 4, D, device=DEVICE).to(dtype).requires_grad_()
                out = flash_attention(*split_heads(qkv))
                out.backward(torch.randn_like(out))
                q, k, v = torch.randn(3, 2, 4, 1024, D, device=DEVICE).to(dtype).unbind(0)
                decode_attention(q[:, :, 0], k, v, torch.full((2,), 1000, dtype=torch.int32, device=DEVICE))
    rows, seen = [], set()
    for launch in launches:
        if id(launch.compiled) in seen:
            continue
        seen.add(id(launch.compiled))
        compiled = launch.compiled
        getattr(compiled, "_init_handles", lambda: None)()  # loaded at first launch; a no-op after
        floats = {a.dtype for a in launch.args if isinstance(a, torch.Tensor) and a.is_floating_point()}
        dtype = next((d for d in floats if d != torch.float32), torch.float32)  # partials, lse are fp32
        kw = launch.kwargs
        rows.append((launch.name, str(dtype).replace("torch.", ""), kw["HEAD_DIM"], kw.get("BLOCK_M", "-"),
                     kw.get("BLOCK_N", "-"), kw.get("num_warps", 4), kw.get("num_stages", "-"),
                     compiled.n_regs, compiled.n_spills, compiled.metadata.shared))
    fallbacks = {key: i for key, i in fa._CONFIG_THAT_FITS.items() if i != 0}
    return rows, fallbacks


def _case_fallback_to_smaller_tiles():
    """A config too big for the GPU's shared memory raises OutOfResources at first launch; _launch
    takes the next config and remembers it. The first d=128 tile with 8 pipeline stages instead of 3:
    8 buffers of 64×128 K and V tiles need 272 KB (an AOT compile for sm_90 says 278528 B), more than
    the 227 KB a block may have on an H100 or H200, and it compiles in seconds without spilling."""
    fa = _flash_module()
    torch.manual_seed(0)
    q, k, v = split_heads(torch.randn(2, 300, 3, 2, 128, device=DEVICE).to(torch.bfloat16))
    key = ("fwd", 128, torch.bfloat16, q.device)
    configs, saved = fa._fwd_configs, fa._CONFIG_THAT_FITS.pop(key, None)
    fa._fwd_configs = lambda head_dim, dtype: [(64, 64, 4, 8)] + configs(head_dim, dtype)
    try:
        out = flash_attention(q, k, v, causal=False)
        assert fa._CONFIG_THAT_FITS[key] == 1
        ref = reference_attention(q.double(), k.double(), v.double(), causal=False, sm_scale=128**-0.5)
        assert_within_pytorch_error("out", out, ref, pytorch_attention(q, k, v, causal=False, sm_scale=128**-0.5))
    finally:
        fa._fwd_configs = configs
        fa._CONFIG_THAT_FITS.pop(key, None)
        if saved is not None:
            fa._CONFIG_THAT_FITS[key] = saved


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


def test_lse_is_differentiable(kernel_process):
    kernel_process.run(_case_lse_gradient)


def test_output_layout_makes_the_head_merge_a_view(kernel_process):
    kernel_process.run(_case_head_merge_is_a_view)


# Under the interpreter the kernels cannot be traced, so there the ops are opaque custom ops (kernels/_ops.py):
# "eager" checks Dynamo (one op, no graph break), "aot_eager" AOTAutograd (the registered backward). On a GPU
# the ops are triton_ops whose kernels Inductor compiles itself: test_torch_compile_inductor_gpu.
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_fullgraph(kernel_process, backend):
    kernel_process.run(_case_torch_compile, backend)


@gpu_only
def test_torch_compile_inductor_gpu(kernel_process):
    kernel_process.run(_case_torch_compile, "inductor")


def _case_compile_for_sm90_with_fp64_floats():
    """Compile every kernel that takes a float argument for sm_90 (Triton's AOT path: no GPU needed), that
    argument typed fp64 as torch.compile's Inductor types a Python float; bf16 tensors, the GPU tile configs.
    Returns {kernel name: stages built}. Before the kernels cast their floats to fp32, the first GPU run failed
    here: "Loop-carried variable m_i has initial type fp32 but is re-assigned to fp64"."""
    import sys

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from nanogpt2.kernels import decode_attention  # noqa: F401  (loads the module)
    fa, da = _flash_module(), sys.modules["nanogpt2.kernels.decode_attention"]
    pointers_fp32, pointers_i32 = {"LSE", "Delta", "O_PART", "LSE_PART"}, {"KV_START", "SEQLENS"}
    common = dict(HEAD_DIM=64, CAUSAL=True, HAS_KV_START=True, DOT_PRECISION="tf32")
    cases = [(fa._attn_fwd, dict(common, BLOCK_M=128, BLOCK_N=64), 4, 3),
             (fa._attn_bwd_dkdv, dict(common, BLOCK_M=32, BLOCK_N=128), 8, 2),
             (fa._attn_bwd_dq, dict(common, BLOCK_M=128, BLOCK_N=32), 4, 3),
             (da._decode_split_kernel, dict(HEAD_DIM=64, BLOCK_N=64, HAS_KV_START=True), 4, 2)]
    built = {}
    for kernel, constexprs, warps, stages in cases:
        names = kernel.arg_names
        first_int = next(i for i, n in enumerate(names) if n.startswith("stride"))
        signature = {}
        for i, n in enumerate(names):
            if n in constexprs:
                signature[n] = "constexpr"
            elif i < first_int:
                signature[n] = "*fp32" if n in pointers_fp32 else "*i32" if n in pointers_i32 else "*bf16"
            else:
                signature[n] = "fp64" if "scale" in n else "i32"
        src = ASTSource(fn=kernel, signature=signature,
                        constexprs={(names.index(k),): v for k, v in constexprs.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=warps, num_stages=stages))
        built[kernel.__name__] = sorted(compiled.asm)
    return built


@pytest.mark.skipif(**CPU_STAND_IN)
def test_kernels_compile_for_sm90_with_the_fp64_floats_torch_compile_passes():
    """In a fresh interpreter-free process, as the registration test."""
    built = case_without_interpreter("test_flash_attention", "_case_compile_for_sm90_with_fp64_floats")
    assert sorted(built) == ["_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_fwd", "_decode_split_kernel"]
    assert all("ttgir" in stages for stages in built.values()), built


@pytest.mark.skipif(**CPU_STAND_IN)
def test_gpu_registration_traces_into_kernel_nodes():
    """torch.compile on a GPU sees the kernels through triton_op (kernels/_ops.py); check that path on CPU
    in a fresh interpreter-free process (TRITON_INTERPRET is read once, at import)."""
    clones = case_without_interpreter("test_flash_attention", "_case_traced_as_triton_ops")
    assert clones == {
        "_attn_fwd": ["LSE", "Out"],
        "_attn_bwd_preprocess": ["Delta"],
        "_attn_bwd_dkdv": ["DK", "DV"],
        "_attn_bwd_dq": ["DQ"],
        "_decode_split_kernel": ["LSE_PART", "O_PART", "Out"],
        "_decode_merge_kernel": ["Out"],
    }, clones


def test_prompt_lengths_compile_once(kernel_process):
    kernel_process.run(_case_prompt_lengths_compile_once)


@gpu_only
def test_prompt_lengths_compile_once_gpu(kernel_process):  # the same, counting real compiles
    kernel_process.run(_case_prompt_lengths_compile_once)


def test_gpu_configs_follow_the_tutorial_rules(monkeypatch):
    """Every GPU config: tiles that nest as the kernels' block walks need, and no forward config the Hopper
    pruning rule of Triton's 06-fused-attention would drop (8 warps on a tile under 128×128)."""
    fa = _flash_module()
    monkeypatch.setattr(fa, "_INTERPRET", False)
    for D in fa.HEAD_DIMS:
        for dtype in fa.DTYPES:
            for block_m, block_n, warps, stages in fa._fwd_configs(D, dtype):
                assert block_m % block_n == 0 and fa._tutorial_keeps((block_m, block_n, warps, stages))
            assert all(bn % bm == 0 for bm, bn, _, _ in fa._bwd_dkdv_configs(D, dtype))
            assert all(bm % bn == 0 for bm, bn, _, _ in fa._bwd_dq_configs(D, dtype))


# -- GPU only: bf16 (wrong under the interpreter), the first-run sweep, the grid limit, resources -----


GPU_SWEEP_T = [1, 17, 63, 64, 65, 127, 128, 129, 1024, 4096]
SWEEP_D = (16, 64, 128)
LOW_PRECISION = (torch.bfloat16, torch.float16)
# (head dim, dtype, causal, kv_start given) of every flash variant the GPU tests below run
GPU_VARIANTS = sorted({(D, dtype, causal, True) for D in SWEEP_D for dtype in LOW_PRECISION for causal in (True, False)}
                      | {(64, dtype, causal, False) for dtype in LOW_PRECISION for causal in (True, False)}
                      | {(D, dtype, True, False) for D in (64, 128) for dtype in (*LOW_PRECISION, torch.float32)},
                      key=str)


@pytest.fixture(scope="module")
def warm_triton_cache():
    """Compile GPU_VARIANTS in parallel processes once, before the first GPU test needs them (see
    helpers_kernels.compile_in_parallel): ~60 kernels at a few seconds each would otherwise be serial."""
    if ON_GPU:
        compile_in_parallel(_case_compile_variant, GPU_VARIANTS)


@gpu_only
@pytest.mark.parametrize("T,causal", [(1, True), (100, True), (257, False), (1024, True)])
def test_bf16_matches_reference_gpu(kernel_process, warm_triton_cache, T, causal):
    kernel_process.run(_case_matches_reference, 2, 3, T, 64, torch.bfloat16, causal, [0, 3])


def _kv_start_edges(T):
    """kv_start values at block edges (0, 3, 63, 64, 127, 128), one row of pure padding but the last
    position (T - 1), and one of pure padding (T): one batch row each."""
    return sorted({s for s in (0, 3, 63, 64, 127, 128) if s <= T} | {T - 1, T})


@gpu_only
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=["bf16", "fp16"])
@pytest.mark.parametrize("D", SWEEP_D)
def test_sweep_gpu(kernel_process, warm_triton_cache, capsys, D, dtype, causal):
    ratio, where = kernel_process.run(_case_gpu_sweep, D, dtype, causal)
    with capsys.disabled():
        print(f"\nsweep D={D} {dtype} causal={causal}: worst error / allowed = {ratio:.2f} ({where})")


@gpu_only
def test_grid_limit_gpu(kernel_process, warm_triton_cache):
    # B·nh = 65544 > 65535, the most a CUDA grid's axes 1 and 2 allow: B·nh must be on axis 0
    kernel_process.run(_case_matches_reference, 5462, 12, 16, 64, torch.bfloat16, True)


@gpu_only
def test_compiled_kernel_resources_gpu(kernel_process, warm_triton_cache, capsys):
    rows, fallbacks = kernel_process.run(_case_compiled_resources)
    header = ("kernel", "dtype", "D", "BLOCK_M", "BLOCK_N", "warps", "stages", "regs", "spills", "shared B")
    with capsys.disabled():
        print("\n" + " ".join(f"{h:>9}" if i else f"{h:<22}" for i, h in enumerate(header)))
        for row in rows:
            print(" ".join(f"{str(c):>9}" if i else f"{c:<22}" for i, c in enumerate(row)))
        print(f"configs that fell back to smaller tiles: {fallbacks or 'none'}")
    assert not fallbacks, f"the first config did not fit: {fallbacks}"
    spilling = [row for row in rows if row[1] == "bfloat16" and row[8] > 0]
    assert not spilling, f"bf16 kernels spill registers: {spilling}"


@gpu_only
def test_oversized_config_falls_back_gpu(kernel_process):
    kernel_process.run(_case_fallback_to_smaller_tiles)


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
    monkeypatch.setattr(_flash_module(), "_INTERPRET", False)
    with pytest.raises(ValueError, match=r"q is on cpu; the Triton kernels need CUDA tensors"):
        flash_attention(*[t.cpu() for t in _qkv()])


def test_launch_falls_back_to_smaller_tiles_when_shared_memory_runs_out():
    # A GPU with less shared memory than the first config needs (e.g. a consumer card) must still
    # run: Triton raises OutOfResources before launching, and the next config in the list is tried.
    from triton.runtime.errors import OutOfResources

    fa = _flash_module()
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
        fa._launch("fake", kernel, configs, lambda bm, bn: (100 // bm + 1,), args, constexprs, "cuda:0")
    assert launched == [((2,), 64, 64), ((2,), 64, 64)]
    fa._CONFIG_THAT_FITS.pop(("fake", 64, torch.float32, "cuda:0"))
