"""How a kernel file's launcher becomes a torch custom op, so torch.compile and CUDA graphs see one node.

A Triton launcher is Python that torch.compile should not trace line by line: the device guard
(`torch.cuda.device(...)`), cached device queries and the try/except that picks a config that fits
all break Dynamo's graph or run at the wrong time under capture. Registered as a custom op
(`torch.library.triton_op`, torch >= 2.6), the whole launcher is one opaque call to Dynamo; in
AOTAutograd/Inductor the op's body runs once, on fake tensors, and each `wrap_triton(kernel)[grid](...)`
becomes a node that Inductor compiles and launches itself (the "user-defined Triton kernels" of
https://pytorch.org/tutorials/recipes/torch_compile_user_defined_triton_kernel_tutorial.html).
Outside compile, the op runs the launcher as plain Python (torch disables the wrapping then).

Under TRITON_INTERPRET=1 (the CPU tests) a kernel is an InterpretedFunction that torch cannot trace,
so there the op is a plain `custom_op`: opaque to every compile stage, its fake (shape) function the
same launcher with the launches skipped. Same launchers, same shapes; only the registration differs.

Below those, what launchers share: the SM count, tl.dot's precision for fp32 inputs, and the walk down a
list of tile configs to the first one that fits the GPU's shared memory.
"""
import contextlib
import functools
import os

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.library import custom_op, triton_op, wrap_triton
from triton.runtime.errors import OutOfResources

# Triton reads TRITON_INTERPRET once, when it is imported; so do we.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def register(name):
    """Decorator: make `fn` (type-annotated, returns new tensors, mutates nothing) the custom op `name`."""
    def decorate(fn):
        if not INTERPRET:
            return triton_op(name, fn, mutates_args=())
        op = custom_op(name, fn, mutates_args=())
        op.register_fake(fn)  # launch() skips fake tensors, so fn is its own shape function
        return op
    return decorate


def launch(kernel):
    """`launch(kernel)[grid](*args, **kwargs)`: what a launcher calls instead of `kernel[grid](...)`."""
    if not INTERPRET:
        return wrap_triton(kernel)
    return _Interpreted(kernel)


class _Interpreted:
    """kernel[grid](...) under the interpreter, except on fake tensors (shape propagation), where it does nothing."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            if any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
                return None
            return self.kernel[grid](*args, **kwargs)
        return run


def on_device(t):
    """Launch on t's GPU (Triton launches on the current device), whatever device is current."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# -- shared by launchers: integer helpers, device facts, dot precision, the first config that fits ----------


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids. Plain Python: triton.cdiv is a constexpr_function in newer Tritons, whose
    argument unwrapping cost ~5 µs a call, ~20 µs of a decode launch's host time (measured on CPU)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1); plain Python, as cdiv."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=None)
def num_sms(device):
    """Streaming multiprocessors of a CUDA device (cached: a launcher asks on every call); 8 elsewhere,
    where it only sizes grids for the interpreter."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def dot_precision(dtype):
    """tl.dot's input_precision for fp32 inputs, following torch's own matmul setting
    (torch.set_float32_matmul_precision): "highest" gets IEEE fp32 products, "high"/"medium" TF32 tensor
    cores. fp16/bf16 inputs ignore it."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


_FIRST_FIT = {}  # key -> index of the first config that fitted this GPU


def launch_first_fit(key, kernel, configs, grid_for, args, constexprs):
    """kernel[grid_for(cfg)](*args, **constexprs, **cfg) with the first config that fits; the choice is
    remembered under `key` (which should name the kernel, the config list and the device).

    configs: dicts of constexprs plus num_warps/num_stages, best first. A config that needs more shared
    memory than the GPU has raises OutOfResources when it is compiled, before anything runs; the next is
    tried. Call it inside a custom op: eagerly it runs on every call; under torch.compile once, on fake
    tensors, where nothing raises and the config remembered from an eager call (else the first) is used.
    """
    first = _FIRST_FIT.get(key, 0)
    for i in range(first, len(configs)):
        try:
            kernel[grid_for(configs[i])](*args, **constexprs, **configs[i])
        except OutOfResources:
            if i == len(configs) - 1:
                raise
            continue
        _FIRST_FIT[key] = i
        return configs[i]
