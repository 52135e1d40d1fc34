"""The GPT-2 model (Radford et al. 2019), in plain PyTorch, numerically equal to transformers' GPT-2.

Parameter names are Hugging Face's (`transformer.h.0.attn.c_attn.weight`, ...), so a checkpoint maps onto
this model by transposing the four Conv1D matrices per block (c_attn, attn.c_proj, c_fc, mlp.c_proj: HF
stores them [in, out], nn.Linear wants [out, in]) and tying lm_head to wte. Nothing else (weights.py).

    input_ids (B, T) -> wte + wpe -> n_layer x Block -> ln_f -> lm_head (tied to wte) -> logits (B, T, V)
    Block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))          (pre-LN, GPT-2 paper section 2.3)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import generation, quantization, weights
from .attention import AttentionMask, attention, check_backend, positions_from_mask
from .cache import KVCache
from .config import GPT2Config
from .hooks import HookRegistry, HooksMixin
from .inputs import check_mask_shape, check_token_ids


@dataclass
class GPT2Output:
    """transformers' attribute names; fields a call did not ask for stay None."""
    loss: Optional[torch.Tensor] = None                 # scalar mean next-token cross-entropy
    logits: Optional[torch.Tensor] = None               # (B, T, V)
    last_hidden_state: Optional[torch.Tensor] = None    # (B, T, C), after ln_f
    past_key_values: Optional[KVCache] = None
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None  # n_layer + 1 of (B, T, C)
    attentions: Optional[tuple[torch.Tensor, ...]] = None     # n_layer of (B, H, T, S) probabilities


def activation(name: str):
    """transformers' ACT2FN, for the names GPT-2 configs use."""
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): the three names are the same formula
        return lambda x: F.gelu(x, approximate="tanh")
    return {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh,
            "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}[name]


def point_names(prefix: str, points: tuple[str, ...]) -> SimpleNamespace:
    """The full names of a module's activation points (hooks.py), made once at construction: `.q` is
    "h.3.attn.q". A forward only looks them up, never formats a string."""
    return SimpleNamespace(**{p: f"{prefix}.{p}" for p in points})


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.n_head, self.n_embd, self.head_dim = config.n_head, config.n_embd, config.head_dim
        self.layer_idx = layer_idx
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        # softmax(q k^T * scale): 1/sqrt(D) unless scale_attn_weights=False, and an extra 1/(layer + 1)
        # with scale_attn_by_inverse_layer_idx (Mistral's trick against fp16 overflow in deep layers)
        self.scale = (1.0 / math.sqrt(self.head_dim)) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= float(layer_idx + 1)
        self.upcast = config.reorder_and_upcast_attn
        self.attn_implementation = "auto"
        self.hook = HookRegistry()  # replaced by the model's shared registry (hooks.py)
        self.points = point_names(f"h.{layer_idx}.attn", ("q", "k", "v", "pattern", "z", "out"))

    def forward(self, x, mask: AttentionMask, cache: Optional[KVCache] = None, need_weights: bool = False):
        B, T, C = x.shape
        hook, p = self.hook, self.points
        # (B, T, 3C) -> three (B, T, nh, hs) -> (B, nh, T, hs): one matmul for q, k and v, as GPT-2 was trained
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)
        q = hook(p.q, q).transpose(1, 2)
        k = hook(p.k, k).transpose(1, 2)
        v = hook(p.v, v).transpose(1, 2)
        if cache is not None:  # append to the history; attend over all of it: (B, nh, S, hs)
            k, v = cache.update(self.layer_idx, k, v)
        pattern_hook = (lambda probs: hook(p.pattern, probs)) if hook.wants(p.pattern) else None
        y, probs = attention(q, k, v, mask, scale=self.scale, backend=self.attn_implementation,
                             dropout_p=self.attn_pdrop if self.training else 0.0,
                             need_weights=need_weights, upcast=self.upcast, probs_hook=pattern_hook)
        y = hook(p.z, y.transpose(1, 2))  # (B, T, nh, hs): each head's output
        y = y.reshape(B, T, C)  # re-assemble the heads side by side
        return hook(p.out, self.resid_dropout(self.c_proj(y))), probs


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.inner_dim)
        self.c_proj = nn.Linear(config.inner_dim, config.n_embd)
        self.act = activation(config.activation_function)
        self.dropout = nn.Dropout(config.resid_pdrop)
        self.hook = HookRegistry()
        self.points = point_names(f"h.{layer_idx}.mlp", ("pre", "post", "out"))

    def forward(self, x):
        hook, p = self.hook, self.points
        h = hook(p.pre, self.c_fc(x))      # (B, T, F)
        h = hook(p.post, self.act(h))
        return hook(p.out, self.dropout(self.c_proj(h)))


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config, layer_idx)
        self.hook = HookRegistry()
        self.points = point_names(f"h.{layer_idx}", ("ln_1", "resid_mid", "ln_2", "resid_post"))

    def forward(self, x, mask: AttentionMask, cache: Optional[KVCache] = None, need_weights: bool = False):
        hook, p = self.hook, self.points
        a, probs = self.attn(hook(p.ln_1, self.ln_1(x)), mask, cache, need_weights)
        x = hook(p.resid_mid, x + a)
        x = x + self.mlp(hook(p.ln_2, self.ln_2(x)))
        return hook(p.resid_post, x), probs


