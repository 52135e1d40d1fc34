"""Memory probe: the bytes autograd keeps alive between a training forward and its backward, which is the
activation memory gradient checkpointing trades for compute (docs/TRAINING.md, "Memory")."""
from __future__ import annotations

import torch
import torch.nn as nn

from .loss import lm_loss


def saved_activation_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes saved for backward by one fp32 training step on x, y (B, T): every tensor saved for backward
    (torch.autograd.graph.saved_tensors_hooks sees each), counted once per storage, with the parameters left
    out (they exist either way). Runs the backward too and leaves the gradients cleared."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}  # storage address -> bytes

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lm_loss(model, x, y, None)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())
