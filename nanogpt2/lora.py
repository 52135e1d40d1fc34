"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), from scratch, in PEFT's format.

A frozen projection y = x W^T + b gets a trainable low-rank update:

    y = x W^T + b + (alpha / r) * dropout(x) A^T B^T       A: (r, in), B: (out, r), B = 0 at init

so training starts exactly at the base model (paper section 4.1) and only r * (in + out) numbers per
projection learn. Targets are GPT-2's projections: c_attn (fused q, k, v), c_proj (both attn.c_proj and
mlp.c_proj: a name matches every module whose dotted path ends with it, PEFT's suffix rule), c_fc.

Files are PEFT's, so adapters move both ways between nanogpt2 and `peft` + `transformers`:
  adapter_config.json        peft_type LORA, r, lora_alpha, target_modules, fan_in_fan_out=true, ...
  adapter_model.safetensors  base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight (r, in),
                             ...lora_B.weight (out, r)
PEFT stores lora_A/lora_B as nn.Linear weights even for HF's Conv1D layers (fan_in_fan_out=True only
transposes the merged delta B @ A, to Conv1D's [in, out] layout); our projections are nn.Linear [out, in],
so the tensors are the same and the delta is B @ A, untransposed. Scaling is alpha / r, or alpha / sqrt(r)
with use_rslora (Kalajdzievski 2023), as PEFT computes it.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."       # PeftModelForCausalLM wraps (LoraModel wraps) the transformers model
LORA_MODULES = ("c_attn", "c_proj", "c_fc")


class LoRALinear(nn.Module):
    """An nn.Linear `base_layer` (frozen) plus the low-rank branch lora_B(lora_A(dropout(x))) * scaling.
    Submodule names follow PEFT's LoRA layer (base_layer, lora_A, lora_B, lora_dropout)."""
    # read by weights.check_saveable: these keys would make a checkpoint no GPT-2 loader accepts
    checkpoint_refusal = ("it has unmerged LoRA adapters: call nanogpt2.lora.merge_lora(model) first to save a "
                          "plain checkpoint, or nanogpt2.lora.save_adapter(model, dir) to save the adapters")

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        self.base_layer = base_layer
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        dev = next(base_layer.parameters()).device
        # a quantized base (QLoRA; quantization.QuantizedLinear) stores integers: the adapters compute in its
        # float dtype, which it names compute_dtype
        dt = getattr(base_layer, "compute_dtype", None) or base_layer.weight.dtype
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=dev, dtype=dt)   # (r, in)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=dev, dtype=dt)  # (out, r)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # PEFT's default init (init_lora_weights=True): A ~ kaiming-uniform(a=sqrt(5)), B = 0 -> delta = 0
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def weight(self) -> torch.Tensor:  # what code reading `c_attn.weight` expects: the frozen base weight
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A: (out, in), the update in nn.Linear's layout (no transpose: see the module doc)."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, in) -> (B, T, out); the branch costs 2 small matmuls through rank r
        return self.base_layer(x) + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


# ---- which modules ------------------------------------------------------------------------------

def _linear_names(model: nn.Module) -> list[str]:
    """Dotted names of the adaptable projections: every nn.Linear (or LoRALinear) inside the blocks."""
    return [n for n, m in model.named_modules() if _is_projection(m) and ".h." in f".{n}"
            and not n.endswith((".lora_A", ".lora_B", ".base_layer"))]


def _is_projection(m: nn.Module) -> bool:
    """nn.Linear, a LoRALinear, or a layer that computes as one from other storage (quantization.QuantizedLinear:
    it has in/out_features and a compute_dtype); lora.py does not import quantization.py, which imports lora.py."""
    return isinstance(m, (nn.Linear, LoRALinear)) or hasattr(m, "compute_dtype") and hasattr(m, "in_features")


def _valid_targets(names: Iterable[str]) -> list[str]:
    """Suffixes a user may name: c_attn, c_proj, c_fc and the two-part attn.c_proj / mlp.c_proj."""
    out = []
    for n in names:
        parts = n.split(".")
        for k in (1, 2):
            s = ".".join(parts[-k:])
            if s not in out:
                out.append(s)
    return out