class PreTrained(HooksMixin, nn.Module):
    """What both GPT-2 classes share: loading, saving, initialisation, the attention backend."""
    config: GPT2Config
    compiled_decode = None   # generate(compile=True)'s compiled step for this model (compiled.py), made on first use

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype=None, device=None, attn_implementation: str = "auto",
                        revision: Optional[str] = None, quantize: Optional[str] = None,
                        group_size: Optional[int] = None):
        """A local directory, a bundled model name, or a Hugging Face hub id (files.py); read by weights.py.
        quantize="int8" | "int4" (group_size 32/64/128, default 64) stores the block projections and lm_head
        as integers, quantized tensor by tensor while loading (quantization.py); a checkpoint saved quantized
        loads quantized without it."""
        check_backend(attn_implementation)
        model = weights.load_pretrained(cls, name_or_path, dtype=dtype, device=device, revision=revision,
                                        quantize=quantize, group_size=group_size)
        model.set_attn_implementation(attn_implementation)
        return model

    def save_pretrained(self, save_directory, max_shard_size: int | str = "5GB") -> None:
        """config.json + model.safetensors (sharded above max_shard_size), loadable by transformers."""
        weights.save_pretrained(self, save_directory, max_shard_size=max_shard_size)

    def set_attn_implementation(self, name: str) -> None:
        check_backend(name)
        for m in self.modules():
            if isinstance(m, GPT2Attention):
                m.attn_implementation = name

    @property
    def attn_implementation(self) -> str:
        return next(m for m in self.modules() if isinstance(m, GPT2Attention)).attn_implementation

    def init_weights(self) -> None:
        """transformers' GPT-2 init: N(0, initializer_range), with the residual projections scaled by
        1/sqrt(2 n_layer) (GPT-2 paper section 2.3: two residual additions per block)."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():  # tied lm_head.weight is wte.weight: listed once
            if ".ln_" in name or "ln_f." in name:
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    def num_parameters(self) -> int:
        """Weights the model computes with (a quantized layer counts its in x out weights, not its bytes)."""
        quantized = [m for m in self.modules() if isinstance(m, quantization.QuantizedLinear)]
        stored = {id(p) for m in quantized for p in (m.qweight, m.scales, m.zeros) if p is not None}
        return (sum(p.numel() for p in self.parameters() if id(p) not in stored)   # parameters() dedups ties
                + sum(m.in_features * m.out_features for m in {id(m.qweight): m for m in quantized}.values()))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype the model computes in (a quantized model's integer weights are not it)."""
        return next(p for p in self.parameters() if p.is_floating_point()).dtype

    def dequantize(self):
        """A quantized model back in float, in place (quantization.dequantize); returns the model."""
        return quantization.dequantize(self)


