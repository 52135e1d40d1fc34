"""GPT2Config: the model's hyperparameters, with Hugging Face's field names, defaults and config.json format.

Pure data: the dataclass, its checks, JSON in and out, and the presets. Finding a checkpoint's config.json is
files.py's job.

A config read from a Hugging Face `config.json` keeps every key it does not know (in `extra`) and writes
them back on save, so a round trip through nanogpt2 never loses information transformers relies on.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from .files import HubUnavailable, resolve

# Activations GPT-2 checkpoints use, by transformers' ACT2FN name. "gelu_new" is GPT-2's own tanh
# approximation; "gelu" is the exact erf form, a (slightly) different function.
SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu", "relu", "silu", "swish",
                         "tanh", "quick_gelu")


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024          # max context ("block_size" in nanoGPT)
    n_embd: int = 768                # model width C
    n_layer: int = 12
    n_head: int = 12                 # head dim = n_embd // n_head (64 in every OpenAI GPT-2)
    n_inner: Optional[int] = None    # MLP width; None means 4 * n_embd
    activation_function: str = "gelu_new"  # GPT-2's tanh GELU; nn.GELU()'s default (erf) is a different function
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    layer_norm_epsilon: float = 1e-5
    initializer_range: float = 0.02
    scale_attn_weights: bool = True                # divide scores by sqrt(head_dim)
    scale_attn_by_inverse_layer_idx: bool = False  # and by (layer_idx + 1) (Mistral's GPT-2 stabiliser)
    reorder_and_upcast_attn: bool = False          # compute scores/softmax in fp32 (Mistral's fp16 fix)
    add_cross_attention: bool = False              # encoder-decoder use; refused (see validate)
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    pad_token_id: Optional[int] = None
    tie_word_embeddings: bool = True               # lm_head shares wte's weight
    # Keys of a config.json this class does not model (architectures, task_specific_params, n_ctx, ...),
    # kept verbatim so save_pretrained writes them back.
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def validate(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPT2Config.{name} must be a positive integer, got {value!r}")
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner < 1):
            raise ValueError(f"GPT2Config.n_inner must be None or a positive integer, got {self.n_inner!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPT2Config.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                             f"valid n_head values divide {self.n_embd}")
        if self.activation_function not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"GPT2Config.activation_function {self.activation_function!r} is not supported; "
                             f"valid: {', '.join(SUPPORTED_ACTIVATIONS)}")
        if self.add_cross_attention:
            raise ValueError("GPT2Config.add_cross_attention=True (encoder-decoder GPT-2) is not supported by "
                             "nanogpt2: it implements the decoder-only GPT-2")
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"GPT2Config.{name} must be in [0, 1), got {p!r}")
        if self.layer_norm_epsilon <= 0:
            raise ValueError(f"GPT2Config.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")

    # ---- dict / JSON (Hugging Face's config.json) -----------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GPT2Config":
        d = dict(d)
        model_type = d.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"config.json has model_type {model_type!r}; nanogpt2 loads only 'gpt2' checkpoints")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: d.pop(k) for k in list(d) if k in names}
        extra = dict(d.pop("extra", {}) or {})
        extra.update(d)
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.extra)
        d.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"})
        d["model_type"] = "gpt2"
        d.setdefault("architectures", ["GPT2LMHeadModel"])
        d.setdefault("n_ctx", self.n_positions)  # older transformers read n_ctx
        return dict(sorted(d.items()))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "GPT2Config":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def from_pretrained(cls, name_or_path: str, revision: Optional[str] = None, **overrides) -> "GPT2Config":
        """Config of a local directory, bundled model or hub id (files.resolve; only config.json is fetched). A
        preset name ("gpt2", ...) that the hub cannot serve here (offline and not cached) gives the preset: its
        values are the hub's config.json. Any other failure (a broken directory, a bad file) is an error."""
        try:
            config = cls.from_json_file(resolve(name_or_path, revision, weights=False).config_file)
        except HubUnavailable:
            if name_or_path not in PRESETS:
                raise
            config = cls.preset(name_or_path)
        return dataclasses.replace(config, **overrides) if overrides else config

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPT2Config":
        if name not in PRESETS:
            raise ValueError(f"unknown GPT-2 preset {name!r}; valid: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# The sizes OpenAI (and Hugging Face, for distilgpt2) released; everything else is the default above.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2":        dict(n_layer=12, n_head=12, n_embd=768),    # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),   # 350M
    "gpt2-large":  dict(n_layer=36, n_head=20, n_embd=1280),   # 774M
    "gpt2-xl":     dict(n_layer=48, n_head=25, n_embd=1600),   # 1558M
    "distilgpt2":  dict(n_layer=6, n_head=12, n_embd=768),     # 82M
}
