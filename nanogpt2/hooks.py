"""Named activation points: read (run_with_cache) or rewrite (hooks) any intermediate tensor of the model.

run_with_cache returns an ActivationCache (activations.py): the recorded tensors by name, plus residual-stream
decomposition and direct logit attribution.

The points, in forward order (shapes for input (B, T) with S = cached + new positions, C = n_embd,
H = n_head, D = head_dim, F = inner MLP width):

    embed               (B, T, C)     wte(input_ids) + wpe(positions) [+ wte(token_type_ids)], before dropout
    h.{i}.ln_1          (B, T, C)     block i's first LayerNorm output (the attention's input)
    h.{i}.attn.q        (B, T, H, D)  queries, per head
    h.{i}.attn.k        (B, T, H, D)  keys of the new positions (before they join the KV cache)
    h.{i}.attn.v        (B, T, H, D)  values of the new positions
    h.{i}.attn.pattern  (B, H, T, S)  attention probabilities (computed only when asked for, on any backend)
    h.{i}.attn.z        (B, T, H, D)  per-head attention output, before c_proj mixes the heads
    h.{i}.attn.out      (B, T, C)     attention output after c_proj (and residual dropout)
    h.{i}.resid_mid     (B, T, C)     residual stream after the attention
    h.{i}.ln_2          (B, T, C)     second LayerNorm output (the MLP's input)
    h.{i}.mlp.pre       (B, T, F)     c_fc output, before the activation
    h.{i}.mlp.post      (B, T, F)     after the activation
    h.{i}.mlp.out       (B, T, C)     MLP output after c_proj (and dropout)
    h.{i}.resid_post    (B, T, C)     residual stream after block i
    ln_f                (B, T, C)     final LayerNorm output (= last_hidden_state)

A hook is `fn(tensor, name)`; returning a tensor replaces the activation downstream (activation patching,
head ablation by zeroing a head of attn.z, steering vectors), returning None leaves it. The names mirror
TransformerLens's hook points (blocks.{i}.hook_resid_pre ...), in this model's own parameter naming.
"""
from __future__ import annotations

import contextlib
import re
from typing import Callable, Iterable, Optional

import torch

from .activations import ActivationCache

BLOCK_POINTS = ("ln_1", "attn.q", "attn.k", "attn.v", "attn.pattern", "attn.z", "attn.out", "resid_mid", "ln_2",
                "mlp.pre", "mlp.post", "mlp.out", "resid_post")
Hook = Callable[[torch.Tensor, str], Optional[torch.Tensor]]


def activation_names(n_layer: int) -> list[str]:
    """Every named point of a model with n_layer blocks, in forward order."""
    return ["embed"] + [f"h.{i}.{p}" for i in range(n_layer) for p in BLOCK_POINTS] + ["ln_f"]


def check_names(names: Iterable[str], n_layer: int) -> list[str]:
    valid = set(activation_names(n_layer))
    names = list(names)
    for name in names:
        if name not in valid:
            m = re.fullmatch(r"h\.(\d+)\.(.+)", name)
            if m and m.group(2) in BLOCK_POINTS:
                why = f"block index {m.group(1)} out of range [0, {n_layer})"
            else:
                why = f"valid: 'embed', 'h.{{i}}.<point>' for i in [0, {n_layer}) and point in {', '.join(BLOCK_POINTS)}, 'ln_f'"
            raise ValueError(f"unknown activation point {name!r}: {why}")
    return names


class HookRegistry:
    """name -> hooks, shared by every module of one model. Empty means every point is a no-op."""

    def __init__(self):
        self.fns: dict[str, list[Hook]] = {}

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if not self.fns:  # the common case: one falsy check per point
            return x
        for fn in self.fns.get(name, ()):
            out = fn(x, name)
            if out is not None:
                if out.shape != x.shape:
                    raise ValueError(f"hook at {name!r} returned shape {tuple(out.shape)}; the activation is "
                                     f"{tuple(x.shape)} and a replacement must keep it")
                x = out
        return x

    def wants(self, name: str) -> bool:
        return bool(self.fns) and name in self.fns

    @contextlib.contextmanager
    def added(self, hooks: dict[str, Hook]):
        added = []
        try:
            for name, fn in hooks.items():
                self.fns.setdefault(name, []).append(fn)
                added.append((name, fn))
            yield
        finally:  # removed on exit, even on error
            for name, fn in added:
                self.fns[name].remove(fn)
                if not self.fns[name]:
                    del self.fns[name]


