"""The training loss and the precision it is computed in: next-token cross-entropy (lm_loss) under bf16
autocast where that pays (autocast_dtype), the logits cast to fp32 before the softmax."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

AUTOCAST_CHOICES = ("auto", "float32", "bfloat16")  # --dtype


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU multiplies bf16 in hardware (oneDNN uses it), so bf16 autocast pays off.
    torch.cpu's probes are private; where this torch lacks them we answer no (fp32, the safe choice)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def autocast_dtype(dtype: str, device: torch.device) -> Optional[torch.dtype]:
    """bf16 autocast or None (plain fp32) for --dtype `dtype`, one of AUTOCAST_CHOICES. 'auto' picks bf16 on a
    CUDA GPU that supports it and on a CPU with native bf16 matmuls: on the 2-core AVX512-BF16 CPU we develop
    on, a bf16-autocast training step took 0.6x the time of an fp32 one for a matmul-bound model (2 x 768
    wide) and 0.95x for shakespeare-tiny, whose fp32 softmax over 50257 tokens dominates (docs/TRAINING.md).
    Without native bf16, CPUs emulate it: fp32."""
    if dtype not in AUTOCAST_CHOICES:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(AUTOCAST_CHOICES)}")
    if dtype == "bfloat16":
        return torch.bfloat16
    if dtype == "float32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: Optional[torch.dtype]) -> torch.Tensor:
    """Mean next-token cross-entropy (nats/token, 0-d): x (B, T) -> logits (B, T, V) against y (B, T), the
    forward under `amp` autocast (None: fp32), the softmax in fp32."""
    with torch.autocast(x.device.type, dtype=amp) if amp else nullcontext():
        logits = model(x).logits
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
