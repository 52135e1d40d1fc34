"""ActivationCache: what `model.run_with_cache` returns, a dict of named activations (hooks.py) that can also
take the residual stream apart: into its components, into each head's write, and into each component's direct
effect on a logit (direct logit attribution).

    logits, cache = model.run_with_cache(ids)
    cache["h.3.attn.pattern"]; cache["pattern", 3]               # the same tensor, by name or by shorthand
    resid = cache.accumulated_resid()        # (n_layer + 1, B, T, C): before each block, and at the end
    parts, labels = cache.decompose_resid(return_labels=True)     # tok_embed, pos_embed, h.0.attn.out, ...
    heads, labels = cache.stack_head_results(return_labels=True)  # (n_layer * H, B, T, C): "L0H0", ...
    dla = cache.logit_attrs(heads, tokens=right, incorrect_tokens=wrong, pos_slice=-1)   # (n_layer * H, B)

The method names and arguments are TransformerLens's (ActivationCache), so its tutorials port line by line;
the arithmetic differs in one place, said in `apply_ln_to_stack`. The layers:

  the residual stream before block l ("resid_pre" l) is `embed` for l = 0 and `h.{l-1}.resid_post` after;
  l = n_layer is the final one, the input of ln_f. `embed` is already token + position embedding (GPT-2 adds
  them before the first block); `decompose_resid` splits it into tok_embed = wte(input_ids) and
  pos_embed = embed - tok_embed (= wpe(position_ids), up to rounding).

Every identity here is exact up to float rounding: the components of a decomposition sum to the residual,
a layer's head results plus its c_proj bias sum to `attn.out`, and logit attributions sum to the logit minus
the LayerNorm and unembedding bias terms `logit_attrs` names. Weights are read from the model when a method
runs (not when the cache was made): process_weights after run_with_cache means run it again.
The model must be in eval mode for these identities (dropout would make attn.out differ from its heads).
The methods return plain tensors (run under no_grad: the cached activations are detached anyway).
"""
from __future__ import annotations

from collections.abc import MutableMapping
from typing import Iterator, Optional, Union

import torch

from .quantization import float_weight, float_weight_rows

# TransformerLens's shorthand (utils.get_act_name) -> this model's block point, for cache[short, layer].
# The block points' own names work as shorthand too: cache["attn.z", 3] is cache["h.3.attn.z"]. (This module
# sits below hooks.py, which makes the caches, so it learns the point names from the model, not by import.)
SHORTHAND = {"attn_out": "attn.out", "mlp_out": "mlp.out", "q": "attn.q", "k": "attn.k", "v": "attn.v",
             "z": "attn.z", "pattern": "attn.pattern", "pre": "mlp.pre", "post": "mlp.post", "ln1": "ln_1",
             "ln2": "ln_2"}
PosSlice = Union[None, int, slice]


