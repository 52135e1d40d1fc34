"""The bundled "shakespeare-tiny" checkpoint: it loads offline by name, transformers reads the same files to the
same perplexity, it is small, and it is a real language model (far better than a unigram model on text it
never trained on: the last 10% of tinyshakespeare)."""
import json
import math
import os

import pytest
import torch

import nanogpt2
from nanogpt2 import GPT2LMHeadModel, get_tokenizer
from nanogpt2.data import unigram_cross_entropy
from nanogpt2.perplexity import sliding_window_perplexity

from conftest import hf_quiet

ASSETS = os.path.join(os.path.dirname(nanogpt2.__file__), "assets")
MODEL_DIR = os.path.join(ASSETS, "models", "shakespeare-tiny")
SNIPPET = 400  # held-out tokens scored (a few windows' worth; fast on CPU)


@pytest.fixture(scope="module")
def heldout():
    """(train tokens, held-out tokens): the split tools/train.py used, the last 10% of the tokens."""
    with open(os.path.join(ASSETS, "data", "tinyshakespeare.txt"), encoding="utf-8") as f:
        tokens = torch.tensor(get_tokenizer().encode_ordinary(f.read()))
    n_val = int(round(len(tokens) * 0.1))
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]


def test_loads_offline_by_name_and_is_small(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = GPT2LMHeadModel.from_pretrained("shakespeare-tiny")
    c = model.config
    assert (c.vocab_size, c.n_positions, c.n_layer) == (50257, 256, 4)  # a genuine GPT-2-vocabulary model
    size = sum(os.path.getsize(os.path.join(MODEL_DIR, f)) for f in os.listdir(MODEL_DIR))
    assert size < 10 * 2**20, f"shakespeare-tiny is {size / 2**20:.1f} MiB on disk"
    with open(os.path.join(MODEL_DIR, "config.json")) as f:
        assert json.load(f)["dtype"] == "float16"


def test_transformers_gives_the_same_perplexity(heldout):
    transformers = hf_quiet()
    ids = heldout[1][:SNIPPET]
    ours = GPT2LMHeadModel.from_pretrained("shakespeare-tiny")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    ppl, _, _ = sliding_window_perplexity(ours, ids, 256, 128)
    ppl_hf, _, _ = sliding_window_perplexity(theirs, ids, 256, 128)  # transformers' forward, the same recipe
    assert ppl == pytest.approx(ppl_hf, rel=1e-4)


def test_far_better_than_a_unigram_model(heldout):
    train, val = heldout
    unigram = unigram_cross_entropy(train.numpy(), val[:SNIPPET].numpy())  # nats/token on the same snippet
    _, nll, _ = sliding_window_perplexity(GPT2LMHeadModel.from_pretrained("shakespeare-tiny"), val[:SNIPPET], 256, 128)
    assert nll < unigram - 0.5, f"model {nll:.3f} vs unigram {unigram:.3f} nats/token"
    assert math.exp(nll) < 0.6 * math.exp(unigram)


def test_it_uses_word_order(heldout):
    """A unigram model scores a text and any shuffle of it alike; a language model must prefer the real order."""
    model = GPT2LMHeadModel.from_pretrained("shakespeare-tiny")
    ids = heldout[1][:256]
    shuffled = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))]
    _, real, _ = sliding_window_perplexity(model, ids, 256, 256)
    _, scrambled, _ = sliding_window_perplexity(model, shuffled, 256, 256)
    assert real < scrambled - 1.0, (real, scrambled)
