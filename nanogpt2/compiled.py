"""generate(compile=True): a fixed-shape decode step, run through torch.compile, and the object that owns it.

    owner = compiled_decode(model)          # model.compiled_decode: made on first use, one per model
    step = owner.step(cache, kv_start)      # its StaticDecode runner for this shape, loaded with the prompt
    logits = step(token, mask)              # (N,) -> (N, V) fp32, as generation.decode_one_token; step.cache

The step never changes a shape or a Python number from token to token: it attends over the whole cache buffer
with a mask (AttentionMask.static_decode), writes its key/value at a position held in a tensor
(cache.StaticSlot), and keeps the lengths in int32 tensors updated in place. So dynamo traces one graph (no
breaks), per batch size and cache length; cache lengths are rounded up to multiples of COMPILE_BUCKET so that
prompts of different lengths share it. The price of fixed shapes is reading the whole buffer every step.

On CPU the weights are frozen into the graph (CPU_COMPILE_OPTIONS): constants that inductor prepacks, with its
own C++ micro-GEMM (for fp32/bf16/fp16; quantized models: cpu_compile_options), which streams them at the
machine's read bandwidth (BENCHMARKS.md).
Frozen constants bring two rules, both kept by `CompiledDecode`:
  - dynamo's guards do not look at tensor values, so a graph frozen for one model could run for another of
    the same shape (or for this one after an optimizer step). Each model gets its own copy of _static_step's
    code object (its own dynamo cache), and its weights are checked at every generate() call (_weights_state).
  - torch never frees a frozen graph: dynamo keeps compiled code and its guards reachable for the life of the
    process, and no public API releases them (a helper review measured ~3x the weight bytes retained per
    freeze, and each new shape, batch size or cache-length bucket, is one more freeze). That is the one place
    where state outlives its owner, forced by torch. So a model is frozen once per shape, for at most
    MAX_FROZEN_SHAPES shapes; after its weights change, or past that many shapes, it warns and runs the shared
    step, whose weights are graph inputs (correct, slower); `del model.compiled_decode` drops our reference, not
    torch's. Copies of the model (deepcopy) start without one.
On CUDA nothing is frozen: every model runs the shared step (one graph per shape, weights as inputs), and each
StaticDecode runner captures it in a CUDA graph on its first call: the cache, token, lengths and logits live at
static addresses, reused by every generate() call of that shape, so a token costs one graph replay. A graph
reads the weights where they were at capture: when a parameter moves (a new tensor, .to(), load_state_dict with
assign=True), the runners are dropped and captured again; in-place updates are simply read.
"""
from __future__ import annotations

import types
import warnings
import weakref
from collections import OrderedDict
from typing import Callable, Optional

import torch

from .attention import AttentionMask, static_positions
from .cache import KVCache, StaticSlot
from .packed import identity
from .quantization import QuantizedLinear

COMPILE_BUCKET = 128   # cache lengths are multiples of this (or n_positions), so nearby lengths share a graph

# inductor's options for the frozen CPU step. max_autotune lets it use its C++ micro-GEMM (CppMicroGemmFP32Vec),
# which for a decode step's GEMVs streams the weights at 26-44 GB/s, where oneDNN's packed path runs at 18-24 and
# MKL at ~16 on the 2-core machine of BENCHMARKS.md (read bandwidth ~33 GB/s). Only the C++ templates ("CPP"):
# with "CPP,ATEN" autotuning times each choice in a hot loop, the weight in cache, and in some processes picks
# MKL, which from memory is 2.3x slower end to end (31 vs 13 ms/token, 124M, 2026-11-28; pytorch issue #148494
# describes the same trap for int8). Without freezing, weights are graph inputs and inductor can only call MKL
# on them. The price: the first compile generates and builds a C++ kernel per matmul shape (~15-20 s for 124M on
# 2 cores). The templates take fp32/bf16/fp16 only, and "CPP" alone leaves a float64 matmul no choice at all, so
# other dtypes, and quantized models, get other backends: cpu_compile_options.
CPU_COMPILE_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP",
                       "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}  # quiet
TEMPLATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)   # inductor's C++ GEMM template's (2.13)


def cpu_compile_options(model: Optional[torch.nn.Module] = None) -> dict:
    """CPU_COMPILE_OPTIONS less the ones this torch's inductor does not have (older torch), read at call time,
    with the GEMM backends `model`'s weight-only layers need:
      int8  "ATEN" only: torch's aten._weight_int8pack_mm, not inductor's C++ template for it, which on torch
            2.13 decodes wrong tokens from the second step on for a 12-layer, 768-wide GPT-2 (6 layers, or 2 at
            that width, decode right; tests/test_compiled_decode.py) and has had correctness bugs before
            (pytorch issue #140208). It was ~10% faster than the op; a wrong token is not worth that.
      int4  "CPP,ATEN": the templates for the blocks' matrices, torch's int4 op for lm_head (no template takes
            its 50257 rows: "CPP" alone fails to compile).
    and a float model whose parameters are not all in TEMPLATE_DTYPES (float64) gets "CPP,ATEN" too."""
    from torch._inductor import config as inductor_config   # imported here: importing inductor takes seconds
    options = {k: v for k, v in CPU_COMPILE_OPTIONS.items() if hasattr(inductor_config, k)}
    if model is None:
        return options
    modes = {m.mode for m in model.modules() if isinstance(m, QuantizedLinear)}
    if "int8" in modes:
        options["max_autotune_gemm_backends"] = "ATEN"
    elif modes or any(p.dtype not in TEMPLATE_DTYPES for p in model.parameters() if p.is_floating_point()):
        options["max_autotune_gemm_backends"] = "CPP,ATEN"
    return options


