"""Weight-only quantization of GPT-2: int8 (one scale per output channel) and int4 (group-wise), for fast
batch-1 decoding and for LoRA fine-tuning on a frozen integer base (QLoRA's idea, Dettmers et al. 2023).

Batch-1 decoding reads every weight once per token, so tokens/s is bounded by bytes of weights / memory
bandwidth: int8 reads a quarter of fp32's bytes, int4 an eighth (plus scales). Activations stay in floating
point ("weight-only", as gpt-fast and llama.cpp do); only the matrices of the four block projections
(c_attn, attn.c_proj, c_fc, mlp.c_proj) and lm_head are quantized. LayerNorms, biases and wpe stay float.

Schemes (w: one row of a weight [out=N, in=K], nn.Linear layout):
  int8  symmetric per output channel:  scale[n] = max|w[n, :]| / 127,  q = round(w / scale) in [-127, 127],
        w ~= q * scale.  Per-channel because GPT-2's rows differ in range by >10x; symmetric because a
        zero point buys nothing at 8 bits and costs a subtraction per weight.
  int4  asymmetric per group of g in {32, 64, 128} consecutive inputs (gpt-fast's int4 and torch's
        _weight_int4pack_mm convention): scale = (max - min) / 15, zero = min + 8 * scale,
        q = round((w - min) / scale) in [0, 15], w ~= (q - 8) * scale + zero. Two weights a byte: input k = 2j
        in the low nibble of byte j, k = 2j + 1 in the high one. A zero point per group because 16 levels
        cannot afford to waste half the range on a sign the group may not use.
  Measured error, the bundled shakespeare-tiny (trained, n_embd 64; its whole validation split, 33,669 tokens
  scored in windows of 256; KL and top-1 over its first 256 positions; benchmarks/quantize.py, CPU kernels):
      scheme      perplexity vs fp32   KL(fp32 || q) nats   top-1 agreement
      int8        -0.01 %              8.7e-5               100 %
      int4 g32    +0.69 %              5.1e-3               94 %
      int4 g64    +1.27 %              5.2e-3               97 %
  (g128 does not divide its n_embd 64; bf16 weights for comparison: +0.04 %.) The 124M-shape figures (random
  weights) are in BENCHMARKS.md, "Quantized weights"; tests/test_quantization.py bounds the logits against fp32
  for every scheme.

The tied embedding: GPT-2's lm_head *is* wte. Quantized, it stays one matrix: lm_head holds the integer
weight, scales (and zeros), and wte is a QuantizedEmbedding whose lookup reads those same tensors and
dequantizes only the rows it gathers ((B, T) rows of n_embd per step), so token embeddings carry the same
rounding error as the head's logits and no float copy of the 50257 x n_embd matrix exists.

Tensors are nn.Parameters with requires_grad=False (integers cannot take gradients), so that a tie survives
`model.to(...)` as a float tie does (module buffers are replaced per module; a shared Parameter is moved
once). The kernels, by device:
  CPU   torch's weight-only matmul ops, aten._weight_int8pack_mm and aten._weight_int4pack_mm_for_cpu: they
        stream the integer weights at the machine's read bandwidth, vectorized for bf16 activations only
        (with fp32 activations int8 runs 4-6x slower than fp32 dense here), so activations enter the matmul
        in bf16 and leave in the model's dtype; accumulation is fp32 inside the op. int4 needs the op's own
        packed layout (and N a multiple of 16): a derived copy made by `repack()`, not saved.
  CUDA  nanogpt2.kernels.int8_linear / int4_linear: Triton, dequantizing in registers (kernels/quant_matmul.py).
  other NotImplementedError naming dequantize(): dequantizing every weight per call would be slower than float.
Training through a quantized layer (LoRA on top) differentiates x only: backward multiplies by the
dequantized weight, made per layer when needed and dropped after, so no float copy outlives a step.

Checkpoints: save_pretrained writes the integer tensors, scales and zeros under the layer's name
(`transformer.h.0.attn.c_attn.weight` int8/uint8 — `qweight` in memory, so that no code reading `.weight`
gets integers —, `...c_attn.scales`, `...c_attn.zeros`), in nn.Linear's
[out, in] layout (not Conv1D's [in, out]), lm_head left out when tied (as HF does), and config.json gains
    "quantization_config": {"quant_method": "nanogpt2", "format_version": 1, "mode": "int4",
                            "group_size": 64, "modules": ["c_attn", "attn.c_proj", ...]}
from_pretrained reads that back without re-quantizing. transformers (5.x) logs "Unknown quantization type, got
nanogpt2 ... we will skip the quantization" and then refuses the integer tensors' shapes (a RuntimeError after
its load report); `dequantize(model)` + save_pretrained writes the plain HF format it loads.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import _kernels   # one rule for "are the Triton kernels here" (None only without triton)
from .lora import LoRALinear

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)          # the three, which both kernels take; 64: the default (quality vs bytes)
DEFAULT_GROUP_SIZE = 64
QUANT_METHOD, FORMAT_VERSION = "nanogpt2", 1
BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
CPU_INT4_ROWS = 16                   # aten._convert_weight_to_int4pack_for_cpu wants N % 16 == 0


# ---- the arithmetic -------------------------------------------------------------------------------

def check_scheme(mode, group_size, in_features: Optional[int] = None, where: str = "") -> Optional[int]:
    """The group size a (mode, group_size) request means (None for int8), or a ValueError naming the bad value."""
    if mode not in MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; valid: {', '.join(map(repr, MODES))}")
    if mode == "int8":
        if group_size is not None:
            raise ValueError(f"group_size={group_size!r} applies to int4 only; int8 has one scale per output "
                             "channel (leave group_size unset)")
        return None
    g = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if not isinstance(g, int) or isinstance(g, bool) or g not in GROUP_SIZES:
        raise ValueError(f"int4 group_size {group_size!r} is not supported; valid: {', '.join(map(str, GROUP_SIZES))}")
    if in_features is not None and in_features % g:
        raise ValueError(f"int4 group_size {g} does not divide in_features={in_features}{where}; pick one of "
                         f"{', '.join(str(s) for s in GROUP_SIZES if in_features % s == 0) or 'none: use int8'}")
    return g


ROWS_PER_CHUNK = 4096   # quantize this many rows at a time: temporaries stay ~4096 x K floats, not a whole wte


@torch.no_grad()
def quantize_int8(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> q (N, K) int8, scales (N,) scale_dtype. q is rounded against the *stored* scale (a
    scale that rounds to 0 in fp16 is held at the dtype's smallest normal number)."""
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(w.shape[0], dtype=scale_dtype, device=w.device)
    tiny = torch.finfo(scale_dtype).tiny
    for r in range(0, w.shape[0], ROWS_PER_CHUNK):
        rows = w[r:r + ROWS_PER_CHUNK].to(torch.float32, copy=True)   # a copy: rounded in place below
        s = (rows.abs().amax(dim=1) / 127).clamp_(min=tiny).to(scale_dtype)
        scales[r:r + ROWS_PER_CHUNK] = s
        q[r:r + ROWS_PER_CHUNK] = rows.div_(s.float()[:, None]).round_().clamp_(-127, 127)
    return q, scales


