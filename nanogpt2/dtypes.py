"""Floating-point dtype names, once: what every `dtype=` argument and `--dtype` flag accepts.

Both spellings people use are accepted (torch's "bfloat16" and the short "bf16"); flags list the long ones.
"""
from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}
FLAG_CHOICES = ("float32", "float16", "bfloat16")   # what --help shows


def dtype_from_name(dtype) -> torch.dtype:
    """A torch floating-point dtype from a name in DTYPES or a torch.dtype; anything else is a ValueError."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)} (or a floating-point torch.dtype)")
        return DTYPES[dtype]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype or one of {', '.join(DTYPES)}, got {dtype!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (config.json's spelling)."""
    return str(dtype).replace("torch.", "")
