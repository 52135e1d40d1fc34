"""CPU inference with oneDNN-packed weights: the matmuls of decoding, at up to twice the speed.

A decode step multiplies one row per sequence by every weight matrix: a GEMV, bound by how fast the weights
stream from memory. PyTorch's default CPU path (MKL sgemv on the [out, in] nn.Linear weight) reaches only about
a third of this machine's read bandwidth; oneDNN, given the weight once in its own blocked layout, reaches
about two thirds (BENCHMARKS.md has the figures). This is what torch.compile's CPU backend does
when it freezes weights (torch/_inductor/fx_passes/mkldnn_fusion.py: `mkldnn._reorder_linear_weight` +
`mkldnn._linear_pointwise`); here it is done by hand, without a compile.

    with packed_linears(model):      # every CPU nn.Linear in `model` multiplies with a packed copy
        model.generate(...)          # generate() does this itself (pack_weights=None: on for CPU)

For the length of the block each packable nn.Linear is swapped for a PackedLinear holding the same Parameters.
The packed copies cost one more copy of the linear weights (lm_head included: it is tied to wte), and about
0.3 s per GB to make. Small layers are left alone (MIN_PACK_NUMEL), and so are layers with torch hooks. Inside
the block a layer falls back to F.linear whenever packing would be wrong: autograd is recording for its weight
or input, or the weight is no longer what was packed (changed in place, through .data, by .to(), or replaced).
Numerics: fp32 (or bf16) products with a different summation order, so results agree with F.linear to
rounding (~1e-6 relative), not bit for bit.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def available() -> bool:
    """Whether this PyTorch build can pack linear weights for oneDNN (x86-64 and most Linux builds)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def identity(t: torch.Tensor) -> tuple:
    """What changes when a tensor's values may have: its storage, in-place version counter (None for inference
    tensors, which keep none), dtype and device. Not `p.data.mul_()`, which bumps no counter."""
    return t.data_ptr(), None if t.is_inference() else t._version, t.dtype, t.device


class PackedLinear(nn.Module):
    """Stands in for an nn.Linear inside `packed_linears`: the very same weight and bias Parameters (so names,
    ties, state_dict and optimizers see no change) plus a oneDNN-packed copy of the weight for inference calls.

    The module is swapped into the model, not patched onto the Linear, so the state is in the module tree: a
    deepcopy taken inside the block is an ordinary model with plain nn.Linears (`__deepcopy__`; oneDNN's opaque
    tensor cannot be copied anyway), and never computes with the original's packed weights."""

    def __init__(self, linear: nn.Linear, packed: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.packed = packed                       # oneDNN layout; a plain attribute: not a buffer, not saved
        self.packed_from = identity(linear.weight)
        self.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (identity(w) != self.packed_from          # changed in place, .data = ..., .to(), a new Parameter
                or x.dtype != w.dtype                                            # autocast, mixed inputs
                or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))):   # autograd needs F.linear
            return F.linear(x, w, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

    def __deepcopy__(self, memo) -> nn.Linear:
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        memo[id(self)] = linear
        linear.weight = copy.deepcopy(self.weight, memo)   # memo: a tied weight stays tied in the copy
        if self.bias is not None:
            linear.bias = copy.deepcopy(self.bias, memo)
        return linear.train(self.training)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN-packed"


# A packed call costs ~30 us more to set up than F.linear (measured on the benchmark machine): it pays off once
# the weight no longer fits the caches and streams from memory. GPT-2 small's smallest matrix (768 x 768) is
# just above this; the bundled 64-wide model's are far below (packing them made generation ~1.4x slower).
MIN_PACK_NUMEL = 1 << 19


def _packable(m: nn.Linear) -> bool:
    w = m.weight
    if w.device.type != "cpu" or w.dtype not in PACKABLE_DTYPES or w.numel() < MIN_PACK_NUMEL:
        return False
    if m.bias is not None and m.bias.dtype != w.dtype:
        return False
    return w.dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()   # bf16 needs CPU support


@dataclass
class Swap:
    """One packed layer: `packed` sits where `linear` was (parent.<name>), until `unpack`."""
    parent: nn.Module
    name: str
    linear: nn.Linear
    packed: PackedLinear


def pack(model: nn.Module, batch_size: Optional[int] = None) -> list[Swap]:
    """Put a PackedLinear in place of every packable nn.Linear in `model` (CPU, fp32 or bf16 where the CPU has it,
    at least MIN_PACK_NUMEL weights); returns the swaps, for `unpack`. A Linear with torch hooks is left alone:
    its hooks would not fire on a stand-in. `batch_size`: the rows per call to tune the layout for."""
    if not available():
        return []
    swaps, made = [], {}   # made: one stand-in per Linear, even if the tree lists it twice
    for parent in list(model.modules()):
        for name, m in list(parent.named_children()):
            if type(m) is not nn.Linear or m._forward_hooks or m._forward_pre_hooks or not _packable(m):
                continue
            if m not in made:
                made[m] = PackedLinear(m, torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), batch_size))
            setattr(parent, name, made[m])
            swaps.append(Swap(parent, name, m, made[m]))
    return swaps


def unpack(swaps: list[Swap]) -> None:
    """Put each original nn.Linear back, with the Parameters its stand-in holds now (one assigned in the block,
    e.g. by load_state_dict(assign=True), is kept)."""
    for s in swaps:
        if getattr(s.parent, s.name) is s.packed:
            s.linear.weight, s.linear.bias = s.packed.weight, s.packed.bias
            setattr(s.parent, s.name, s.linear)


@contextmanager
def packed_linears(model: nn.Module, batch_size: Optional[int] = None):
    """Within the block, `model`'s CPU linear layers multiply with oneDNN-packed weights (see the module doc).
    Nested blocks and layers packed already are left as they are; the block's own packing is undone on exit."""
    swaps = pack(model, batch_size)
    try:
        yield swaps
    finally:
        unpack(swaps)
