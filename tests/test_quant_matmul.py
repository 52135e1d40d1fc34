"""nanogpt2.kernels.quant_matmul: int8_linear and int4_linear against an fp64 PyTorch dequantize-then-matmul.

On CPU the kernels run under Triton's interpreter (tests/conftest.py), each case in a worker process
(helpers_kernels.py). Both kernel shapes are forced on the same small inputs (GEMV and GEMM), over
fp32/fp16/bf16, with and without bias, leading batch dims, an odd N, a K that is not a multiple of the
block, and every int4 group size. bf16 runs here too: the GEMV has no tl.dot, and the GEMM casts bf16 tiles to
fp32 under the interpreter (the interpreter's bf16 tl.dot is wrong); the bf16 tensor-core dot itself is
checked by the *_gpu tests. fp16/bf16 are judged as the attention kernels' are: error against fp64 at most
twice PyTorch's own (F.linear of the dequantized weight in that dtype) plus a rounding floor.
"""

import os

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from helpers_kernels import (CPU_STAND_IN, ON_GPU, assert_within_pytorch_error, case_without_interpreter,  # noqa: F401
                             gpu_only, kernel_process, record_launches, variants)
from nanogpt2.kernels import int4_linear, int8_linear
from nanogpt2.kernels.quant_matmul import _int8_to_f32, _nibble_to_f32_minus_8

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _qm():
    import sys

    return sys.modules["nanogpt2.kernels.quant_matmul"]


# ---------------------------------------------------------------------------------------------
# Inputs, references and case bodies (module level, so the worker can import them)
# ---------------------------------------------------------------------------------------------


