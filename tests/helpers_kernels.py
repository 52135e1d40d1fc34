"""Shared by the kernel tests: the worker process their cases run in, a recorder of what Triton compiled,
and FlashAttention's accuracy rule for fp16/bf16.

Under TRITON_INTERPRET=1 an out-of-bounds access kills the whole process (on a GPU, it poisons the CUDA
context), so each kernel case runs in a spawned worker (one per test module, restarted if a case kills
it): a crash fails that one test, not the session. Case bodies must be module-level functions, so the
worker can import them.
"""
import contextlib
import multiprocessing
import os
import pickle
import traceback
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import pytest
import torch

# Compiled kernels: CUDA, and not forced onto the interpreter (tests/conftest.py picks TRITON_INTERPRET)
ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


# CPU stand-ins for GPU paths (a fake Triton driver, AOT compiles) skip where CUDA exists: the real thing runs there
CPU_STAND_IN = dict(condition=torch.cuda.is_available(), reason="a CPU stand-in for a GPU path; on a machine with "
                    "CUDA the GPU tests (test_torch_compile_inductor_gpu and the like) run the real one")


def gpu_only(test):
    """A test of the compiled kernels: marked `gpu` (tests/conftest.py; `make gpu-check` runs `-m gpu`),
    and skipped where CUDA exists but TRITON_INTERPRET=1 forces the interpreter."""
    skip = pytest.mark.skipif(not ON_GPU, reason="needs compiled kernels: CUDA, with TRITON_INTERPRET unset or 0")
    return pytest.mark.gpu(skip(test))


def _call(case, *args):
    """case(*args) in the worker. An exception that cannot be pickled back (torch.compile's InductorError holds
    closures) is re-raised as a RuntimeError carrying its whole traceback, instead of the pool's bare
    "cannot pickle 'cell' object"."""
    try:
        return case(*args)
    except Exception as e:
        try:
            pickle.loads(pickle.dumps(e))   # the round trip the pool makes: both halves can fail
        except Exception:
            raise RuntimeError("".join(traceback.format_exception(e))) from None
        raise


class KernelProcess:
    def __init__(self):
        self._pool = None

    def run(self, case, *args):
        if self._pool is None:  # "spawn": a fresh interpreter, not a fork of pytest's state
            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        try:
            return self._pool.submit(_call, case, *args).result()  # the child's exception re-raises here
        except BrokenProcessPool:
            self._pool = None
            pytest.fail(f"the kernel process died in {case.__name__}{args} "
                        "(under TRITON_INTERPRET an out-of-bounds access kills the process)")

    def close(self):
        if self._pool is not None:
            self._pool.shutdown()


@pytest.fixture(scope="module")
def kernel_process():
    proc = KernelProcess()
    yield proc
    proc.close()