class GPT2Model(PreTrained):
    """The transformer without a head: input_ids (B, T) -> last_hidden_state (B, T, C)."""

    def __init__(self, config: GPT2Config, init: bool = True):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)   # token embeddings
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)  # learned position embeddings
        self.drop = nn.Dropout(config.embd_pdrop)
        self.h = nn.ModuleList([GPT2Block(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.gradient_checkpointing = False  # recompute each block in backward (torch.utils.checkpoint)
        # one registry for every named activation point (hooks.py); empty = no hooks, no cost
        self.hook_registry = HookRegistry()
        for m in self.modules():
            if isinstance(m, (GPT2Attention, GPT2MLP, GPT2Block)):
                m.hook = self.hook_registry
        if init and not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, token_type_ids=None,
                inputs_embeds=None, past_key_values: Optional[KVCache] = None, use_cache: bool = False,
                output_hidden_states: bool = False, output_attentions: bool = False) -> GPT2Output:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids (B, T) or inputs_embeds (B, T, n_embd)")
        if input_ids is not None:
            input_ids = check_token_ids(input_ids, self.config.vocab_size, "input_ids", sync_free=True)
            B, T = input_ids.shape
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.n_embd:
                raise ValueError(f"inputs_embeds must be (B, T, {self.config.n_embd}), got {tuple(inputs_embeds.shape)}")
            B, T = inputs_embeds.shape[:2]
        cache = past_key_values
        if cache is None and use_cache:
            cache = KVCache.for_model(self.config, B, dtype=self.wpe.weight.dtype, device=self.wpe.weight.device)
        past = cache.length if cache is not None else 0
        if past + T > self.config.n_positions:
            raise ValueError(f"sequence length {past + T} (cached {past} + new {T}) exceeds the model's maximum "
                             f"context n_positions={self.config.n_positions}")
        if attention_mask is not None:
            attention_mask = check_mask_shape(attention_mask, (B, past + T), "batch, cached + new tokens")
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, past, T, self.wpe.weight.device)
        elif position_ids.shape[-1] != T:
            raise ValueError(f"position_ids must have {T} positions (one per new token), got {tuple(position_ids.shape)}")

        x = self.wte(input_ids) if inputs_embeds is None else inputs_embeds
        x = x + self.wpe(position_ids)
        if token_type_ids is not None:  # GPT-2 has no segment table: transformers reuses wte
            x = x + self.wte(check_token_ids(token_type_ids, self.config.vocab_size, "token_type_ids", sync_free=True))
        return self.run(x, AttentionMask.build(attention_mask, past, T), cache, output_hidden_states,
                        output_attentions)

    def run(self, x: torch.Tensor, mask: AttentionMask, cache: Optional[KVCache] = None,
            output_hidden_states: bool = False, output_attentions: bool = False) -> GPT2Output:
        """The network proper, on checked inputs: embeddings x (B, T, C) (tokens + positions) -> last_hidden_state.
        `forward` validates and calls this; generation's decode step calls it directly (its inputs are its own)."""
        x = self.drop(self.hook_registry("embed", x))
        hidden_states, attentions = [], []
        for block in self.h:
            if output_hidden_states:
                hidden_states.append(x)
            if self.gradient_checkpointing and self.training and cache is None:
                x, probs = checkpoint(block, x, mask, None, output_attentions, use_reentrant=False)
            else:
                x, probs = block(x, mask, cache, output_attentions)
            if output_attentions:
                attentions.append(probs)
        if cache is not None:
            cache.advance(mask.q_len)
        x = self.hook_registry("ln_f", self.ln_f(x))
        if output_hidden_states:  # transformers' convention: the last entry is after ln_f
            hidden_states.append(x)
        return GPT2Output(last_hidden_state=x, past_key_values=cache,
                          hidden_states=tuple(hidden_states) if output_hidden_states else None,
                          attentions=tuple(attentions) if output_attentions else None)


class GPT2LMHeadModel(PreTrained):
    """GPT-2 with its language-model head: next-token logits (B, T, vocab_size), and the loss given labels."""

    def __init__(self, config: GPT2Config, init: bool = True):
        super().__init__()
        self.config = config
        self.transformer = GPT2Model(config, init=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # one matrix reads tokens in and out
        if init and not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def tie_weights(self) -> None:
        if not self.config.tie_word_embeddings:
            return
        if isinstance(self.lm_head, quantization.QuantizedLinear):
            quantization.tie(self)          # weight, scales and zeros: one quantized matrix (quantization.py)
        else:
            self.lm_head.weight = self.transformer.wte.weight

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, token_type_ids=None,
                inputs_embeds=None, past_key_values: Optional[KVCache] = None, use_cache: bool = False,
                labels=None, output_hidden_states: bool = False, output_attentions: bool = False,
                logits_to_keep: int = 0) -> GPT2Output:
        """`labels` (B, T): the loss is mean cross-entropy of logits[:, t] against labels[:, t + 1] (the
        shift happens here, so labels = input_ids works), skipping -100. `logits_to_keep` > 0 computes
        logits for the last that-many positions only (generation needs one)."""
        out = self.transformer(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               token_type_ids=token_type_ids, inputs_embeds=inputs_embeds,
                               past_key_values=past_key_values, use_cache=use_cache,
                               output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        out.logits = self.lm_head(h)
        if labels is not None:
            if tuple(labels.shape) != tuple(out.logits.shape[:2]) or logits_to_keep:
                raise ValueError(f"labels must be (B, T) = {tuple(out.logits.shape[:2])} and logits_to_keep 0, "
                                 f"got labels {tuple(labels.shape)}")
            logits = out.logits[:, :-1].float()  # fp32 loss, as transformers computes it
            out.loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1).long(),
                                       ignore_index=-100)
        return out

    def decode_step(self, tokens: torch.Tensor, position_ids: torch.Tensor, mask: AttentionMask,
                    cache: KVCache) -> torch.Tensor:
        """One new token per row against the cache: tokens (N,), position_ids (N or 1, 1) -> logits (N, V).

        generate()'s inner loop. It skips `forward`'s input checks and their host syncs (the loop made these
        inputs itself) and builds no output object; hooks run as in any forward."""
        t = self.transformer
        out = t.run(t.wte(tokens[:, None]) + t.wpe(position_ids), mask, cache)
        return self.lm_head(out.last_hidden_state[:, -1])

    @torch.no_grad()
    def generate(self, input_ids, **kwargs):
        """Greedy / sampling / beam search with transformers' arguments; see generation.py."""
        return generation.generate(self, input_ids, **kwargs)