class ActivationCache(MutableMapping):
    """{name: tensor} for the points one forward recorded, in forward order, with analysis methods.

    Keys are the point names (`cache["h.3.resid_post"]`); a (shorthand, layer) pair also indexes:
    `cache["pattern", 3]`, `cache["resid_post", -1]` (negative layers count from the end), and
    `cache["resid_pre", l]`, which is `embed` for l = 0 and `h.{l-1}.resid_post` otherwise. Shorthands:
    resid_pre, resid_mid, resid_post, attn_out, mlp_out, q, k, v, z, pattern, pre, post, ln1, ln2, and every
    block point name (attn.z, mlp.post, ...). `keys()`, `items()`, `len()`, `in` and iteration see the
    names only; entries can be added (verify.py stores the logits next to the points).
    """

    def __init__(self, acts: dict[str, torch.Tensor], model, input_ids: Optional[torch.Tensor] = None,
                 inputs_embeds: Optional[torch.Tensor] = None, token_type_ids: Optional[torch.Tensor] = None):
        self._acts = acts
        self.model = model
        base = getattr(model, "transformer", model)   # GPT2LMHeadModel or GPT2Model
        self._blocks, self._ln_f, self._wte = base.h, base.ln_f, base.wte
        self.n_layer, self.n_head = model.config.n_layer, model.config.n_head
        self._points = set(model.activation_names())   # every name this model has (hooks.py)
        # what the token half of `embed` was made from (decompose_resid's tok_embed); None: not split
        self._token_inputs = (input_ids, inputs_embeds, token_type_ids)

    # ---- the mapping ----------------------------------------------------------------------------

    def name(self, key) -> str:
        """The point name a key stands for: a name as is, or (shorthand, layer) resolved (class docstring)."""
        if isinstance(key, str):
            return key
        if not (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], str) and isinstance(key[1], int)):
            raise KeyError(f"{key!r}: index by a point name ('h.3.attn.pattern') or (shorthand, layer) "
                           f"('pattern', 3)")
        short, layer = key
        L = self.n_layer
        if not -L <= layer < L:
            raise KeyError(f"{key!r}: layer {layer} out of range [-{L}, {L}) (this model has {L} blocks)")
        layer %= L
        if short == "resid_pre":
            return self.resid_name(layer)
        name = f"h.{layer}.{SHORTHAND.get(short, short)}"
        if name not in self._points:
            own = [n.split(".", 2)[2] for n in sorted(self._points) if n.startswith("h.0.")]
            raise KeyError(f"{key!r}: unknown shorthand {short!r}; valid: resid_pre, {', '.join(SHORTHAND)}, "
                           f"or a block point ({', '.join(own)})")
        return name

    def __getitem__(self, key) -> torch.Tensor:
        name = self.name(key)
        try:
            return self._acts[name]
        except KeyError:
            raise KeyError(f"{name!r} is not in this cache ({len(self._acts)} points): run_with_cache records "
                           f"only the points in names=, and none after stop_at_layer") from None

    def __contains__(self, key) -> bool:
        try:
            return self.name(key) in self._acts
        except KeyError:
            return False

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self._acts[self.name(key)] = value

    def __delitem__(self, key) -> None:
        del self._acts[self.name(key)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._acts)

    def __len__(self) -> int:
        return len(self._acts)

    def __repr__(self) -> str:
        devices = ", ".join(sorted({str(t.device) for t in self._acts.values()})) or "no device"
        return f"ActivationCache({len(self)} points on {devices}: {', '.join(list(self)[:3])}, ...)"

    # ---- the residual stream --------------------------------------------------------------------

    def resid_name(self, layer: int) -> str:
        """The point holding the residual stream before block `layer`, for layer in [0, n_layer] (n_layer:
        after the last block, ln_f's input)."""
        return "embed" if layer == 0 else f"h.{layer - 1}.resid_post"

    def _layer(self, layer: Optional[int], what: str) -> int:
        """layer in [0, n_layer]; None and -1 mean n_layer (the end), as in TransformerLens."""
        L = self.n_layer
        if layer is None or layer == -1:
            return L
        if not 0 <= layer <= L:
            raise ValueError(f"{what} layer {layer} out of range [0, {L}] (or None / -1 for the end, after all "
                             f"{L} blocks)")
        return layer

    def _resid(self, layer: int, pos_slice: PosSlice) -> torch.Tensor:
        return _take(self[self.resid_name(layer)], pos_slice)

    @torch.no_grad()
    def accumulated_resid(self, layer: Optional[int] = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice: PosSlice = None, return_labels: bool = False):
        """The residual stream before each block up to and including block `layer` (None / -1: also after the
        last block), stacked: (layer + 1, B, T, C), labelled by point name ("embed", "h.0.resid_post", ...).
        incl_mid adds each block's resid_mid. apply_ln: apply the LayerNorm that reads the stream at `layer`
        (ln_f at the end) with that point's cached scale to every entry (apply_ln_to_stack), which keeps the
        entries comparable through one linear map; the logit lens (analysis.logit_lens) instead normalises
        each entry by its own scale."""
        layer = self._layer(layer, "accumulated_resid")
        labels = []
        for i in range(layer + 1):
            labels.append(self.resid_name(i))
            if incl_mid and i < layer:
                labels.append(f"h.{i}.resid_mid")
        stack = torch.stack([_take(self[n], pos_slice) for n in labels])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice)
        return (stack, labels) if return_labels else stack

    def _embed_parts(self, pos_slice: PosSlice) -> tuple[list[torch.Tensor], list[str]]:
        """[tok_embed, pos_embed], or [embed] when the cache does not know the inputs the embedding came from."""
        embed = _take(self["embed"], pos_slice)
        input_ids, inputs_embeds, token_type_ids = self._token_inputs
        if input_ids is None and inputs_embeds is None:
            return [embed], ["embed"]
        wte = self._wte                  # the module: a quantized one dequantizes only the rows it gathers
        device = next(wte.parameters()).device
        tok = inputs_embeds if input_ids is None else wte(input_ids.to(device))
        if token_type_ids is not None:   # GPT-2 reuses wte for segments (model.py): a token-side term
            tok = tok + wte(token_type_ids.to(device))
        tok = _take(tok.to(embed.device, embed.dtype), pos_slice)
        # position rows by difference: wpe(position_ids) without re-deriving the positions (model.py's rule)
        return [tok, embed - tok], ["tok_embed", "pos_embed"]

    @torch.no_grad()
    def decompose_resid(self, layer: Optional[int] = None, heads: bool = False, apply_ln: bool = False,
                        pos_slice: PosSlice = None, return_labels: bool = False):
        """The residual stream before block `layer` (None / -1: after the last block) as the sum of what wrote
        it, stacked (n_components, B, T, C):

            tok_embed   wte(input_ids) (+ wte(token_type_ids)); inputs_embeds when the forward got those
            pos_embed   embed - tok_embed: the position rows wpe(position_ids) (and anything a hook added at embed)
            h.{i}.attn.out, h.{i}.mlp.out   for each block i < layer

        GPT-2 adds token and position embeddings before its first point (`embed`), so the split is computed
        from the cached inputs; a cache without them (built by hand) has one "embed" component instead.
        heads=True writes each attn.out as its heads ("L{i}H{h}", stack_head_results) plus the c_proj bias
        that no head owns ("h.{i}.attn.c_proj.bias", broadcast over positions). apply_ln: apply_ln_to_stack
        with the LayerNorm at `layer`. Components sum to cache.accumulated_resid(layer)[-1]."""
        layer = self._layer(layer, "decompose_resid")
        parts, labels = self._embed_parts(pos_slice)
        for i in range(layer):
            if heads:
                head_parts, head_labels = self._head_results(i, pos_slice)
                bias = self._blocks[i].attn.c_proj.bias
                parts += [*head_parts, bias.to(parts[0].device, parts[0].dtype).expand_as(parts[0])]
                labels += [*head_labels, f"h.{i}.attn.c_proj.bias"]
            else:
                parts.append(_take(self[f"h.{i}.attn.out"], pos_slice))
                labels.append(f"h.{i}.attn.out")
            parts.append(_take(self[f"h.{i}.mlp.out"], pos_slice))
            labels.append(f"h.{i}.mlp.out")
        stack = torch.stack(parts)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice)
        return (stack, labels) if return_labels else stack

    def _head_results(self, layer: int, pos_slice: PosSlice) -> tuple[list[torch.Tensor], list[str]]:
        z = _take(self[f"h.{layer}.attn.z"], pos_slice, dim=-3)          # (B, T, H, D) or (B, H, D)
        W = float_weight(self._blocks[layer].attn.c_proj)                # (C, H*D): nn.Linear is [out, in]
        W = W.to(z.device, z.dtype).view(W.shape[0], self.n_head, -1)    # (C, H, D): head h's columns
        # head h's write = z[..., h, :] @ W[:, h, :]^T, i.e. c_proj applied to z with the other heads zeroed
        out = torch.einsum("...hd,chd->h...c", z, W)                     # (H, B, T, C)
        return list(out.unbind(0)), [f"L{layer}H{h}" for h in range(self.n_head)]

    @torch.no_grad()
    def stack_head_results(self, layer: Optional[int] = None, pos_slice: PosSlice = None,
                           apply_ln: bool = False, return_labels: bool = False):
        """Each head's write into the residual stream, for every head of the blocks before `layer` (None / -1:
        all blocks): (layer * H, B, T, C), labelled "L{layer}H{head}". Head h's write is its slice of attn.z
        through its columns of c_proj's weight, so a layer's heads plus that c_proj's bias sum to attn.out
        (the bias belongs to no head: decompose_resid(heads=True) lists it as its own component). TransformerLens
        calls these hook_result; here they are computed from attn.z when asked for, not on every forward."""
        layer = self._layer(layer, "stack_head_results")
        parts, labels = [], []
        for i in range(layer):
            p, lab = self._head_results(i, pos_slice)
            parts += p
            labels += lab
        if not parts:
            raise ValueError("stack_head_results(layer=0) has no heads: the layers taken are those before `layer`")
        stack = torch.stack(parts)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice)
        return (stack, labels) if return_labels else stack

    # ---- LayerNorm and logits -------------------------------------------------------------------

    @torch.no_grad()
    def apply_ln_to_stack(self, stack: torch.Tensor, layer: Optional[int] = None,
                          pos_slice: PosSlice = None) -> torch.Tensor:
        """Push each component of `stack` (..., B, T, C) through the LayerNorm that reads the residual at
        `layer` (None / -1: ln_f; l < n_layer: block l's ln_1) as a linear map: centre it, divide by the scale
        the real residual had there (sqrt(var + eps), recomputed from the cached residual, so it does not
        depend on the stack) and multiply by the LayerNorm's weight. Then the results add up: summed over a
        complete decomposition they give the LayerNorm's output minus its bias,

            apply_ln_to_stack(decompose_resid(layer)).sum(0) + ln.bias == LayerNorm(resid at layer)

        The bias is a constant that belongs to no component, so it is left out here (logit_attrs names where it
        goes). TransformerLens divides by the scale only, as its weights are processed by default; after
        process_weights(model, fold_ln=True) the weight is 1 and the two agree. pos_slice must be the one the
        stack was built with (the scale is sliced the same way)."""
        layer = self._layer(layer, "apply_ln_to_stack")
        x = self._resid(layer, pos_slice)
        if tuple(stack.shape[-x.dim():]) != tuple(x.shape):
            raise ValueError(f"stack's trailing dims {tuple(stack.shape[-x.dim():])} do not match the cached residual "
                             f"{tuple(x.shape)} at layer {layer}: build the stack and apply the LayerNorm with the "
                             f"same pos_slice")
        ln = self._ln_f if layer == self.n_layer else self._blocks[layer].ln_1
        scale = (x.float().var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt().to(stack.dtype)
        centred = stack - stack.mean(-1, keepdim=True)
        return centred / scale * ln.weight.to(stack.device, stack.dtype)

    @torch.no_grad()
    def logit_attrs(self, stack: torch.Tensor, tokens, incorrect_tokens=None,
                    pos_slice: PosSlice = None) -> torch.Tensor:
        """Direct logit attribution: how much each component of `stack` (n, B, T, C) (or (n, B, C) with an int
        pos_slice) raises the logit of `tokens` through ln_f (with the cached scale) and the unembedding,
        (n, B, T) or (n, B). With incorrect_tokens: of the logit difference tokens - incorrect_tokens.

        stack holds raw residual components (decompose_resid, stack_head_results, accumulated_resid without
        apply_ln): ln_f is applied here. tokens / incorrect_tokens: an int, (B,) one token per row (at every
        position kept), or (B, T) one per position. For a complete decomposition the attributions sum to

            logits[b, t, tok] - ln_f.bias @ W_U[tok] - lm_head.bias[tok]

        (W_U = lm_head.weight (V, C); lm_head has a bias only after process_weights(fold_ln=True), which also
        moves ln_f.bias into it), and to the same difference of the two tokens' terms with incorrect_tokens.
        The terms left out are the same at every component, so they belong to none of them."""
        head = getattr(self.model, "lm_head", None)
        if head is None:
            raise TypeError(f"logit_attrs needs a GPT2LMHeadModel (it reads lm_head), got {type(self.model).__name__}")
        x = self._resid(self.n_layer, pos_slice)   # (B, T, C) or (B, C): what tokens must line up with
        direction = self._unembed_rows(head, tokens, x.shape[:-1], "tokens")
        if incorrect_tokens is not None:
            direction = direction - self._unembed_rows(head, incorrect_tokens, x.shape[:-1], "incorrect_tokens")
        normed = self.apply_ln_to_stack(stack, None, pos_slice)
        return (normed * direction.to(normed.device, normed.dtype)).sum(-1)

    @staticmethod
    def _unembed_rows(head: torch.nn.Module, tokens, positions: torch.Size, what: str) -> torch.Tensor:
        """W_U's rows for tokens given as an int, (B,) or (B, T), shaped to broadcast over positions (B, T)/(B,);
        a quantized head dequantizes only those rows."""
        V = head.out_features
        t = torch.as_tensor(tokens)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"{what} must be integer token ids, got dtype {t.dtype}")
        if t.dim() == 1 and len(positions) == 2:
            t = t[:, None]   # one token per row, for every position
        if t.numel() and not (0 <= int(t.min()) and int(t.max()) < V):
            raise ValueError(f"{what}: token id {int(t.max()) if int(t.max()) >= V else int(t.min())} out of range "
                             f"[0, {V})")
        try:
            torch.broadcast_shapes(t.shape, positions)
        except RuntimeError:
            raise ValueError(f"{what} has shape {tuple(t.shape)}, which does not line up with the positions "
                             f"{tuple(positions)}: give an int, (B,) or {tuple(positions)}") from None
        return float_weight_rows(head, t)


def _take(x: torch.Tensor, pos_slice: PosSlice, dim: int = -2) -> torch.Tensor:
    """x with the positions kept by pos_slice along `dim` (the T axis): an int drops the axis, a slice keeps it."""
    if pos_slice is None:
        return x
    index = [slice(None)] * x.dim()
    index[dim] = pos_slice
    return x[tuple(index)]