def case_without_interpreter(module: str, case: str):
    """`module.case()` in a fresh process with TRITON_INTERPRET unset (Triton reads it once, at import, so the
    CPU paths that stand in for the GPU's need a process of their own); its result, sent back as JSON."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = f"import json, {module} as t; print(json.dumps(t.{case}()))"
    run = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.abspath(__file__)), env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def compile_in_parallel(case, jobs):
    """Run case(*job) for every job, in parallel spawned processes, to fill Triton's on-disk cache.

    Compiling is most of a first GPU run (a few seconds of ptxas per kernel variant, one after the
    other in the worker); compiled in parallel beforehand, each variant is then a disk-cache hit for the
    worker (Triton keys its cache on source, specialisation and options, not on the process)."""
    workers = max(1, min(len(jobs), (os.cpu_count() or 2) - 1))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in [pool.submit(case, *job) for job in jobs]:
            future.result()


# -- what Triton compiled: one record per launch ------------------------------------------------------


class Launch:
    """One launch of a Triton kernel: its name, the variant it ran (see record_launches), its grid, its
    arguments (keyword ones: constexprs and num_warps/num_stages) and, on a GPU, the compiled kernel."""

    def __init__(self, name, variant, grid, args, kwargs, compiled):
        self.name, self.variant, self.grid, self.args, self.kwargs = name, variant, grid, args, kwargs
        self.compiled = compiled


def _specialization_key(kernel, args, kwargs):
    """What Triton's JIT keys its compile cache on, computed as its binder does (runtime/jit.py,
    create_function_from_signature): each constexpr's value; for every other argument its type plus
    Triton's specialisation (an int equal to 1 becomes a constant, an int or pointer divisible by 16 is
    marked so), except the arguments named in do_not_specialize; and the launch options."""
    import inspect

    import triton.language as tl
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    params = inspect.signature(kernel.fn).parameters
    # a JITFunction keeps @jit's do_not_specialize as an attribute, an InterpretedFunction in .kwargs
    exempt = set(getattr(kernel, "do_not_specialize", None) or getattr(kernel, "kwargs", {}).get("do_not_specialize")
                 or ())
    bound = inspect.signature(kernel.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in params})
    key = []
    for name, param in params.items():
        value = bound.arguments[name]
        if param.annotation is tl.constexpr:
            key.append(("constexpr", value))
        else:
            key.append(tuple(native_specialize_impl(BaseBackend, value, False, name not in exempt, True)))
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in params))
    return tuple(key), options


@contextlib.contextmanager
def record_launches(*kernels, execute=True):
    """Record every launch of `kernels` (Triton @jit functions) as a Launch, by wrapping their `run`
    (what `kernel[grid](...)` calls). The variant of a launch is what Triton compiles once and reuses:
    on a GPU the compiled kernel object itself (a cache hit returns the same object); under the
    interpreter, which compiles nothing, the key Triton's JIT would cache it under. With execute=False
    (the interpreter only) nothing runs: counting variants over a thousand launches takes seconds."""
    launches = []

    def wrap(kernel, run):
        def recording_run(*args, grid, warmup, **kwargs):
            compiled = run(*args, grid=grid, warmup=warmup, **kwargs) if execute else None
            if compiled is not None:
                variant = compiled
            else:
                variant = _specialization_key(kernel, args, kwargs)
            launches.append(Launch(kernel.fn.__name__, variant, tuple(grid), args, kwargs, compiled))
            return compiled
        return recording_run

    saved = [(kernel, vars(kernel).get("run")) for kernel in kernels]
    for kernel in kernels:
        kernel.run = wrap(kernel, kernel.run)
    try:
        yield launches
    finally:
        for kernel, own_run in saved:
            if own_run is None:
                del kernel.run  # back to the class's method
            else:
                kernel.run = own_run


def variants(launches):
    """{kernel name: number of distinct compiled variants} over some launches."""
    seen = {}
    for launch in launches:
        seen.setdefault(launch.name, set()).add(id(launch.variant) if launch.compiled is not None else launch.variant)
    return {name: len(v) for name, v in sorted(seen.items())}


# -- FlashAttention's accuracy rule for fp16/bf16 -------------------------------------------------------


NOISE_FLOOR = 1e-5  # for values exactly 0 in exact arithmetic (dK at T = 1): fp32 accumulation noise only


def assert_within_pytorch_error(name, got, ref, pytorch):
    """The kernel's largest error against an fp64 reference is at most twice that of PyTorch's own
    attention in the same dtype, plus twice the rounding error of the reference in that dtype (the rule
    of FlashAttention's tests: tests/test_flash_attn.py in FA2, hopper/test_flash_attn.py in FA3, whose
    `out_ref + 0.3 - 0.3 - out_ref` floor this is) and NOISE_FLOOR. A flat atol would either pass a
    kernel worse than PyTorch's or fail one that is as good. Returns (kernel error, PyTorch error, floor)."""
    assert not got.isnan().any(), f"{name}: NaN"
    r = ref.to(got.dtype)
    floor = 2 * (r + 0.3 - 0.3 - r).abs().max().item() + NOISE_FLOOR
    err = (got.double() - ref).abs().max().item()
    base = (pytorch.double() - ref).abs().max().item()
    assert err <= 2 * base + floor, (f"{name}: max error {err:.3e} vs fp64 exceeds 2 × PyTorch's {base:.3e} "
                                     f"+ rounding floor {floor:.3e}")
    return err, base, floor
