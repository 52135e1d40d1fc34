"""Triton kernels for nanogpt2 (installed as nanogpt2.kernels).

flash_attention   fused causal attention for prefill and training (forward + backward)
decode_attention  one new token per row against a KV cache (split-K + log-sum-exp merge)
quant_matmul      weight-only int8 / int4 linear layers, dequantized in registers (GEMV for decode, GEMM for prefill)
_ops              how each launcher becomes a torch custom op (torch.ops.nanogpt2.*), so that
                  torch.compile and CUDA graphs see one node per kernel call
"""


if __name__ == "nanogpt2.kernels":
    from .decode_attention import decode_attention
    from .flash_attention import attention_probs_from_lse, flash_attention, flash_attention_with_lse
    from .quant_matmul import int4_linear, int8_linear

    __all__ = ["flash_attention", "flash_attention_with_lse", "attention_probs_from_lse", "decode_attention",
               "int8_linear", "int4_linear"]
else:
    # Imported as a top-level "kernels": a checkout's root is on sys.path (`python -m nanogpt2` run there, or a
    # script beside it) and something probed for PyPI's unrelated `kernels` package by importing it, as
    # transformers' is_kernels_available does for a package without installed metadata (transformers 5.24,
    # utils/import_utils.py). A second copy of the kernel modules registers every torch custom op again under
    # the same name, and torch drops the first registration while the first copy's ops still point at it: the
    # likely cause of the crashes our test runs saw inside torch's dispatcher while this happened
    # (std::bad_alloc, "Tried to access the schema for  which doesn't have a schema registered yet",
    # segfaults). So this copy defines nothing and has no submodules (an empty __path__: `import
    # kernels.flash_attention` fails); with no version, transformers takes it for no kernels package.
    __all__ = []
    __path__ = []
