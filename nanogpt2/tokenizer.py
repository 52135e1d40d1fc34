"""The GPT-2 tokenizer: tiktoken's "gpt2" encoding, built offline from the BPE files shipped in the package,
and the few rules every tool shares for going between text and a model's token ids: encode (text -> checked ids),
token_text (a token's own text) and token_label (a token as a readable, quoted label).

tiktoken.get_encoding("gpt2") downloads encoder.json and vocab.bpe on first use; we ship those two files
(nanogpt2/assets/gpt2-bpe/, byte-identical to OpenAI's release, MIT licence) and check their sha256
(the hashes tiktoken itself pins) before building the same Encoding from them.
"""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from typing import Iterable, Optional

import tiktoken
import torch
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
# how a label shows characters that would not read as themselves: \n \t \r by name, the other control characters
# (and DEL) as \xNN, and a backslash doubled (so that a label's \n is always a newline): Python's literal rules
LABEL_ESCAPES = ({c: f"\\x{c:02x}" for c in (*range(32), 127)}
                 | {ord("\n"): "\\n", ord("\t"): "\\t", ord("\r"): "\\r", ord("\\"): "\\\\"})


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


def encode(model, text: str) -> torch.Tensor:
    """GPT-2-tokenized text as (1, T) ids on the model's device, checked against the model's vocabulary and
    context (model: anything with .config.vocab_size, .config.n_positions and .device). <|endoftext|> in the
    text is the special token."""
    if not text:
        raise ValueError("text is empty: give at least one character to tokenize")
    ids = get_tokenizer().encode(text, allowed_special="all")
    V = model.config.vocab_size
    bad = [i for i in ids if i >= V]
    if bad:
        raise ValueError(f"text encodes to token id {bad[0]} ({token_label(bad[0])}), outside this model's "
                         f"vocabulary [0, {V}): text is tokenized with GPT-2's tokenizer (50257 tokens)")
    if len(ids) > model.config.n_positions:
        raise ValueError(f"text is {len(ids)} tokens, more than the model's context n_positions="
                         f"{model.config.n_positions}")
    return torch.tensor([ids], device=model.device)


def _token_bytes(token_id: int, tokenizer) -> Optional[bytes]:
    """The token's bytes, or None for an id past the tokenizer's 50257 (a model with a padded vocabulary)."""
    try:
        return (tokenizer or get_tokenizer()).decode_single_token_bytes(int(token_id))
    except KeyError:
        return None


def token_text(token_id: int, tokenizer=None) -> str:
    """One token's own text, as it reads in the running text (' the' keeps its space). Bytes that are only part
    of a UTF-8 character become U+FFFD; an id past the tokenizer's 50257 (a padded vocabulary) is '<id>'."""
    raw = _token_bytes(token_id, tokenizer)
    return f"<{int(token_id)}>" if raw is None else raw.decode("utf-8", errors="replace")


def token_texts(ids: Iterable[int], tokenizer=None) -> list[str]:
    """token_text of each id: joined, they are the decoded text (where no character is split across tokens)."""
    return [token_text(i, tokenizer) for i in ids]


def quote_token(text: str) -> str:
    """A token's text as a label, read as a Python string literal: quoted so a leading space shows (' the'),
    in double quotes when it holds a ' and no " ("'s"), newlines and other control characters escaped (\\n),
    a backslash doubled, and the quote escaped when the text holds both kinds."""
    text = text.translate(LABEL_ESCAPES)
    if "'" in text and '"' not in text:
        return f'"{text}"'
    return "'" + text.replace("'", "\\'") + "'"


def token_label(token_id: int, tokenizer=None) -> str:
    """One token as readable text that is also a Python literal of it: its text quoted (quote_token: ' the',
    '\\n'), or, for a token that is only part of a UTF-8 character, its bytes as a bytes literal (b'\\xe2\\x80'),
    so that no two tokens share a label. An id past the tokenizer's 50257 (a padded vocabulary) is <id>."""
    raw = _token_bytes(token_id, tokenizer)
    if raw is None:
        return f"<{int(token_id)}>"
    try:
        return quote_token(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(raw)
