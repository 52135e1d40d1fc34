"""The GPT-2 tokenizer: tiktoken's "gpt2" encoding, built offline from the BPE files shipped in the package.

tiktoken.get_encoding("gpt2") downloads encoder.json and vocab.bpe on first use; we ship those two files
(nanogpt2/assets/gpt2-bpe/, byte-identical to OpenAI's release, MIT licence) and check their sha256
(the hashes tiktoken itself pins) before building the same Encoding from them.
"""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

BPE_DIR = os.path.join(os.path.dirname(__file__), "assets", "gpt2-bpe")
SHA256 = {  # tiktoken_ext/openai_public.py
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
# tiktoken's faster equivalent of GPT-2's original split pattern
# 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT = "<|endoftext|>"
EOT_ID = 50256


def _checked(name: str) -> str:
    path = os.path.join(BPE_DIR, name)
    try:
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        raise FileNotFoundError(f"GPT-2 BPE file {path} is missing: reinstall nanogpt2") from None
    if digest != SHA256[name]:
        raise ValueError(f"GPT-2 BPE file {path} is corrupt: sha256 {digest}, expected {SHA256[name]}")
    return path


@lru_cache(maxsize=None)
def get_tokenizer() -> tiktoken.Encoding:
    """tiktoken Encoding "gpt2" (50257 tokens, <|endoftext|> = 50256), identical to tiktoken's own."""
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=_checked("vocab.bpe"),
                                            encoder_json_file=_checked("encoder.json"))
    return tiktoken.Encoding(name="gpt2", pat_str=PAT_STR, mergeable_ranks=ranks,
                             special_tokens={EOT: EOT_ID}, explicit_n_vocab=50257)