@torch.no_grad()
def quantize_int4(w: torch.Tensor, group_size: int, scale_dtype: torch.dtype):
    """w (N, K) float -> packed (N, K/2) uint8, scales and zeros (N, K/g) scale_dtype (see the module doc)."""
    N, K = w.shape
    packed = torch.empty(N, K // 2, dtype=torch.uint8, device=w.device)
    scales = torch.empty(N, K // group_size, dtype=scale_dtype, device=w.device)
    zeros = torch.empty_like(scales)
    for r in range(0, N, ROWS_PER_CHUNK):
        wg = w[r:r + ROWS_PER_CHUNK].to(torch.float32, copy=True).view(-1, K // group_size, group_size)
        lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
        s = ((hi - lo).clamp(min=1e-6) / 15).to(scale_dtype)
        z = (lo + 8 * s.float()).to(scale_dtype)
        low = z.float() - 8 * s.float()                                # the value q = 0 stands for
        q = wg.sub_(low[..., None]).div_(s.float()[..., None]).round_().clamp_(0, 15).to(torch.uint8).view(-1, K)
        packed[r:r + ROWS_PER_CHUNK] = q[:, 0::2] | (q[:, 1::2] << 4)
        scales[r:r + ROWS_PER_CHUNK], zeros[r:r + ROWS_PER_CHUNK] = s, z
    return packed, scales, zeros


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) uint8 in [0, 15]: low nibble is the even input, high nibble the odd one."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).view(*packed.shape[:-1], -1)


def dequantize_rows(weight, scales, zeros, group_size, dtype) -> torch.Tensor:
    """Integer rows (..., K) int8 or (..., K/2) uint8 + their scales (and zeros) -> float rows (..., K)."""
    if zeros is None:                                                   # int8: one scale per row
        return weight.to(dtype) * scales.to(dtype)[..., None]
    q = unpack_int4(weight)
    shape = q.shape
    q = q.view(*shape[:-1], shape[-1] // group_size, group_size).to(dtype)
    return ((q - 8) * scales.to(dtype)[..., None] + zeros.to(dtype)[..., None]).view(shape)


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


# ---- the layers ---------------------------------------------------------------------------------

class QuantizedLinear(nn.Module):
    """y = x W^T + b with W stored as int8 (per-channel scales) or int4 (group-wise scales and zeros)."""

    def __init__(self, in_features: int, out_features: int, mode: str, group_size: Optional[int] = None,
                 bias: bool = True, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.group_size = check_scheme(mode, group_size, in_features)
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        N, K = out_features, in_features
        if mode == "int8":
            self.qweight = _frozen(torch.empty(N, K, dtype=torch.int8, device=device))
            self.scales = _frozen(torch.empty(N, dtype=dtype, device=device))
            self.zeros = None
        else:
            self.qweight = _frozen(torch.empty(N, K // 2, dtype=torch.uint8, device=device))
            self.scales = _frozen(torch.empty(N, K // self.group_size, dtype=dtype, device=device))
            self.zeros = _frozen(torch.empty(N, K // self.group_size, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(N, dtype=dtype, device=device)) if bias else None
        # the CPU op's layouts, derived from the tensors above by repack() (never saved)
        self.register_buffer("cpu_qweight", None, persistent=False)
        self.register_buffer("cpu_scales", None, persistent=False)
        self.register_load_state_dict_post_hook(QuantizedLinear._repack_after_load)

    @classmethod
    @torch.no_grad()
    def from_float(cls, weight: torch.Tensor, bias: Optional[torch.Tensor], mode: str,
                   group_size: Optional[int] = None) -> "QuantizedLinear":
        """Quantize a float weight (N, K) (+ bias (N,)); scales keep the weight's dtype."""
        N, K = weight.shape
        layer = cls(K, N, mode, group_size, bias=bias is not None, dtype=weight.dtype, device="meta")
        if mode == "int8":
            q, scales = quantize_int8(weight, weight.dtype)
            layer.qweight, layer.scales = _frozen(q), _frozen(scales)
        else:
            q, scales, zeros = quantize_int4(weight, layer.group_size, weight.dtype)
            layer.qweight, layer.scales, layer.zeros = _frozen(q), _frozen(scales), _frozen(zeros)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)
        layer.repack()
        return layer

    @staticmethod
    def _repack_after_load(module, incompatible_keys) -> None:   # a function, not a lambda: torch.save pickles it
        module.repack()

    @property
    def compute_dtype(self) -> torch.dtype:
        """The float dtype of this layer's inputs and outputs (its scales' dtype)."""
        return self.scales.dtype

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The float weight (N, K) these integers stand for."""
        return dequantize_rows(self.qweight, self.scales, self.zeros, self.group_size, dtype or self.compute_dtype)

    @torch.no_grad()
    def repack(self) -> None:
        """(Re)build the CPU op's derived layouts from weight/scales/zeros; called on creation, after loading a
        state dict and after every move (`_apply`). Nothing to do on other devices."""
        self.cpu_qweight = self.cpu_scales = None
        if self.qweight.device.type != "cpu":
            return
        if self.mode == "int8":
            if self.qweight.data_ptr() % 64:
                # the int8 op reads the weight with aligned vector loads: a tensor read from a safetensors file
                # can start mid-cache-line (seen: offset 60) and crashed the process. A fresh copy is aligned.
                self.qweight.data = self.qweight.data.clone()
            self.cpu_scales = self.scales.to(torch.bfloat16)
            return
        N = self.out_features
        pad = -N % CPU_INT4_ROWS                      # padded rows: q = 8, scale = zero = 0 -> exact zeros, sliced off
        q = F.pad(unpack_int4(self.qweight).to(torch.int32), (0, 0, 0, pad), value=8)
        self.cpu_qweight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.stack([F.pad(self.scales, (0, 0, 0, pad)), F.pad(self.zeros, (0, 0, 0, pad))], dim=-1)
        self.cpu_scales = sz.transpose(0, 1).contiguous().to(torch.bfloat16)   # (K/g, N + pad, 2)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.repack()       # .to(device) / .float() ...: the CPU layouts follow the tensors they derive from
        return self

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) -> x W^T (..., N) in x's dtype, no bias, no autograd (forward adds both)."""
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x.device.type == "cpu":
            if self.cpu_scales is None:
                raise RuntimeError("this QuantizedLinear's CPU layout is missing (its tensors were replaced by "
                                   "hand); call .repack() after changing qweight, scales or zeros")
            xb = x2.to(torch.bfloat16).contiguous()
            if self.mode == "int8":
                y = torch.ops.aten._weight_int8pack_mm(xb, self.qweight, self.cpu_scales)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.cpu_qweight, self.group_size, self.cpu_scales)
                y = y[:, : self.out_features]
        elif x.device.type == "cuda":
            k = _kernels()      # GEMV for a few rows (decode), GEMM otherwise; scales in any float dtype
            if k is None:
                raise RuntimeError("quantized layers on CUDA run nanogpt2's Triton kernels, and triton is not "
                                   "installed: pip install triton, or dequantize(model) for float weights")
            if self.mode == "int8":
                y = k.int8_linear(x2, self.qweight, self.scales)
            else:
                y = k.int4_linear(x2, self.qweight, self.scales, self.zeros, self.group_size)
        else:   # dequantizing every weight per call would be slower than float, never what one quantizes for
            raise NotImplementedError(f"no weight-only kernel for device {x.device.type!r} (CPU and CUDA have "
                                      "them): dequantize(model) to run float weights there")
        return y.to(x.dtype).view(*shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _QuantizedMatmul.apply(x, self) if torch.is_grad_enabled() and x.requires_grad else self.matmul(x)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}{g}, " \
               f"bias={self.bias is not None}"


class _QuantizedMatmul(torch.autograd.Function):
    """x W^T with W integer: the gradient goes to x only, through the weight dequantized in backward (and
    dropped after), so a LoRA step never keeps a float copy of the base."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer.matmul(x)

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantized_weight(grad.dtype), None


class QuantizedEmbedding(nn.Module):
    """wte when lm_head is quantized and tied to it: a lookup into the head's integer rows (the same Parameter
    objects), dequantized after the gather: (B, T) ids -> (B, T, C), reading B*T rows, never the whole table."""

    def __init__(self, head: QuantizedLinear):
        super().__init__()
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.group_size = head.group_size
        self.tie(head)

    def tie(self, head: QuantizedLinear) -> None:
        self.qweight, self.scales, self.zeros = head.qweight, head.scales, head.zeros

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return float_weight_rows(self, ids)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tied to lm_head's quantized weight"


def float_weight(module: nn.Module) -> torch.Tensor:
    """The float weight a linear or embedding computes with, quantized or not: what analysis code that reads
    weights (activations.py's head results, logit attribution) must use instead of `.weight`."""
    if isinstance(module, QuantizedLinear):
        return module.dequantized_weight()
    if isinstance(module, QuantizedEmbedding):
        return module(torch.arange(module.num_embeddings, device=module.qweight.device))
    return module.weight


def float_weight_rows(module: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    """float_weight(module)[rows], dequantizing only those rows: rows (...) integer ids -> (..., in_features or
    embedding_dim). The quantized embedding's lookup, and what reads a few rows of lm_head (logit attribution's
    unembedding directions) instead of the whole matrix. Rows are not range-checked here (callers check)."""
    if isinstance(module, (QuantizedLinear, QuantizedEmbedding)):
        rows = rows.to(module.qweight.device)
        zeros = None if module.zeros is None else module.zeros[rows]
        return dequantize_rows(module.qweight[rows], module.scales[rows], zeros, module.group_size,
                               module.scales.dtype)
    return module.weight[rows.to(module.weight.device)]


# ---- whole models -----------------------------------------------------------------------------

def target_names(model: nn.Module) -> list[str]:
    """Dotted names of the linears a quantized GPT-2 stores as integers: each block's four, and lm_head."""
    names = [n for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, QuantizedLinear)) and n.endswith(BLOCK_LINEARS) and ".h." in f".{n}"]
    if isinstance(getattr(model, "lm_head", None), (nn.Linear, QuantizedLinear)):
        names.append("lm_head")
    return names


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def quantization_config(model: nn.Module) -> Optional[dict]:
    """The `quantization_config` of the model's config (what config.json carries), or None."""
    return model.config.extra.get("quantization_config")


def _tied(model: nn.Module) -> bool:
    return getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "lm_head")


def _set_config(model: nn.Module, qc: Optional[dict]) -> None:
    """A new config (the old one may be shared with other models) with or without quantization_config, set on
    every module that held the old one."""
    old = model.config
    extra = {k: v for k, v in old.extra.items() if k != "quantization_config"}
    if qc is not None:
        extra["quantization_config"] = qc
    new = dataclasses.replace(old, extra=extra)
    for m in model.modules():
        if getattr(m, "config", None) is old:
            m.config = new


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _config_dict(mode: str, group_size: Optional[int]) -> dict:
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "mode": mode, "group_size": group_size,
            "modules": list(BLOCK_LINEARS) + ["lm_head"]}


def _check_quantizable(model: nn.Module, mode, group_size) -> Optional[int]:
    if is_quantized(model):
        qc = quantization_config(model) or {}
        raise ValueError(f"this model is already quantized ({qc.get('mode')}); quantizing twice would compound "
                         "the rounding: call nanogpt2.dequantize(model) first to change the scheme")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("this model has LoRA adapters: quantize the base model first, then apply_lora (or "
                         "merge_lora before quantizing)")
    g = check_scheme(mode, group_size)
    for name in target_names(model):
        check_scheme(mode, g, model.get_submodule(name).in_features, where=f" of {name}")
    return g


@torch.no_grad()
def quantize(model: nn.Module, mode: str, group_size: Optional[int] = None) -> nn.Module:
    """Quantize a GPT-2 in memory, in place, layer by layer (each float weight is freed as its integer copy is
    made): mode "int8" or "int4" (group_size 32/64/128, default 64). Returns the model."""
    g = _check_quantizable(model, mode, group_size)
    for name in target_names(model):
        _quantize_module(model, name, mode, g)
    _set_config(model, _config_dict(mode, g))
    return model


def _quantize_module(model: nn.Module, name: str, mode: str, g: Optional[int]) -> None:
    """Swap the float linear `name` for its quantized copy; lm_head, when tied, takes wte with it."""
    linear = model.get_submodule(name)
    layer = QuantizedLinear.from_float(linear.weight.detach(), linear.bias, mode, g)
    layer.train(linear.training)
    _replace(model, name, layer)
    if name == "lm_head" and _tied(model):
        model.transformer.wte = QuantizedEmbedding(layer)


class Quantizer:
    """Quantize while loading (weights.load_weights calls `loaded` after each module it fills): a target linear
    is swapped for its integer copy as soon as its weight and bias are read, so the float model never exists
    whole: peak memory is the quantized model plus the tensors in flight."""

    def __init__(self, model: nn.Module, mode: str, group_size: Optional[int]):
        self.mode, self.group_size = mode, _check_quantizable(model, mode, group_size)
        self.pending = set(target_names(model))

    def loaded(self, model: nn.Module, module_name: str) -> int:
        """Quantize `module_name` if it is a target whose tensors have all arrived; the bytes of float weight
        that dropped (0 if none), for the loader's heap trimming (weights.load_weights)."""
        name = "lm_head" if module_name == "transformer.wte" and _tied(model) else module_name
        if name not in self.pending:
            return 0
        source = model.get_submodule(module_name)
        if any(p.is_meta for p in source.parameters()):
            return 0                                        # its bias (or weight) is still to come
        if name == "lm_head" and module_name == "transformer.wte":
            model.lm_head.weight = source.weight            # the tie, made now rather than after loading
        self.pending.discard(name)
        dropped = source.weight.nbytes
        _quantize_module(model, name, self.mode, self.group_size)
        return dropped

    def finish(self, model: nn.Module) -> None:
        if self.pending:
            raise RuntimeError(f"quantize-while-loading missed {sorted(self.pending)}")   # a bug, not user input
        _set_config(model, _config_dict(self.mode, self.group_size))


def check_saved_config(qc, source: str, mode=None, group_size=None) -> tuple[str, Optional[int]]:
    """Validate a checkpoint's quantization_config; a from_pretrained(quantize=...) request must match it."""
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise ValueError(f"{source}: quantization_config has quant_method {method!r}; nanogpt2 loads only its own "
                         f"({QUANT_METHOD!r}) quantized checkpoints")
    if qc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{source}: quantization format_version {qc.get('format_version')!r}; this nanogpt2 "
                         f"reads version {FORMAT_VERSION}")
    saved_mode, saved_g = qc.get("mode"), qc.get("group_size")
    check_scheme(saved_mode, saved_g)
    if mode is not None and (mode, check_scheme(mode, group_size)) != (saved_mode, saved_g):
        raise ValueError(f"{source} is already quantized as {saved_mode}"
                         f"{f' (group_size {saved_g})' if saved_g else ''}; asked for {mode}"
                         f"{f' (group_size {check_scheme(mode, group_size)})' if mode == 'int4' else ''}: load it "
                         "without quantize=, or dequantize and save a float checkpoint first")
    return saved_mode, saved_g


def build_quantized(model: nn.Module, mode: str, group_size: Optional[int]) -> None:
    """Give a meta-device model the quantized layers a quantized checkpoint fills (weights.load_weights)."""
    for name in target_names(model):
        linear = model.get_submodule(name)
        _replace(model, name, QuantizedLinear(linear.in_features, linear.out_features, mode, group_size,
                                              bias=linear.bias is not None, dtype=linear.weight.dtype,
                                              device="meta"))
    if _tied(model):
        model.transformer.wte = QuantizedEmbedding(model.lm_head)
    _set_config(model, _config_dict(mode, group_size))


def tie(model: nn.Module) -> None:
    """Re-tie a quantized lm_head and wte after loading (the loader fills wte's names)."""
    wte = model.transformer.wte
    model.lm_head.qweight, model.lm_head.scales, model.lm_head.zeros = wte.qweight, wte.scales, wte.zeros
    model.lm_head.repack()


def repack(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.repack()


@torch.no_grad()
def dequantize(model: nn.Module) -> nn.Module:
    """Give back a float model, in place: each QuantizedLinear becomes an nn.Linear holding its dequantized weight
    (the rounding stays: this is the quantized model in float, not the original), wte a plain embedding tied to
    lm_head again. It saves in plain HF format and merges LoRA adapters. Returns the model."""
    if not is_quantized(model):
        raise ValueError("this model is not quantized; nothing to dequantize")
    for name, m in list(model.named_modules()):
        if isinstance(m, QuantizedLinear):
            linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            # trainable, as a loaded float model is; frozen under a LoRA adapter, as apply_lora left its base
            linear.weight = nn.Parameter(m.dequantized_weight(), requires_grad=not name.endswith(".base_layer"))
            if m.bias is not None:
                linear.bias = m.bias
            linear.train(m.training)
            _replace(model, name, linear)
    if isinstance(getattr(getattr(model, "transformer", None), "wte", None), QuantizedEmbedding):
        emb = nn.Embedding(model.config.vocab_size, model.config.n_embd, device="meta")
        emb.weight = model.lm_head.weight
        model.transformer.wte = emb
    _set_config(model, None)
    return model