class HooksMixin:
    """`model.hooks({...})` and `model.run_with_cache(...)` for GPT2Model and GPT2LMHeadModel."""

    def _registry(self) -> HookRegistry:
        base = getattr(self, "transformer", self)
        return base.hook_registry

    def hooks_active(self) -> bool:
        """Whether any named hook is set (generate's compiled step then runs eagerly, so that the hooks see every
        token)."""
        return bool(self._registry().fns)

    def activation_names(self) -> list[str]:
        return activation_names(self.config.n_layer)

    def hooks(self, hooks: dict[str, Hook]):
        """Context manager: run `fn(tensor, name)` at each named point during any forward or generate inside
        the block; a returned tensor replaces the activation. Hooks are removed on exit, even on error."""
        check_names(hooks, self.config.n_layer)
        for name, fn in hooks.items():
            if not callable(fn):
                raise TypeError(f"hook for {name!r} must be callable fn(tensor, name), got {type(fn).__name__}")
        return self._registry().added(hooks)

    @contextlib.contextmanager
    def recording(self, names: Optional[Iterable[str]] = None, device=None):
        """Context manager yielding a dict that fills with {name: detached tensor} for the named points (all when
        names is None) computed inside the block: by a forward, a generate step, anything. A point computed
        twice keeps its last value. device: copy each tensor there as it is made (None: leave it where it is)."""
        names = self.activation_names() if names is None else check_names(names, self.config.n_layer)
        acts: dict[str, torch.Tensor] = {}

        def store(x, name):
            acts[name] = x.detach() if device is None else x.detach().to(device)

        with self.hooks({name: store for name in names}):
            yield acts

    def run_with_cache(self, input_ids=None, names: Optional[Iterable[str]] = None, device=None,
                       stop_at_layer: Optional[int] = None, **forward_kwargs):
        """(logits, ActivationCache) for the named points (all when names is None), in forward order; the cache
        is a {name: detached tensor} dict with analysis methods (activations.py). On a GPT2Model the first
        element is last_hidden_state. Works with attention_mask, left padding and past_key_values like any
        forward.

        device: put the cached tensors there (e.g. "cpu" to keep GPU memory for the model); the logits stay on
        the model's device. stop_at_layer=k: run the embedding and blocks [0, k) only, and return the residual
        stream before block k (B, T, C) in place of the logits (TransformerLens's meaning; k in [0, n_layer]).
        Nothing after that point is computed: a hook there ends the forward."""
        L = self.config.n_layer
        names = self.activation_names() if names is None else check_names(names, L)
        stop_hook = {}
        if stop_at_layer is not None:
            if isinstance(stop_at_layer, bool) or not (isinstance(stop_at_layer, int) and 0 <= stop_at_layer <= L):
                raise ValueError(f"stop_at_layer {stop_at_layer!r} out of range [0, {L}] (stop before block k; "
                                 f"{L} = after the last block, before ln_f)")
            if forward_kwargs.get("past_key_values") is not None:
                raise ValueError("stop_at_layer with past_key_values would leave the KV cache half-written "
                                 "(blocks before the stop appended, the rest not): run without one")
            stop_hook = {"embed" if stop_at_layer == 0 else f"h.{stop_at_layer - 1}.resid_post": _stop_forward}
        with self.recording(names, device=device) as acts, self.hooks(stop_hook):
            try:
                out = self(input_ids, **forward_kwargs)
                main = out.logits if out.logits is not None else out.last_hidden_state
            except _StopForward as stop:
                main = stop.resid
        cache = ActivationCache({name: acts[name] for name in names if name in acts}, self, input_ids=input_ids,
                                inputs_embeds=forward_kwargs.get("inputs_embeds"),
                                token_type_ids=forward_kwargs.get("token_type_ids"))
        return main, cache


class _StopForward(Exception):
    """Raised by run_with_cache's hook at the stop point, carrying the residual stream there; caught by
    run_with_cache alone."""

    def __init__(self, resid: torch.Tensor):
        super().__init__("forward stopped by run_with_cache(stop_at_layer=...)")
        self.resid = resid


def _stop_forward(x: torch.Tensor, name: str):
    raise _StopForward(x)
