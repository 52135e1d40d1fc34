"""The optimizer and learning-rate schedule of a training run: AdamW with weight decay on 2-D tensors only
(nanoGPT's configure_optimizers), linear warmup then cosine decay (GPT-3 paper, appendix B; nanoGPT get_lr)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def build_optimizer(model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
                    device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: 2-D tensors (matmul weights, embeddings, LoRA A/B) decay,
    biases and LayerNorm parameters do not (nanoGPT; decaying a gain or shift pulls it to 0, not to a
    sensible prior). The tied lm_head/wte matrix appears once (parameters() dedups it)."""
    check_trainable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"  # one kernel for all parameters; CPU keeps the (deterministic) for-each path
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)


def check_trainable(model: nn.Module) -> None:
    """A quantized model (quantization.py) trains LoRA adapters only (QLoRA): its integer weights cannot take
    optimizer steps, and training its float leftovers (biases, LayerNorms) alone is not what a user asking
    for fine-tuning means. Refuse it with the two ways forward."""
    if not any(not p.is_floating_point() for p in model.parameters()):
        return
    full = [n for n, p in model.named_parameters() if p.requires_grad and ".lora_" not in n]
    if full:
        raise ValueError(f"this model has quantized (integer) weights, which an optimizer cannot update, and "
                         f"trainable non-adapter parameters ({', '.join(full[:3])}{', ...' if len(full) > 3 else ''})"
                         ": train LoRA adapters on it (apply_lora, or tools/train.py --lora-r 8), or call "
                         "nanogpt2.dequantize(model) first for full fine-tuning")


class WarmupCosine:
    """lr multiplier at `step`: linear warmup to 1, cosine to min_ratio at decay_steps, then min_ratio.
    A callable object (not a lambda), so LambdaLR's state_dict saves its fields (plain numbers) with the
    checkpoint."""

    def __init__(self, warmup_steps: int, decay_steps: int, min_ratio: float):
        self.warmup_steps, self.decay_steps, self.min_ratio = warmup_steps, decay_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if step >= self.decay_steps:
            return self.min_ratio
        progress = (step - self.warmup_steps) / max(1, self.decay_steps - self.warmup_steps)
        return self.min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - self.min_ratio)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, decay_steps: int,
                    min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per optimizer step: lr = peak lr * WarmupCosine(step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup_steps, decay_steps, min_ratio))
