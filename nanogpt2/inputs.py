"""Checks on what a caller hands the model: token ids, attention masks and indices (a layer, a head, a row). One
copy of each rule, called by `forward` (model.py), `generate` (generation.py) and the analysis tools, so all refuse
the same inputs with the same words."""
from __future__ import annotations

import torch


def check_token_ids(ids, vocab_size: int, name: str = "input_ids", sync_free: bool = False) -> torch.Tensor:
    """ids (T,) or (B, T) of integers in [0, vocab_size) -> (B, T) torch.long; a clear error otherwise.

    The range check reads the values: on CUDA a host sync. With `sync_free` (forward: every training and decode
    step) a CUDA tensor is checked on the device instead (torch._assert_async: no sync, but a failure is a
    device-side assert that ends the CUDA context, and it names no value); generate() checks once per call, with
    the exact message. Under torch.compile the check is skipped, as a data-dependent check would break the graph;
    the embedding lookup still refuses an out-of-range id there ("index out of bounds" on CPU, an assert on CUDA)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids (torch.long), got dtype {ids.dtype}")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise ValueError(f"{name} must be (B, T), got shape {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(ids.shape)}): at least one token is needed")
    if torch.compiler.is_compiling() or not ids.numel():
        return ids.long()
    if sync_free and ids.is_cuda:
        in_range = ((ids >= 0) & (ids < vocab_size)).all()
        torch._assert_async(in_range, f"{name}: a token id is out of range [0, {vocab_size})")
    else:
        lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{name}: token id {lo if lo < 0 else hi} out of range [0, {vocab_size})")
    return ids.long()


def check_mask_shape(mask, shape: tuple[int, int], what: str) -> torch.Tensor:
    """A 2-D 0/1 attention mask of exactly `shape` (`what` says what the two sizes count, for the message)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor of 0/1, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask must be 2-D ({what}) = {tuple(shape)} of 0/1, got shape "
                         f"{tuple(mask.shape)}")
    return mask


def check_index(what: str, value: int, n: int, context: str) -> int:
    """`value` as an index into n things (a layer, a head, a row of a batch), or ValueError naming it and the valid
    range: check_index("layer", 4, 4, "this model has 4 layers") -> 'layer 4 out of range [0, 4) (this model has
    4 layers)'."""
    if not 0 <= value < n:
        raise ValueError(f"{what} {value} out of range [0, {n}) ({context})")
    return value