def make_int8(N, K, dtype, seed=0):
    """A random int8 weight over the whole range [-127, 127] and per-feature scales, as quantize.py makes."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    scales = (torch.rand(N, generator=g) * 0.02 + 0.005).to(dtype)
    return weight.to(DEVICE), scales.to(DEVICE)


def make_int4(N, K, group_size, dtype, seed=0):
    """Random packed nibbles (every byte value) and per-group scales and zeros."""
    g = torch.Generator().manual_seed(seed)
    qweight = torch.randint(0, 256, (N, K // 2), generator=g, dtype=torch.uint8)
    scales = (torch.rand(N, K // group_size, generator=g) * 0.04 + 0.01).to(dtype)
    zeros = (torch.randn(N, K // group_size, generator=g) * 0.05).to(dtype)
    return qweight.to(DEVICE), scales.to(DEVICE), zeros.to(DEVICE)


def dequantized_int8(weight, scales):
    return weight.double() * scales.double()[:, None]


def dequantized_int4(qweight, scales, zeros, group_size):
    """The weight W[n, k] = (q − 8)·s + z in fp64, unpacked with integer arithmetic: an independent reading
    of the format (q[n, 2j] = byte % 16, q[n, 2j+1] = byte // 16)."""
    N, half = qweight.shape
    q = torch.empty(N, 2 * half, dtype=torch.float64, device=qweight.device)
    q[:, 0::2] = (qweight.long() % 16).double()
    q[:, 1::2] = (qweight.long() // 16).double()
    group = torch.arange(2 * half, device=qweight.device) // group_size
    return (q - 8) * scales.double()[:, group] + zeros.double()[:, group]


def _check(name, got, x, W, bias, dtype):
    """got vs x·Wᵀ (+ bias) in fp64; fp16/bf16 by the PyTorch-error rule, fp32 tightly."""
    assert got.dtype == x.dtype and got.shape == (*x.shape[:-1], W.shape[0]), (name, got.dtype, got.shape)
    ref = x.double() @ W.T
    if bias is not None:
        ref = ref + bias.double()
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-5, msg=lambda m: f"{name}: {m}")
    else:
        pytorch = F.linear(x, W.to(dtype), bias)
        assert_within_pytorch_error(name, got, ref, pytorch)


# x shapes: (…, K). GEMV: one row, three rows (two leading dims). GEMM: two tiles of rows plus a ragged one.
GEMV_ROWS = [(1,), (2, 1)]
GEMM_ROWS = [(20,), (2, 9)]


def _case_int8(kernel, dtype):
    """int8_linear over N = 35 (odd, not a multiple of the block) and 1, K = 72 (a ragged last K-step) and
    64 (none), with and without bias, strided x."""
    rows = GEMV_ROWS if kernel == "gemv" else GEMM_ROWS
    torch.manual_seed(0)
    for i, (N, K) in enumerate([(35, 72), (1, 64)]):
        weight, scales = make_int8(N, K, dtype, seed=i)
        W = dequantized_int8(weight, scales)
        for j, lead in enumerate(rows):
            x = torch.randn(*lead, K, device=DEVICE).to(dtype)
            bias = torch.randn(N, device=DEVICE).to(dtype) if (i + j) % 2 == 0 else None
            _check(f"int8 {kernel} N={N} K={K} x{tuple(x.shape)}", int8_linear(x, weight, scales, bias, kernel=kernel),
                   x, W, bias, dtype)
    # a strided x: every other column of a wider tensor (the kernels read x through its strides)
    weight, scales = make_int8(35, 72, dtype)
    x = torch.randn(rows[0][0], 144, device=DEVICE).to(dtype)[:, ::2]
    got = int8_linear(x, weight, scales, kernel=kernel)
    _check(f"int8 {kernel} strided x", got, x, dequantized_int8(weight, scales), None, dtype)


def _case_int4(kernel, dtype, group_size):
    """int4_linear with K = 3 groups (the interpreter's GEMV takes 2 groups a step: a ragged last one), N = 35,
    with and without bias; scales in fp32 whatever x's dtype once."""
    rows = GEMV_ROWS if kernel == "gemv" else GEMM_ROWS
    torch.manual_seed(group_size)
    N, K = 35, 3 * group_size
    for j, lead in enumerate(rows):
        scale_dtype = torch.float32 if j == 1 else dtype
        qweight, scales, zeros = make_int4(N, K, group_size, scale_dtype, seed=j)
        W = dequantized_int4(qweight, scales, zeros, group_size)
        x = torch.randn(*lead, K, device=DEVICE).to(dtype)
        bias = torch.randn(N, device=DEVICE).to(dtype) if j == 0 else None
        got = int4_linear(x, qweight, scales, zeros, group_size, bias, kernel=kernel)
        _check(f"int4 g={group_size} {kernel} x{tuple(x.shape)}", got, x, W, bias, dtype)


def _case_value_conversions():
    """The kernels' integer-to-float tricks on every value they can see: int8 -128…127 and nibbles 0…15."""
    q = torch.arange(-128, 128, dtype=torch.int8, device=DEVICE)
    out = torch.empty(256, dtype=torch.float32, device=DEVICE)
    _convert_kernel[(1,)](q, out, NIBBLE=False, BLOCK=256)
    assert torch.equal(out, q.float()), out
    n = torch.arange(0, 16, dtype=torch.int32, device=DEVICE)
    out = torch.empty(16, dtype=torch.float32, device=DEVICE)
    _convert_kernel[(1,)](n, out, NIBBLE=True, BLOCK=16)
    assert torch.equal(out, n.float() - 8), out


@triton.jit
def _convert_kernel(IN, OUT, NIBBLE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    v = tl.load(IN + offs)
    if NIBBLE:
        f = _nibble_to_f32_minus_8(v)
    else:
        f = _int8_to_f32(v)
    tl.store(OUT + offs, f)


def _case_dispatch():
    """kernel=None: the GEMV up to GEMV_MAX_M rows of x (counted over all leading dims), the GEMM above."""
    qm = _qm()
    weight, scales = make_int8(40, 64, torch.float32)
    qweight, s4, z4 = make_int4(40, 64, 32, torch.float32)
    kernels = (qm._int8_gemv_kernel, qm._int8_gemm_kernel, qm._int4_gemv_kernel, qm._int4_gemm_kernel)
    picked = {}
    for lead in [(1,), (2, 2), (qm.GEMV_MAX_M + 1,), (3, 7)]:
        x = torch.randn(*lead, 64, device=DEVICE)
        with record_launches(*kernels, execute=False) as launches:
            int8_linear(x, weight, scales)
            int4_linear(x, qweight, s4, z4, 32)
        picked[lead] = sorted(launch.name for launch in launches)
    return picked


def _case_compiles_once():
    """Decoding (M = 1…4) compiles each GEMV once, and prefill lengths each GEMM once per tile config:
    M is exempt from Triton's int specialisation. Returns {kernel: variants}."""
    qm = _qm()
    dtype = torch.float16 if ON_GPU else torch.float32
    weight, scales = make_int8(48, 64, dtype)
    qweight, s4, z4 = make_int4(48, 64, 32, dtype)
    kernels = (qm._int8_gemv_kernel, qm._int8_gemm_kernel, qm._int4_gemv_kernel, qm._int4_gemm_kernel)
    with torch.no_grad(), record_launches(*kernels, execute=ON_GPU) as launches:
        for M in list(range(1, 41)) + [64, 100, 128, 300, 512]:
            x = torch.randn(M, 64, device=DEVICE).to(dtype)
            int8_linear(x, weight, scales)
            int4_linear(x, qweight, s4, z4, 32)
    configs = {(launch.name, tuple(sorted((k, v) for k, v in launch.kwargs.items() if k.startswith("BLOCK"))))
               for launch in launches}
    tile_configs = {}
    for name, _ in configs:
        tile_configs[name] = tile_configs.get(name, 0) + 1
    return variants(launches), tile_configs


def _case_autograd(fmt):
    """dx and dbias (the adapter-training path) against autograd through the fp64 reference; the integer
    weights get no gradient."""
    torch.manual_seed(1)
    N, K = 24, 64
    x = torch.randn(2, 3, K, device=DEVICE, requires_grad=True)
    bias = torch.randn(N, device=DEVICE, requires_grad=True)
    if fmt == "int8":
        weight, scales = make_int8(N, K, torch.float32)
        y = int8_linear(x, weight, scales, bias)
        W = dequantized_int8(weight, scales)
    else:
        qweight, scales, zeros = make_int4(N, K, 32, torch.float32)
        y = int4_linear(x, qweight, scales, zeros, 32, bias)
        W = dequantized_int4(qweight, scales, zeros, 32)
    dy = torch.randn_like(y)
    dx, db = torch.autograd.grad(y, (x, bias), dy)
    x64, b64 = x.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    dx_ref, db_ref = torch.autograd.grad(x64 @ W.T + b64, (x64, b64), dy.double())
    torch.testing.assert_close(dx.double(), dx_ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(db.double(), db_ref, atol=1e-4, rtol=1e-5)


def _case_torch_compile(backend, mode=None):
    """torch.compile(fullgraph=True) of a function calling both ops, decode and prefill shapes, forward and
    backward: one custom op each, no graph break (fullgraph raises on one), eager's numbers."""
    dtype = torch.float16 if ON_GPU else torch.float32
    N, K = 48, 64
    weight, scales = make_int8(N, K, dtype)
    qweight, s4, z4 = make_int4(N, K, 32, dtype)
    bias = torch.randn(N, device=DEVICE).to(dtype)

    def layer(x):
        return int8_linear(x, weight, scales, bias) * 0.5 + int4_linear(x, qweight, s4, z4, 32)

    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=backend, mode=mode, fullgraph=True)
    # bit for bit on CPU; on a GPU Inductor compiles the kernels itself: allow one unit in the last place
    tol = 4 * torch.finfo(dtype).eps if backend == "inductor" else 0.0
    # CUDA graph trees warm up on the first call, record on the second, replay from the third on
    calls = [(1, 1), (1, 1), (1, 1), (2, 9), (1, 1)] if mode else [(1, 1), (2, 9)]
    for lead in calls:
        x = torch.randn(*lead, K, device=DEVICE).to(dtype)
        torch.testing.assert_close(compiled(x), layer(x), atol=tol, rtol=tol, msg=lambda m: f"{backend} {lead}: {m}")
    if mode is None:  # the registered backward, traced by AOTAutograd
        x = torch.randn(2, 9, K, device=DEVICE).to(dtype).requires_grad_()
        (got,) = torch.autograd.grad(compiled(x).float().sum(), x)
        (want,) = torch.autograd.grad(layer(x).float().sum(), x)
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def _case_traced_as_triton_ops():
    """The GPU registration (torch.library.triton_op), traced on CPU: TRITON_INTERPRET unset, a stand-in
    Triton driver that reports an sm_90 target, launches recorded but not run, GPU tile configs. Each launch
    must become a triton_kernel_wrapper_functional node (what Inductor compiles) that copies only the output
    (never x or the weights). Returns {kernel name: tensors it clones}."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from triton.backends.compiler import GPUTarget

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
    qm = _qm()
    qm._runs_on = lambda device: True  # accept CPU tensors; the configs stay the GPU's
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    backend = aot_autograd(fw_compiler=keep_graph, bw_compiler=keep_graph)
    N, K = 48, 128
    weight, scales = make_int8(N, K, torch.bfloat16)
    qweight, s4, z4 = make_int4(N, K, 64, torch.bfloat16)

    def layer(x):
        return int8_linear(x, weight, scales) + int4_linear(x, qweight, s4, z4, 64)

    kernels = (qm._int8_gemv_kernel, qm._int8_gemm_kernel, qm._int4_gemv_kernel, qm._int4_gemm_kernel)
    with record_launches(*kernels, execute=False):
        for M in (1, 64):
            torch.compile(layer, backend=backend, fullgraph=True)(torch.randn(M, K, dtype=torch.bfloat16))
    clones = {}
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
                kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
                while not hasattr(kernel, "arg_names"):  # num_warps/num_stages arrive as a one-config autotuner
                    kernel = kernel.fn
                clones[kernel.fn.__name__] = sorted(node.kwargs["tensors_to_clone"])
    return clones


# ---------------------------------------------------------------------------------------------
# Tests (interpreter on CPU; compiled on a GPU)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
def test_int8_matches_reference(kernel_process, kernel, dtype):
    kernel_process.run(_case_int8, kernel, dtype)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("kernel", ["gemv", "gemm"])
def test_int4_matches_reference(kernel_process, kernel, dtype, group_size):
    kernel_process.run(_case_int4, kernel, dtype, group_size)


def test_integer_to_float_tricks_are_exact(kernel_process):
    kernel_process.run(_case_value_conversions)


def test_rows_pick_the_kernel(kernel_process):
    qm = _qm()
    picked = kernel_process.run(_case_dispatch)
    gemv, gemm = ["_int4_gemv_kernel", "_int8_gemv_kernel"], ["_int4_gemm_kernel", "_int8_gemm_kernel"]
    assert picked == {(1,): gemv, (2, 2): gemv if qm.GEMV_MAX_M >= 4 else gemm,
                      (qm.GEMV_MAX_M + 1,): gemm, (3, 7): gemm}, picked


def test_row_counts_compile_once(kernel_process):
    counts, configs = kernel_process.run(_case_compiles_once)
    # one variant per tile config: under the interpreter one config each, so one variant each
    assert counts == configs, (counts, configs)
    assert counts["_int8_gemv_kernel"] == counts["_int4_gemv_kernel"] == 1, counts


@gpu_only
def test_row_counts_compile_once_gpu(kernel_process, capsys):  # real compiles; the GEMM's tile grows with M
    counts, configs = kernel_process.run(_case_compiles_once)
    with capsys.disabled():
        print(f"\ncompiled variants over M = 1…512: {counts} (tile configs: {configs})")
    assert counts == configs, (counts, configs)
    assert counts["_int8_gemv_kernel"] == counts["_int4_gemv_kernel"] == 1, counts


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_gradients_for_adapters(kernel_process, fmt):
    kernel_process.run(_case_autograd, fmt)


# Under the interpreter the ops are opaque custom ops (kernels/_ops.py): "eager" checks Dynamo (one op, no
# graph break), "aot_eager" AOTAutograd (the registered backward). On a GPU Inductor compiles the kernels.
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_fullgraph(kernel_process, backend):
    kernel_process.run(_case_torch_compile, backend)


@pytest.mark.skipif(**CPU_STAND_IN)
def test_gpu_registration_traces_into_kernel_nodes():
    """torch.compile on a GPU sees the kernels through triton_op; check that path on CPU in a fresh
    interpreter-free process (TRITON_INTERPRET is read once, at import)."""
    clones = case_without_interpreter("test_quant_matmul", "_case_traced_as_triton_ops")
    assert clones == {name: ["Out"] for name in ("_int8_gemv_kernel", "_int8_gemm_kernel",
                                                  "_int4_gemv_kernel", "_int4_gemm_kernel")}, clones


def test_gpu_configs_fit_the_kernels(monkeypatch):
    """Every GPU config the launcher can pick: int4 K-steps inside one group, tl.dot's 16-row minimum, no
    tile taller than the rows (up to 128), and a GEMV K-step of whole groups."""
    qm = _qm()
    monkeypatch.setattr(qm, "_INTERPRET", False)
    monkeypatch.setattr(qm._ops, "num_sms", lambda device: 132)
    for M in (5, 16, 17, 33, 64, 100, 512, 4096):
        for dtype in DTYPES.values():
            for group_size in (None, *qm.GROUP_SIZES):
                for N in (768, 2304, 50257):
                    configs = qm._gemm_configs(M, N, dtype, group_size, "cuda")
                    assert configs, (M, N, dtype)
                    for c in configs:
                        assert min(c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]) >= 16, c
                        assert c["BLOCK_M"] <= max(16, triton.next_power_of_2(M)), (M, c)
                        if group_size:
                            assert group_size % c["BLOCK_K"] == 0 and c["BLOCK_K"] >= 32, (group_size, c)
    for N, K in ((768, 768), (2304, 768), (768, 3072), (50257, 1600)):
        c = qm._gemv_config(N, K, None, "cuda")
        assert c["BLOCK_K"] in (256, 512) and c["EVEN_K"] == (K % c["BLOCK_K"] == 0), c
        for group_size in qm.GROUP_SIZES:
            if K % group_size == 0:
                c = qm._gemv_config(N, K, group_size, "cuda")
                assert c["GROUPS"] * group_size <= 512 and c["EVEN_GROUPS"] == ((K // group_size) % c["GROUPS"] == 0)


def test_launch_falls_back_to_smaller_tiles_when_shared_memory_runs_out():
    """A GPU with less shared memory than the first config needs must still run: OutOfResources at compile
    time, then the next config; the choice is remembered per key."""
    from triton.runtime.errors import OutOfResources

    ops = _qm()._ops
    launched = []

    class FakeKernel:
        def __getitem__(self, grid):
            def launch(*args, BLOCK_M, **kwargs):
                if BLOCK_M > 64:
                    raise OutOfResources(BLOCK_M * 1024, 64 * 1024, "shared memory")
                launched.append((grid, BLOCK_M))
            return launch

    configs = [dict(BLOCK_M=128, num_warps=8), dict(BLOCK_M=64, num_warps=4), dict(BLOCK_M=16, num_warps=4)]
    key = ("fake", "test")
    try:
        for _ in range(2):
            got = ops.launch_first_fit(key, FakeKernel(), configs, lambda c: (1000 // c["BLOCK_M"],), (), {})
            assert got == configs[1]
        assert launched == [((15,), 64), ((15,), 64)] and ops._FIRST_FIT[key] == 1
    finally:
        ops._FIRST_FIT.pop(key, None)


# -- input validation: these raise before any kernel launches, so they run in-process -----------


def _int8_args(N=8, K=64, **over):
    weight, scales = make_int8(N, K, torch.float32)
    args = dict(x=torch.randn(2, K, device=DEVICE), weight=weight, scales=scales, bias=None)
    args.update(over)
    return args


def _int4_args(N=8, K=64, group_size=32, **over):
    qweight, scales, zeros = make_int4(N, K, group_size, torch.float32)
    args = dict(x=torch.randn(2, K, device=DEVICE), qweight=qweight, scales=scales, zeros=zeros,
                group_size=group_size, bias=None)
    args.update(over)
    return args


@pytest.mark.parametrize("over,match", [
    (dict(weight=torch.zeros(8, 64, dtype=torch.uint8)), r"weight has dtype torch.uint8; valid: torch.int8"),
    (dict(weight=torch.zeros(8, 64, 1, dtype=torch.int8)), r"weight must be 2-D .* got shape \(8, 64, 1\)"),
    (dict(x=torch.randn(2, 65)), r"K = 64 in-features \(weight is 8×64\); got last dim 65"),
    (dict(x=torch.randn(2, 64, dtype=torch.float64)), r"x has dtype torch.float64; valid: torch.float32"),
    (dict(x=torch.tensor(1.0)), r"x must be \(\.\.\., K\) .* got a 0-d tensor"),
    (dict(scales=torch.ones(7)), r"scales must have shape \(8,\), got \(7,\)"),
    (dict(scales=torch.ones(8, dtype=torch.int32)), r"scales has dtype torch.int32"),
    (dict(bias=torch.ones(9)), r"bias must have shape \(8,\), got \(9,\)"),
    (dict(weight=torch.zeros(64, 8, dtype=torch.int8).T), r"weight must be contiguous \(shape \(8, 64\)"),
    (dict(scales=torch.ones(16)[::2]), r"scales must be contiguous"),
    (dict(scales=torch.ones(8, device="meta")), r"scales is on meta but x is on"),
])
def test_int8_rejects_bad_inputs(over, match):
    args = _int8_args(**over)
    with pytest.raises((ValueError, TypeError), match=match):
        int8_linear(args["x"], args["weight"], args["scales"], args["bias"])


@pytest.mark.parametrize("over,match", [
    (dict(qweight=torch.zeros(8, 32, dtype=torch.int8)), r"qweight has dtype torch.int8; valid: torch.uint8"),
    (dict(x=torch.randn(2, 63)), r"K \(x's last dim\) must be even; got 63"),
    (dict(x=torch.randn(2, 66)), r"K = 64 in-features \(qweight is 8×32 bytes\); got last dim 66"),
    (dict(group_size=48), r"group_size must be one of \(32, 64, 128\), got 48"),
    (dict(group_size=True), r"group_size must be one of .* got True"),
    (dict(K=96, group_size=64, scales=torch.ones(8, 1), zeros=torch.ones(8, 1)),
     r"group_size 64 does not divide K = 96 in-features \(valid here: \[32\]\)"),
    (dict(scales=torch.ones(8, 3)), r"scales must have shape \(8, 2\), got \(8, 3\)"),
    (dict(zeros=torch.ones(8, 2, dtype=torch.uint8)), r"zeros has dtype torch.uint8"),
    (dict(qweight=torch.zeros(32, 8, dtype=torch.uint8).T), r"qweight must be contiguous"),
    (dict(zeros=torch.ones(8, 2, device="meta")), r"zeros is on meta but x is on"),
])
def test_int4_rejects_bad_inputs(over, match):
    args = _int4_args(**{k: v for k, v in over.items() if k in ("K", "group_size")})
    args.update({k: v for k, v in over.items() if k != "K"})
    with pytest.raises((ValueError, TypeError), match=match):
        int4_linear(args["x"], args["qweight"], args["scales"], args["zeros"], args["group_size"], args["bias"])


def test_rejects_an_unknown_kernel_name():
    args = _int8_args()
    with pytest.raises(ValueError, match=r"kernel must be None \(pick by rows\), 'gemv' or 'gemm'; got 'gemvv'"):
        int8_linear(args["x"], args["weight"], args["scales"], kernel="gemvv")


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(_qm(), "_INTERPRET", False)
    args = _int8_args()
    with pytest.raises(ValueError, match=r"x is on cpu; the Triton kernels need CUDA tensors"):
        int8_linear(*(args[k].cpu() for k in ("x", "weight", "scales")))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mismatch with")
def test_rejects_device_mismatch():
    args = _int8_args()
    with pytest.raises(ValueError, match=r"weight is on cpu but x is on cuda"):
        int8_linear(args["x"], args["weight"].cpu(), args["scales"])


def test_empty_inputs_launch_nothing():
    weight, scales = make_int8(8, 64, torch.float32)
    assert int8_linear(torch.randn(0, 64, device=DEVICE), weight, scales).shape == (0, 8)
    assert int8_linear(torch.randn(2, 0, 64, device=DEVICE), weight, scales).shape == (2, 0, 8)
    # no in-features: y is the bias (or zeros), as F.linear gives
    bias = torch.randn(8, device=DEVICE)
    empty = torch.zeros(8, 0, dtype=torch.int8, device=DEVICE)
    assert torch.equal(int8_linear(torch.randn(3, 0, device=DEVICE), empty, scales, bias), bias.expand(3, 8))
    assert torch.equal(int8_linear(torch.randn(3, 0, device=DEVICE), empty, scales), torch.zeros(3, 8, device=DEVICE))


# -- GPU only: GPT-2's shapes in bf16/fp16/fp32 with resources, Inductor, CUDA graphs, speed --------------

# (K, N): GPT-2's c_attn (GEMV with BLOCK_N = 8, K in 256-wide steps), mlp.c_proj (BLOCK_N = 4, 512-wide steps),
# gpt2-xl's lm_head (BLOCK_N = 16, an odd N, K = 1600 with a ragged last step, 25 int4 groups)
GPU_SHAPES = [(768, 2304), (3072, 768), (1600, 50257)]
GPU_CASES = [(dtype, K, N) for dtype in ("bf16", "fp16") for K, N in GPU_SHAPES] + [("fp32", 768, 2304)]


def _case_gpt2_shape(dtype_name, K, N):
    """Both formats (int4 with group 64) and both kernels at one GPT-2 shape, M = 1 (decode), 5 (just past
    GEMV_MAX_M) and 512 (prefill), each row also through the other kernel. Returns the resource rows of every
    kernel variant it compiled: (kernel, dtype, tile, warps, stages, registers, spills, shared bytes), and
    the GEMM configs that did not fit (fell back)."""
    qm = _qm()
    dtype = DTYPES[dtype_name]
    weight, scales = make_int8(N, K, dtype)
    qweight, s4, z4 = make_int4(N, K, 64, dtype)
    W8, W4 = dequantized_int8(weight, scales), dequantized_int4(qweight, s4, z4, 64)
    bias = torch.randn(N, device=DEVICE).to(dtype)
    kernels = (qm._int8_gemv_kernel, qm._int8_gemm_kernel, qm._int4_gemv_kernel, qm._int4_gemm_kernel)
    with record_launches(*kernels) as launches:
        for M in (1, 5, 512):
            x = torch.randn(M, K, device=DEVICE).to(dtype)
            for kernel in (None, "gemm" if M <= qm.GEMV_MAX_M else "gemv"):
                name = f"{dtype_name} K={K} N={N} M={M} {kernel or 'auto'}"
                _check("int8 " + name, int8_linear(x, weight, scales, bias, kernel=kernel), x, W8, bias, dtype)
                _check("int4 " + name, int4_linear(x, qweight, s4, z4, 64, bias, kernel=kernel), x, W4, bias, dtype)
    rows, seen = [], set()
    for launch in launches:
        if id(launch.compiled) in seen:
            continue
        seen.add(id(launch.compiled))
        compiled = launch.compiled
        getattr(compiled, "_init_handles", lambda: None)()  # loaded at first launch; a no-op after
        kw = launch.kwargs
        tile = "x".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUPS") if k in kw)
        rows.append((launch.name, dtype_name, f"{K}x{N}", tile, kw.get("num_warps", 4), kw.get("num_stages", "-"),
                     compiled.n_regs, compiled.n_spills, compiled.metadata.shared))
    fallbacks = {str(key): i for key, i in qm._ops._FIRST_FIT.items() if i != 0 and str(key[0]).endswith("_gemm")}
    return rows, fallbacks


def _case_cuda_graph_replay():
    """A decode step (M = 1) captured once and replayed on new inputs written into the same tensor."""
    N, K = 2304, 768
    weight, scales = make_int8(N, K, torch.bfloat16)
    qweight, s4, z4 = make_int4(N, K, 64, torch.bfloat16)
    x = torch.randn(1, K, device=DEVICE).to(torch.bfloat16)

    def step():
        return int8_linear(x, weight, scales) + int4_linear(x, qweight, s4, z4, 64)

    step()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in range(3):
        torch.manual_seed(seed)
        x.copy_(torch.randn(1, K, device=DEVICE))
        graph.replay()
        torch.testing.assert_close(out, step(), atol=0, rtol=0)


@gpu_only
@pytest.mark.parametrize("dtype,K,N", GPU_CASES)
def test_gpt2_shapes_gpu(kernel_process, capsys, dtype, K, N):
    """Correct at GPT-2's shapes, compiled; and every compiled variant's registers, spills and shared memory
    (printed: GPU.md's first-run list): no fp16/bf16 kernel spills, and every first GEMM config fits."""
    rows, fallbacks = kernel_process.run(_case_gpt2_shape, dtype, K, N)
    header = ("kernel", "dtype", "KxN", "tile", "warps", "stages", "regs", "spills", "shared B")
    with capsys.disabled():
        print("\n" + " ".join(f"{h:>10}" if i else f"{h:<18}" for i, h in enumerate(header)))
        for row in rows:
            print(" ".join(f"{str(c):>10}" if i else f"{c:<18}" for i, c in enumerate(row)))
    assert not fallbacks, f"the first GEMM config did not fit: {fallbacks}"
    spilling = [row for row in rows if row[1] != "fp32" and row[7] > 0]
    assert not spilling, f"fp16/bf16 kernels spill registers: {spilling}"


@gpu_only
def test_torch_compile_inductor_gpu(kernel_process):
    kernel_process.run(_case_torch_compile, "inductor")


@gpu_only
@pytest.mark.cuda_graphs
def test_torch_compile_cuda_graphs_gpu(kernel_process):  # mode="reduce-overhead": Inductor's CUDA graph trees
    kernel_process.run(_case_torch_compile, "inductor", "reduce-overhead")


@gpu_only
@pytest.mark.cuda_graphs
def test_cuda_graph_replay_gpu(kernel_process):
    kernel_process.run(_case_cuda_graph_replay)
