"""Triton kernels for nanogpt2 (installed as nanogpt2.kernels).

flash_attention   fused causal attention for prefill and training (forward + backward)
decode_attention  one new token per row against a KV cache (split-K + log-sum-exp merge)
quant_matmul      weight-only int8 / int4 linear layers, dequantized in registers (GEMV for decode, GEMM for prefill)
_ops              how each launcher becomes a torch custom op (torch.ops.nanogpt2.*), so that
                  torch.compile and CUDA graphs see one node per kernel call
"""

from .decode_attention import decode_attention
from .flash_attention import attention_probs_from_lse, flash_attention, flash_attention_with_lse
from .quant_matmul import int4_linear, int8_linear

__all__ = ["flash_attention", "flash_attention_with_lse", "attention_probs_from_lse", "decode_attention",
           "int8_linear", "int4_linear"]
