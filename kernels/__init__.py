"""Triton attention kernels for nanogpt2 (installed as nanogpt2.kernels).

flash_attention   fused causal attention for prefill and training (forward + backward)
decode_attention  one new token per row against a KV cache (split-K + log-sum-exp merge)
_ops              how each launcher becomes a torch custom op (torch.ops.nanogpt2.*), so that
                  torch.compile and CUDA graphs see one node per kernel call
"""

from .decode_attention import decode_attention
from .flash_attention import attention_probs_from_lse, flash_attention, flash_attention_with_lse

__all__ = ["flash_attention", "flash_attention_with_lse", "attention_probs_from_lse", "decode_attention"]