def _matches(name: str, target_modules) -> bool:
    """PEFT's rule: a string is a regex matched against the full name; a list matches by dotted suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _targets(model: nn.Module, target_modules) -> list[str]:
    names = _linear_names(model)
    valid = _valid_targets(names)
    if isinstance(target_modules, str) and not re.fullmatch(r"[\w.]+", target_modules):
        chosen = [n for n in names if _matches(n, target_modules)]
        if not chosen:
            raise ValueError(f"target_modules regex {target_modules!r} matches no projection; module names look like "
                             f"{names[0]!r}; valid names: {', '.join(valid)}")
        return chosen
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not targets:
        raise ValueError(f"target_modules is empty; valid names: {', '.join(valid)}")
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            raise ValueError(f"unknown LoRA target module {t!r}; valid names: {', '.join(valid)}")
    return [n for n in names if _matches(n, targets)]


# ---- apply, merge, inspect ----------------------------------------------------------------------

def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float = 0.0,
               target_modules: Sequence[str] | str = ("c_attn",), use_rslora: bool = False) -> nn.Module:
    """Freeze every parameter of `model` and wrap the target projections in LoRALinear (in place).

    r: rank (> 0); alpha: the update is scaled by alpha / r; target_modules: names matched by suffix
    (("c_attn",), ("c_attn", "c_proj", "c_fc"), ("mlp.c_proj",), ...) or one regex string, as in PEFT.
    Returns the model, whose trainable parameters are now only the lora_A / lora_B weights.
    """
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
    if not alpha > 0:
        raise ValueError(f"lora alpha must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"lora dropout must be in [0, 1), got {dropout!r}")
    if has_lora(model):
        raise ValueError("this model already has LoRA adapters; merge_lora(model) first to stack another")
    names = _targets(model, target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout, use_rslora))
    # PEFT reads a string target_modules as a regex over full names, a list as suffixes: save a plain name as a list
    if isinstance(target_modules, str) and re.fullmatch(r"[\w.]+", target_modules):
        target_modules = [target_modules]
    model._lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": use_rslora,
                          "target_modules": target_modules if isinstance(target_modules, str) else list(target_modules)}
    return model


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its projection (W <- W + scaling * B @ A) and put the plain nn.Linear back,
    so the model is an ordinary GPT-2 again: save_pretrained writes a checkpoint transformers loads.
    The base parameters stay frozen (requires_grad False) as apply_lora left them."""
    quantized = [n for n, m in lora_modules(model).items() if not isinstance(m.base_layer, nn.Linear)]
    if quantized:
        raise ValueError(f"cannot merge LoRA into a quantized base ({quantized[0]}, ...): its integer weights cannot "
                         "hold the sum; call nanogpt2.dequantize(model) first (then merge_lora), or keep the "
                         "adapters separate with save_adapter")
    for name, m in lora_modules(model).items():
        base = m.base_layer
        base.weight += m.delta_weight().to(base.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, base)
    if hasattr(model, "_lora_config"):
        del model._lora_config
    return model


# ---- PEFT-format files ----------------------------------------------------------------------------

def save_adapter(model: nn.Module, directory: str, base_model_name_or_path: Optional[str] = None) -> None:
    """adapter_config.json + adapter_model.safetensors in PEFT's format (see the module doc)."""
    from safetensors.torch import save_file
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters to save; call apply_lora(model, r, alpha) first")
    cfg = getattr(model, "_lora_config", None) or {}
    first = next(iter(mods.values()))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path, "revision": None,
        "r": first.r, "lora_alpha": first.alpha, "lora_dropout": cfg.get("lora_dropout", 0.0),
        "target_modules": cfg.get("target_modules", sorted({n.rsplit(".", 1)[-1] for n in mods})),
        "fan_in_fan_out": True,  # GPT-2's projections are Conv1D in transformers
        "bias": "none", "use_rslora": first.use_rslora, "use_dora": False, "modules_to_save": None,
        "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "inference_mode": True,
    }
    tensors = {}
    for name, m in mods.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach().contiguous()  # (r, in)
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach().contiguous()  # (out, r)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})


# PEFT options this implementation does not model; an adapter using them is refused, never half-loaded.
_UNSUPPORTED = {"use_dora": False, "bias": "none", "modules_to_save": None, "layers_to_transform": None,
                "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False, "layer_replication": None,
                "target_parameters": None, "trainable_token_indices": None, "use_qalora": False}


def load_adapter(model: nn.Module, directory: str) -> nn.Module:
    """Load a PEFT LoRA adapter (ours or one peft wrote for transformers' GPT-2) into `model`.
    Applies LoRA per the adapter's config when the model has none yet; otherwise the existing adapters must
    have the same modules and rank. Every adapter tensor must be used and every adapter filled."""
    from safetensors.torch import load_file
    cfg_path, w_path = os.path.join(directory, ADAPTER_CONFIG), os.path.join(directory, ADAPTER_WEIGHTS)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{directory!r} is not a LoRA adapter directory: no {ADAPTER_CONFIG}")
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported; nanogpt2 loads LORA only")
    for key, default in _UNSUPPORTED.items():
        value = cfg.get(key, default)
        if value != default and value not in (None, False, {}, []):
            raise ValueError(f"{cfg_path}: {key}={cfg[key]!r} is not supported by nanogpt2's LoRA "
                             f"(supported: {key}={default!r})")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    if not has_lora(model):
        apply_lora(model, r=r, alpha=alpha, dropout=cfg.get("lora_dropout", 0.0),
                   target_modules=cfg["target_modules"], use_rslora=bool(cfg.get("use_rslora", False)))
    mods = lora_modules(model)
    if not os.path.isfile(w_path):
        raise FileNotFoundError(f"{directory!r} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
    tensors = load_file(w_path)
    filled = set()
    for key, t in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        name = name.replace(".default.", ".")  # some peft versions keep the adapter name in the key
        mod_name, _, leaf = name.rpartition(".lora_")
        if mod_name not in mods or leaf not in ("A.weight", "B.weight"):
            raise ValueError(f"{w_path}: tensor {key!r} matches no LoRA module of this model (adapted modules: "
                             f"{', '.join(list(mods)[:4])}, ...)")
        target = (mods[mod_name].lora_A if leaf == "A.weight" else mods[mod_name].lora_B).weight
        if tuple(t.shape) != tuple(target.shape):
            raise ValueError(f"{w_path}: tensor {key!r} has shape {list(t.shape)}, this model's needs "
                             f"{list(target.shape)} (r={mods[mod_name].r})")
        with torch.no_grad():
            target.copy_(t)
        filled.add(f"{mod_name}.{leaf}")
    missing = [f"{n}.{leaf}" for n in mods for leaf in ("A.weight", "B.weight") if f"{n}.{leaf}" not in filled]
    if missing:
        raise ValueError(f"{w_path} lacks adapter tensor(s) for {', '.join(missing[:4])}"
                         f"{' ...' if len(missing) > 4 else ''}")
    return model
