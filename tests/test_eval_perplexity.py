"""Sliding-window perplexity (nanogpt2.perplexity.sliding_window_perplexity, tools/eval_perplexity.py) equals what
transformers computes with the recipe of https://huggingface.co/docs/transformers/perplexity."""
import os
import runpy

import pytest
import torch

from nanogpt2 import GPT2LMHeadModel, get_tokenizer
from nanogpt2.perplexity import sliding_window_perplexity

from conftest import hf_quiet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@torch.no_grad()
def hf_recipe_perplexity(model, ids, max_length, stride):
    """The documented loop, verbatim in substance, run on a transformers model."""
    encodings = ids.reshape(1, -1)
    seq_len = encodings.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = encodings[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        neg_log_likelihood = model(input_ids, labels=target_ids).loss
        num_valid_tokens = (target_ids != -100).sum().item()
        num_loss_tokens = num_valid_tokens - target_ids.size(0)
        nll_sum += neg_log_likelihood.item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return float(torch.exp(torch.tensor(nll_sum / n_tokens)))


@pytest.mark.parametrize("n,max_length,stride", [(150, 64, 64), (150, 64, 16), (97, 32, 7), (64, 64, 32), (40, 64, 8)])
def test_matches_transformers_recipe(hf_checkpoint, n, max_length, stride):
    path, hf = hf_checkpoint(initializer_range=0.5)  # peaky logits: perplexity far from uniform's 101
    ours = GPT2LMHeadModel.from_pretrained(path)
    ids = torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(n))
    ppl, nll, scored = sliding_window_perplexity(ours, ids, max_length, stride)
    expected = hf_recipe_perplexity(hf, ids, max_length, stride)
    assert ppl == pytest.approx(expected, rel=1e-5)
    assert abs(ppl - 101) > 20
    if stride < max_length < n:  # context changes the answer: overlapping windows differ from disjoint ones
        assert ppl != pytest.approx(sliding_window_perplexity(ours, ids, max_length, max_length)[0], rel=1e-4)


def test_bad_window_arguments(hf_checkpoint):
    path, _ = hf_checkpoint()
    model = GPT2LMHeadModel.from_pretrained(path)
    ids = torch.randint(0, 101, (100,))
    with pytest.raises(ValueError, match=r"stride must be in \[1, max_length=32\], got 33"):
        sliding_window_perplexity(model, ids, 32, 33)
    with pytest.raises(ValueError, match="max_length 65 exceeds the model's n_positions 64"):
        sliding_window_perplexity(model, ids, 65, 8)


def test_tool_on_a_text_file_matches_transformers(hf_checkpoint, tmp_path, capsys):
    transformers = hf_quiet()
    path, hf = hf_checkpoint(vocab_size=50257, n_embd=16, n_head=2, n_positions=48, initializer_range=0.2)
    text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 4
    data = tmp_path / "text.txt"
    data.write_text(text, encoding="utf-8")
    tool = runpy.run_path(os.path.join(REPO, "tools", "eval_perplexity.py"), run_name="eval_perplexity")
    ppl = tool["main"](["--model", path, "--data", str(data), "--stride", "20", "--cache-dir", str(tmp_path / "c")])
    assert "perplexity" in capsys.readouterr().out
    ids = torch.tensor(get_tokenizer().encode_ordinary(text))
    assert len(ids) > 48  # several windows
    assert ppl == pytest.approx(hf_recipe_perplexity(hf, ids, 48, 20), rel=1e-5)


def test_tool_refuses_too_few_tokens_naming_the_file(hf_checkpoint, tmp_path):
    """An empty file, or a --val-fraction whose part of the file has under 2 tokens, is an error that names the file
    and the token range (not numpy's "cannot mmap an empty file")."""
    path, _ = hf_checkpoint(vocab_size=50257, n_embd=16, n_head=2, n_positions=48)
    tool = runpy.run_path(os.path.join(REPO, "tools", "eval_perplexity.py"), run_name="eval_perplexity")
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(SystemExit, match=f"{empty}: tokens 0..0 of its 0 are 0 tokens; scoring needs at least 2"):
        tool["main"](["--model", path, "--data", str(empty), "--cache-dir", str(tmp_path / "c")])
    short = tmp_path / "short.txt"
    short.write_text(" the to of and is on that for he it", encoding="utf-8")  # 10 tokens: the last 10% is 1
    with pytest.raises(SystemExit, match=f"{short}: tokens 9..10 of its 10 are 1 tokens"):
        tool["main"](["--model", path, "--data", str(short), "--val-fraction", "0.1", "--cache-dir", str(tmp_path / "c")])
