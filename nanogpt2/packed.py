"""CPU inference with oneDNN-packed weights: the matmuls of decoding, at up to twice the speed.

A decode step multiplies one row per sequence by every weight matrix: a GEMV, bound by how fast the weights
stream from memory. PyTorch's default CPU path (MKL sgemv on the [out, in] nn.Linear weight) reaches only about
a third of this machine's read bandwidth; oneDNN, given the weight once in its own blocked layout, reaches
about two thirds (BENCHMARKS.md has the figures). This is what torch.compile's CPU backend does
when it freezes weights (torch/_inductor/fx_passes/mkldnn_fusion.py: `mkldnn._reorder_linear_weight` +
`mkldnn._linear_pointwise`); here it is done by hand, without a compile.

    with packed_linears(model):      # every CPU nn.Linear in `model` multiplies with a packed copy
        model.generate(...)          # generate() does this itself (pack_weights=None: on for CPU)

The packed copies cost one more copy of the linear weights (lm_head included: it is tied to wte) for as long
as the block lasts, and about 0.3 s per GB to make. Small layers are left alone (MIN_PACK_NUMEL). Inside the
block a layer falls back to F.linear whenever packing would be wrong: autograd is recording for its weight or
input, or the weight is no longer what was packed (changed in place, through .data, by .to(), or replaced). Numerics: fp32 (or bf16) products with a different summation order, so results agree with
F.linear to rounding (~1e-6 relative), not bit for bit.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def available() -> bool:
    """Whether this PyTorch build can pack linear weights for oneDNN (x86-64 and most Linux builds)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _is_packed(m: nn.Module) -> bool:
    return getattr(m.forward, "_nanogpt2_packed", False)


def identity(t: torch.Tensor) -> tuple:
    """What changes when a tensor's values may have: its storage, in-place version counter (None for inference
    tensors, which keep none), dtype and device. Not `p.data.mul_()`, which bumps no counter."""
    return t.data_ptr(), None if t.is_inference() else t._version, t.dtype, t.device


def _packed_forward(module: nn.Linear, packed: torch.Tensor):
    weight, bias = module.weight, module.bias
    packed_from = identity(weight)

    def forward(x: torch.Tensor) -> torch.Tensor:
        w = module.weight
        if (w is not weight or module.bias is not bias   # a new Parameter (load_state_dict(assign=True), ...)
                or identity(w) != packed_from                      # changed in place, .data = ..., .to()
                or x.dtype != w.dtype                                            # autocast, mixed inputs
                or (torch.is_grad_enabled() and (w.requires_grad or x.requires_grad))):   # autograd needs F.linear
            return F.linear(x, w, module.bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")

    forward._nanogpt2_packed = True
    return forward


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


def pack(model: nn.Module, batch_size: Optional[int] = None) -> list[nn.Linear]:
    """Swap the forward of every packable nn.Linear in `model` (CPU, fp32 or bf16 where the CPU has it, at
    least MIN_PACK_NUMEL weights, not packed yet) for a packed one; returns the layers swapped, for `unpack`.
    `batch_size`: the rows per call to tune the layout for."""
    swapped = []
    if not available():
        return swapped
    for m in model.modules():
        if type(m) is not nn.Linear or _is_packed(m) or not _packable(m):
            continue
        w = m.weight
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), batch_size)
        except RuntimeError:   # a build whose oneDNN cannot pack this dtype: leave the layer alone
            continue
        m.forward = _packed_forward(m, packed)
        swapped.append(m)
    return swapped


def unpack(layers: list[nn.Linear]) -> None:
    for m in layers:
        del m.forward   # the instance attribute: nn.Linear.forward shows through again


@contextmanager
def packed_linears(model: nn.Module, batch_size: Optional[int] = None):
    """Within the block, `model`'s CPU linear layers multiply with oneDNN-packed weights (see the module doc).
    Nested blocks and layers packed already are left as they are; the block's own packing is undone on exit."""
    layers = pack(model, batch_size)
    try:
        yield layers
    finally:
        unpack(layers)
