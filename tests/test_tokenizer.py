"""The shipped tokenizer: tiktoken "gpt2" built offline, identical to transformers' GPT-2 tokenizer."""
import shutil

import pytest

import nanogpt2.tokenizer as tok
from nanogpt2 import get_tokenizer

TEXTS = [
    "Hello world",
    "  leading spaces and\ttabs\n\nnewlines   ",
    "It's they're we've I'm you'll he'd",
    "Unicode: naïve café 日本語 emoji 🤗🚀 Ω≈ç√",
    "numbers 1234567 3.14159 -42 1e10",
    "code: def f(x):\n    return x**2  # comment",
    "ROMEO:\nBut, soft! what light through yonder window breaks?",
    "",
]


def test_encoding_identity():
    enc = get_tokenizer()
    assert enc.name == "gpt2" and enc.n_vocab == 50257 and enc.eot_token == 50256
    assert enc.encode("Hello world") == [15496, 995]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from transformers import GPT2TokenizerFast
    d = tmp_path_factory.mktemp("gpt2-tok")
    shutil.copy(f"{tok.BPE_DIR}/encoder.json", d / "vocab.json")
    shutil.copy(f"{tok.BPE_DIR}/vocab.bpe", d / "merges.txt")
    return GPT2TokenizerFast.from_pretrained(str(d))


@pytest.mark.parametrize("text", TEXTS)
def test_matches_transformers(hf_tokenizer, text):
    assert len(hf_tokenizer) == 50257
    ids = get_tokenizer().encode(text)
    assert ids == hf_tokenizer.encode(text)
    assert get_tokenizer().decode(ids) == text


def test_special_token():
    enc = get_tokenizer()
    assert enc.encode("a<|endoftext|>b", allowed_special="all") == [64, 50256, 65]
    with pytest.raises(ValueError):
        enc.encode("<|endoftext|>")  # tiktoken refuses special text unless allowed


def test_corrupt_bpe_file_is_detected(monkeypatch):
    monkeypatch.setitem(tok.SHA256, "vocab.bpe", "0" * 64)
    with pytest.raises(ValueError, match=r"vocab\.bpe is corrupt: sha256"):
        tok._checked("vocab.bpe")
