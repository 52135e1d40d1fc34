"""`python -m nanogpt2 generate`: streams what generate() produces, as text, stopping at eos or a stop string
(neither printed); the text decoder holds back split UTF-8 characters and possible stop-string starts."""
import argparse
import io
import os
import subprocess
import sys

import pytest
import torch

from helpers_generation import run_compiled_step_eagerly
from nanogpt2 import GPT2Config, GPT2LMHeadModel, get_tokenizer
from nanogpt2.__main__ import main
from nanogpt2.cli_generate import TextStream, add_arguments, run
from nanogpt2.generation import generate

PROMPT = "Hello, world"
N = 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny GPT-2 with the real 50257-token vocabulary (so any prompt encodes) and peaky logits."""
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=128, n_embd=16, n_layer=1, n_head=2, initializer_range=0.5)
    directory = tmp_path_factory.mktemp("cli-model")
    GPT2LMHeadModel(config).eval().save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def expected(checkpoint):
    """The greedy continuation of PROMPT as text, from the library (cut at eos, which the CLI does not print)."""
    model = GPT2LMHeadModel.from_pretrained(checkpoint)
    enc = get_tokenizer()
    ids = enc.encode(PROMPT)
    new = generate(model, torch.tensor([ids]), max_new_tokens=N)[0, len(ids):].tolist()
    new = new[:new.index(enc.eot_token)] if enc.eot_token in new else new
    return enc.decode_bytes(new).decode("utf-8", errors="replace")


def cli(*args):
    """Run the CLI in a fresh interpreter, from outside the repository (as a user would)."""
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    return subprocess.run([sys.executable, "-m", "nanogpt2", "generate", *args], capture_output=True,
                          encoding="utf-8", errors="replace", env=env, cwd=os.path.expanduser("~"), timeout=120)


def test_cli_prints_the_greedy_continuation(checkpoint, expected):
    r = cli("--model", checkpoint, "--prompt", PROMPT, "--max-new-tokens", str(N))
    assert r.returncode == 0, r.stderr
    assert r.stdout == PROMPT + expected + "\n"
    assert "tok/s" in r.stderr


def test_cli_stops_before_the_stop_string(checkpoint, expected):
    stop = expected[len(expected) // 2:len(expected) // 2 + 3]   # spans tokens as often as not
    assert len(stop) == 3 and expected.find(stop) > 0
    r = cli("--model", checkpoint, "--prompt", PROMPT, "--max-new-tokens", str(N), "--stop", stop)
    assert r.returncode == 0, r.stderr
    assert r.stdout == PROMPT + expected[:expected.find(stop)] + "\n"


def parse(*argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


class Writes(io.StringIO):
    """Records every flush: streaming means text reaches the terminal before generation ends."""
    def __init__(self):
        super().__init__()
        self.flushed = []

    def flush(self):
        self.flushed.append(self.getvalue())


def test_text_is_flushed_as_tokens_arrive(checkpoint, expected):
    out = Writes()
    assert run(parse("--model", checkpoint, "--prompt", PROMPT, "--max-new-tokens", str(N)), out=out) == 0
    partial = [s for s in out.flushed if PROMPT in s and s != out.getvalue()]
    assert len(set(partial)) >= 3   # the text grew over several flushes before the end


def test_compile_flag_runs_the_compiled_step(checkpoint, expected, monkeypatch):
    steps = []
    run_compiled_step_eagerly(monkeypatch, steps)   # a real compile: test_compiled_decode
    out = io.StringIO()
    assert run(parse("--model", checkpoint, "--prompt", PROMPT, "--max-new-tokens", str(N), "--compile"), out) == 0
    assert steps and out.getvalue() == PROMPT + expected + "\n"


def test_seeded_sampling_is_reproducible(checkpoint):
    texts = []
    for seed in (1, 1, 2):
        out = io.StringIO()
        run(parse("--model", checkpoint, "--prompt", PROMPT, "--max-new-tokens", "16", "--temperature", "1.5",
                  "--top-k", "0", "--seed", str(seed)), out=out)
        texts.append(out.getvalue())
    assert texts[0] == texts[1] != texts[2]


def test_several_sequences_are_printed_whole(checkpoint):
    out = io.StringIO()
    run(parse("--model", checkpoint, "--prompt", PROMPT, "--max-new-tokens", "8", "--num-beams", "3",
              "--num-return-sequences", "2"), out=out)
    text = out.getvalue()
    assert text.startswith("--- sequence 1 ---\n" + PROMPT) and f"--- sequence 2 ---\n{PROMPT}" in text


def test_bad_flag_value_is_an_error_message_not_a_traceback(checkpoint, capsys):
    assert main(["generate", "--model", checkpoint, "--prompt", "x", "--top-p", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "error: top_p=1.5" in err and "Traceback" not in err


# ---- TextStream: the incremental decoder ---------------------------------------------------------------

def test_split_utf8_character_is_held_back_until_complete():
    enc = get_tokenizer()
    tokens = enc.encode("a🙂b")
    pieces = [enc.decode_bytes([t]) for t in tokens]
    split = [i for i, b in enumerate(pieces) if b and not _decodes(b)]
    assert split, f"expected the emoji to span tokens, got {pieces}"   # the case under test exists
    text = TextStream(enc)
    outs = [text.push(t) for t in tokens]
    assert "".join(outs) + text.finish() == "a🙂b"
    assert "\ufffd" not in "".join(outs)
    assert all(outs[i] in ("", "a") for i in split[:-1])   # nothing of the emoji before its last byte


def _decodes(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_unfinished_character_at_the_end_becomes_replacement():
    enc = get_tokenizer()
    first = enc.encode("🙂")[0]
    text = TextStream(enc)
    assert text.push(first) == ""
    assert text.finish() == "\ufffd"


def test_stop_string_across_tokens_and_false_starts():
    enc = get_tokenizer()
    text = TextStream(enc, stop=["END"])
    out = [text.push(t) for t in enc.encode("An EN route, then END and more")]
    assert "".join(out) + text.finish() == "An EN route, then "
    assert text.stopped
    held = TextStream(enc, stop=["\n\n"])
    nl, x = enc.encode("\n")[0], enc.encode("x")[0]
    assert [held.push(t) for t in (enc.encode("hi")[0], nl, x)] == ["hi", "", "\nx"]   # "\n" waits for its successor
