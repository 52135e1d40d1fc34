"""The shipped tokenizer: tiktoken "gpt2" built offline, identical to transformers' GPT-2 tokenizer; and the text <->
token rules the tools share (encode, token_text, token_label)."""
import ast
import shutil

import pytest

import nanogpt2.tokenizer as tok
from nanogpt2 import GPT2LMHeadModel, get_tokenizer
from nanogpt2.tokenizer import encode, quote_token, token_label, token_text, token_texts

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


# ---- the rules the tools share -----------------------------------------------------------------------------

def test_token_labels_show_spaces_newlines_and_partial_characters():
    enc = get_tokenizer()
    assert token_label(enc.encode(" Citizen")[0]) == "' Citizen'"
    assert token_label(enc.encode("\n")[0]) == "'\\n'"
    assert token_label(enc.encode_single_token(b"\xe2\x80")) == "b'\\xe2\\x80'"  # half of a UTF-8 character
    assert token_label(enc.encode_single_token(b"'s")) == "\"'s\""
    assert token_label(50300) == "<50300>"  # past the tokenizer: a padded vocabulary
    assert quote_token("a\tb\x01") == "'a\\tb\\x01'"


def test_every_label_reads_back_as_its_token():
    """A label is a Python literal of the token: its text (a str) or, for part of a UTF-8 character, its bytes.
    So no two tokens share a label: not a backslash followed by n and a newline, not the lone byte E9 and 'é'."""
    enc = get_tokenizer()
    labels = set()
    for token_id in range(enc.n_vocab):
        raw = enc.decode_single_token_bytes(token_id)
        value = ast.literal_eval(token_label(token_id))
        assert (value if isinstance(value, bytes) else value.encode("utf-8")) == raw, (token_id, raw, value)
        labels.add(token_label(token_id))
    assert len(labels) == enc.n_vocab
    assert quote_token("\\n") == "'\\\\n'" and ast.literal_eval(quote_token("\\n")) == "\\n"
    assert ast.literal_eval(quote_token("'\"")) == "'\""


def test_token_texts_join_into_the_text():
    text = "ROMEO:\nBut soft, naïve café"
    assert "".join(token_texts(get_tokenizer().encode(text))) == text  # no character split across tokens here
    assert token_text(get_tokenizer().encode_single_token(b"\xe2\x80")) == "\ufffd"  # a partial character
    assert token_text(50300) == "<50300>"


def test_encode_checks_text_against_the_model(hf_checkpoint):
    model = GPT2LMHeadModel.from_pretrained("shakespeare-tiny")  # the GPT-2 vocabulary, 256 positions
    ids = encode(model, "a<|endoftext|>b")
    assert ids.tolist() == [[64, 50256, 65]] and ids.device == model.device
    with pytest.raises(ValueError, match="text is empty"):
        encode(model, "")
    with pytest.raises(ValueError, match=r"text is 300 tokens, more than the model's context n_positions=256"):
        encode(model, " a" * 300)
    directory, _ = hf_checkpoint(seed=0)  # vocab_size 101
    with pytest.raises(ValueError, match=r"token id \d+ \('.*'\), outside this model's vocabulary \[0, 101\)"):
        encode(GPT2LMHeadModel.from_pretrained(directory), "Hello world")