def cache_length(n_positions: int, needed: int) -> int:
    """Positions to preallocate for a compiled step: the next multiple of COMPILE_BUCKET, capped at n_positions."""
    return min(n_positions, -(-needed // COMPILE_BUCKET) * COMPILE_BUCKET)


def _static_step(model, tokens, seqlens, kv_start, slot):
    """The traced function: tokens (N,), seqlens and kv_start int32 (N,) -> logits (N, V)."""
    mask = AttentionMask.static_decode(seqlens, kv_start, slot.cache.max_len)
    return model.decode_step(tokens, static_positions(seqlens, kv_start), mask, slot)


def _compile(fn: Callable, frozen: bool, model: Optional[torch.nn.Module] = None) -> Callable:
    """torch.compile, with the frozen-weights options for `model` when `frozen` (the one call; tests replace it
    to run the same step eagerly)."""
    compiled = torch.compile(fn, dynamic=False)
    if not frozen:
        return compiled
    from torch._inductor import config as inductor_config   # imported here: importing inductor takes seconds
    options = cpu_compile_options(model)

    def with_options(*args):   # the options apply to the compiles a call may trigger (a new batch or bucket)
        with inductor_config.patch(options):
            return compiled(*args)
    return with_options


_shared: list[Callable] = []   # the shared step, compiled on first use; it holds no model


def _shared_step() -> Callable:
    """One torch.compile of _static_step for every model: weights are graph inputs, so changed weights are
    simply read. CUDA uses this; so does a CPU model whose frozen weights went stale."""
    if not _shared:
        _shared.append(_compile(_static_step, frozen=False))
    return _shared[0]


def _weights_state(model) -> tuple:
    """What a frozen graph depends on: each parameter's identity (packed.identity) and shape, and the sum of its
    values (float64) for the edits no version counter sees (`p.data.mul_()`, inference tensors). One pass over
    the weights per generate() call: about one decode step's worth of memory traffic."""
    meta = tuple((*identity(p), p.shape) for p in model.parameters())
    sums = torch.stack([p.detach().sum(dtype=torch.float64) for p in model.parameters()])
    return meta, sums


def _same_state(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and torch.equal(a[1], b[1])


class CompiledDecode:
    """The compiled decode step of one model, what it was compiled against, and its static runners (one per batch
    size, cache length and dtype; see StaticDecode), reused across generate() calls."""

    MAX_RUNNERS = 4         # runners kept (least recently used dropped): each holds a KV cache and, on CUDA, a graph
    MAX_FROZEN_SHAPES = 4   # CPU: shapes given frozen graphs; each keeps a copy of the weights for good (module doc)

    def __init__(self, model):
        self.model_ref = weakref.ref(model)   # whose step this is; a deepcopy of the model carries a stale one
        self.device_type = model.device.type
        self.frozen_state: Optional[tuple] = None   # the weights frozen into self.fn; None when not frozen
        if self.device_type == "cpu":
            own_code = types.FunctionType(_static_step.__code__.replace(), _static_step.__globals__, "_static_step")
            self.fn = _compile(own_code, frozen=True, model=model)
            self.frozen_state = _weights_state(model)
        else:
            self.fn = _shared_step()
        self.runners: OrderedDict[tuple, StaticDecode] = OrderedDict()
        self.frozen_shapes: set[tuple] = set()
        self.captured_weights: Optional[tuple] = None   # CUDA graphs read the weights at these addresses

    def belongs_to(self, model) -> bool:
        return self.model_ref() is model and self.device_type == model.device.type

    def step(self, cache: KVCache, kv_start: Optional[torch.Tensor]) -> "StaticDecode":
        """The static runner for one generate() call, loaded with the prompt's `cache` and padding. Checks first
        that the frozen weights are still the model's (if not: a warning, and the shared step from then on), and
        that CUDA graphs still point at the model's weights (if not: the runners are dropped, to capture again)."""
        model = self.model_ref()
        if self.frozen_state is not None and not _same_state(self.frozen_state, _weights_state(model)):
            self.frozen_state, self.fn = None, _shared_step()
            self.runners.clear()
            warnings.warn("generate(compile=True): this model's weights changed since its decode step was compiled "
                          "with frozen weights; it now runs a compiled step that reads the weights as inputs "
                          "(correct, but on CPU slower than pack_weights). A model is frozen once per process: "
                          "frozen graphs are never freed, so refreezing after every change would leak memory.",
                          stacklevel=4)
        if self.device_type == "cuda":
            addresses = tuple(identity(p)[::2] for p in model.parameters())   # (data_ptr, dtype): values are read
            if addresses != self.captured_weights:                           # live, addresses are baked in
                self.runners.clear()
                self.captured_weights = addresses
        key = (cache.batch_size, cache.max_len, cache.k.dtype, cache.k.device)
        runner = self.runners.get(key)
        if runner is not None and runner.busy:   # another decode of this shape is still running (an open
            runner = StaticDecode(model, self._fn_for(key), cache)   # stream, a generate inside a streamer):
        else:                                                        # it gets a runner of its own, not kept
            if runner is None:
                runner = StaticDecode(model, self._fn_for(key), cache)
            self.runners.pop(key, None)
            self.runners[key] = runner                               # most recently used last
            while len(self.runners) > self.MAX_RUNNERS:
                self.runners.popitem(last=False)
        runner.load(cache, kv_start)
        return runner

    def _fn_for(self, key: tuple) -> Callable:
        """The step function for a new shape. Each shape the frozen function meets is one more frozen graph,
        kept for the life of the process (module doc); past MAX_FROZEN_SHAPES, new shapes run the shared step."""
        if self.frozen_state is None:
            return self.fn
        if key not in self.frozen_shapes and len(self.frozen_shapes) >= self.MAX_FROZEN_SHAPES:
            warnings.warn(f"generate(compile=True): this model has frozen decode graphs for "
                          f"{self.MAX_FROZEN_SHAPES} shapes (batch size, cache length) already; {key[:2]} runs "
                          "the shared compiled step (weights as inputs: correct, slower on CPU), as every frozen "
                          "graph holds its own copy of the weights until the process exits", stacklevel=5)
            return _shared_step()
        self.frozen_shapes.add(key)
        return self.fn

    def __deepcopy__(self, memo) -> None:
        """A copy of the model compiles its own step on first use: runners hold KV caches and CUDA graphs, which
        belong to this model (and a CUDA graph cannot be copied)."""
        return None

    def __reduce__(self):
        return (_none, ())


def _none() -> None:
    return None


def compiled_decode(model) -> CompiledDecode:
    """The model's CompiledDecode, kept as `model.compiled_decode` (an attribute you can see and delete); made on
    first use, and again for a copy of the model or after a move between devices."""
    owner = getattr(model, "compiled_decode", None)
    if owner is None or not owner.belongs_to(model):
        owner = CompiledDecode(model)
        model.compiled_decode = owner
    return owner


class StaticDecode:
    """A fixed-shape decode step with every input and output at a static address: (token (N,), mask) -> logits
    (N, V) fp32, the same tensor each call.

    The KV cache, the token, the lengths (int32 (N,): valid positions and padding per row) and the logits are
    allocated once per batch size, cache length and dtype, and reused by every generate() call of that shape:
    `load` copies a prompt's prefilled cache in, and each call writes its inputs in place. On CUDA the first call
    captures the step in a CUDA graph (torch.cuda.CUDAGraph, as gpt-fast does with mode="reduce-overhead"), and
    every later call, of this generate() or the next, is one graph replay: no Python, no launches per layer, no
    allocation. On CPU the same buffers are used and the step runs directly. The padding mask argument is
    ignored: `seqlens` and `kv_start` say the same thing in fixed-shape tensors.
    """

    def __init__(self, model, fn: Callable, like: KVCache):
        L, N, H, S, D = like.k.shape                     # layers, rows, heads, positions, head dim
        dev = like.k.device
        self.model, self.fn = model, fn
        self.cache = KVCache(L, N, H, S, D, dtype=like.k.dtype, device=dev)
        self.slot = StaticSlot(self.cache)
        self.token = torch.zeros(N, dtype=torch.long, device=dev)
        self.seqlens = torch.zeros(N, dtype=torch.int32, device=dev)
        self.kv_start = torch.zeros(N, dtype=torch.int32, device=dev)
        self.logits: Optional[torch.Tensor] = None       # (N, V) fp32, made by the first call
        self.graph = None                                # torch.cuda.CUDAGraph once captured
        self.busy = False                                # between load() and release(): one decode at a time

    def load(self, cache: KVCache, kv_start: Optional[torch.Tensor]) -> None:
        """Take over a prefilled cache: its written positions and each row's padding count (None: no padding)."""
        n = cache.length
        self.cache.k[:, :, :, :n].copy_(cache.k[:, :, :, :n])
        self.cache.v[:, :, :, :n].copy_(cache.v[:, :, :, :n])
        self.cache.length = n
        if kv_start is None:
            self.kv_start.zero_()
        else:
            self.kv_start.copy_(kv_start)
        self.busy = True

    def release(self) -> None:
        """The decode that loaded this runner is over (generation calls it when its loop ends, however it ends)."""
        self.busy = False

    def _run(self) -> torch.Tensor:
        return self.fn(self.model, self.token, self.seqlens, self.kv_start, self.slot).float()

    def __call__(self, token: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        past = self.cache.length
        if past >= self.cache.max_len:
            raise ValueError(f"KV cache is full: {past} cached positions, max_len {self.cache.max_len}")
        self.token.copy_(token)
        self.slot.write_at.fill_(past)
        self.seqlens.fill_(past + 1)
        if self.graph is not None:
            self.graph.replay()
        elif self.cache.k.is_cuda:
            self._capture()
        elif self.logits is None:
            self.logits = self._run()
        else:
            self.logits.copy_(self._run())
        self.cache.advance(1)
        return self.logits

    def _capture(self) -> None:
        """Warm up on a side stream (compiles, autotunes, allocates lazily made state), then record one step into
        a CUDA graph; recording does not run it, so replay once for this call. The warm-up runs write this step's
        key and value into the cache, the same values the replay writes again."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._run()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._run()
        self.graph.replay()
