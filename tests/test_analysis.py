"""The logit lens, attention maps and their tools (tools/logit_lens.py, tools/attention_map.py)."""
import os
import runpy
import struct
import subprocess
import sys

import pytest
import torch

from conftest import make_hf_model
from nanogpt2 import GPT2LMHeadModel, GPT2Model
from nanogpt2.analysis import (attention_maps, encode, format_logit_lens, logit_lens, logit_lens_top_k,
                               plot_attention, token_label)

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak."


@pytest.fixture(scope="module")
def gpt2_vocab_checkpoint(tmp_path_factory):
    """A tiny random GPT-2 with the full 50257-token vocabulary, so real text tokenizes into it. A larger
    init std than GPT-2's makes the attention and the predictions far from uniform."""
    directory = str(tmp_path_factory.mktemp("tiny-gpt2-vocab"))
    make_hf_model(seed=1, vocab_size=50257, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                  initializer_range=0.2).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model(gpt2_vocab_checkpoint):
    return GPT2LMHeadModel.from_pretrained(gpt2_vocab_checkpoint).eval()


def tool(name):
    """A tool's main(argv), loaded from its file the way `python tools/<name>.py` runs it."""
    return runpy.run_path(os.path.join(TOOLS, f"{name}.py"), run_name="tool")["main"]


def png_size(path):
    """(width, height) from a PNG's IHDR chunk; fails if the file is not a PNG."""
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


# ---- the logit lens ----------------------------------------------------------------------------

def test_last_lens_layer_is_the_models_logits(hf_checkpoint):
    directory, _ = hf_checkpoint(seed=3, n_layer=3)
    m = GPT2LMHeadModel.from_pretrained(directory).eval()
    ids = torch.randint(0, 101, (2, 7))
    lens = logit_lens(m, ids)
    assert lens.shape == (4, 2, 7, 101)
    torch.testing.assert_close(lens[-1], m(ids).logits, atol=1e-6, rtol=0)
    assert (lens[0] - lens[-1]).abs().max() > 1e-2  # earlier layers are a different read-out


def test_lens_layers_agree_when_the_blocks_write_nothing(hf_checkpoint):
    """With every block's attention and MLP outputs zeroed, the residual stream never changes after the
    embedding, so every lens layer must decode to the same logits."""
    directory, _ = hf_checkpoint(seed=3, n_layer=3)
    m = GPT2LMHeadModel.from_pretrained(directory).eval()
    ids = torch.randint(0, 101, (1, 5))
    zero = {f"h.{i}.{p}": (lambda x, name: torch.zeros_like(x)) for i in range(3) for p in ("attn.out", "mlp.out")}
    with m.hooks(zero):
        lens = logit_lens(m, ids)
    for layer in range(1, 4):
        torch.testing.assert_close(lens[layer], lens[0], atol=1e-6, rtol=0)


def test_top_k_is_the_top_of_the_full_lens(model):
    ids = encode(model, TEXT)
    probs, top_ids = logit_lens_top_k(model, ids, k=3)
    full = torch.softmax(logit_lens(model, ids), dim=-1)
    assert probs.shape == top_ids.shape == (3, 1, ids.shape[1], 3)
    ref = full.topk(3, dim=-1)
    torch.testing.assert_close(probs, ref.values, atol=1e-6, rtol=0)
    assert torch.equal(top_ids, ref.indices)


def test_lens_needs_the_lm_head(hf_checkpoint):
    directory, _ = hf_checkpoint(seed=0)
    with pytest.raises(TypeError, match="GPT2LMHeadModel.*got GPT2Model"):
        logit_lens(GPT2Model.from_pretrained(directory), torch.tensor([[1, 2]]))


def test_format_marks_the_actual_next_token():
    ids = torch.tensor([[[11, 12], [13, 14]], [[12, 11], [14, 13]]])   # (2 layers, T=2, k=2)
    probs = torch.tensor([[[0.5, 0.2], [0.4, 0.1]], [[0.9, 0.05], [0.6, 0.00012345]]])
    table = format_logit_lens(probs, ids, [40, 12])
    lines = table.splitlines()
    assert lines[0] == "position 0: 'I' -> next '-'" and lines[5] == "position 1: '-' (last)"
    assert lines[1].split() == ["layer", "top", "1", "top", "2"]
    assert lines[2].split() == ["embed", "','", "50%", "'-'*", "20%"]   # token 12 is '-', the next token
    assert lines[3].split() == ["h.0", "'-'*", "90%", "','", "5%"]
    assert lines[8].split()[-1] == "0.012%"  # small probabilities keep two significant digits


def test_logit_lens_tool_prints_the_models_prediction_last(gpt2_vocab_checkpoint, model):
    r = subprocess.run([sys.executable, os.path.join(TOOLS, "logit_lens.py"), "--model", gpt2_vocab_checkpoint,
                        "--text", TEXT, "--top-k", "2", "--positions", "0", "-1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    ids = encode(model, TEXT)
    predicted = model(ids).logits[0].argmax(-1)   # (T,)
    blocks = r.stdout.split("position ")[1:]
    assert [b.split(":")[0] for b in blocks] == ["0", str(ids.shape[1] - 1)]
    for block, pos in zip(blocks, (0, -1)):
        rows = [line for line in block.splitlines() if line.startswith(("embed", "h."))]
        assert [row.split()[0] for row in rows] == ["embed", "h.0", "h.1"]
        assert rows[-1][len("layer   "):].startswith(token_label(int(predicted[pos])))  # top 1 of the last block


# ---- tokens ------------------------------------------------------------------------------------

def test_token_helpers_are_the_tokenizers():
    """encode and token_label live in tokenizer.py (tests/test_tokenizer.py); analysis keeps offering them."""
    import nanogpt2.analysis as analysis
    import nanogpt2.tokenizer as tokenizer
    assert analysis.encode is tokenizer.encode and analysis.token_label is tokenizer.token_label


# ---- attention maps ----------------------------------------------------------------------------

def test_attention_maps_are_causal_probabilities(model):
    ids = encode(model, TEXT)
    maps = attention_maps(model, ids, layer=1)
    T = ids.shape[1]
    assert maps.shape == (1, 4, T, T)
    torch.testing.assert_close(maps.sum(-1), torch.ones(1, 4, T), atol=1e-5, rtol=0)
    assert maps.triu(diagonal=1).abs().max() == 0
    with pytest.raises(ValueError, match=r"layer 2 out of range \[0, 2\)"):
        attention_maps(model, ids, layer=2)


def test_attention_map_tool_one_head(gpt2_vocab_checkpoint, tmp_path, capsys):
    out = tmp_path / "one.png"
    assert tool("attention_map")(["--model", gpt2_vocab_checkpoint, "--text", TEXT, "--layer", "1", "--head", "2",
                                  "--out", str(out)]) == 0
    w, h = png_size(out)
    assert w >= 400 and h >= 400 and out.stat().st_size > 10_000  # a drawn heatmap, not an empty canvas
    assert "head 2" in capsys.readouterr().out


def test_attention_map_tool_grid_of_all_heads(gpt2_vocab_checkpoint, tmp_path):
    out = tmp_path / "grid.png"
    r = subprocess.run([sys.executable, os.path.join(TOOLS, "attention_map.py"), "--model", gpt2_vocab_checkpoint,
                        "--text", TEXT, "--layer", "0", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "all 4 heads" in r.stdout
    w, h = png_size(out)
    assert w >= 800 and h >= 800 and out.stat().st_size > 30_000  # 2 x 2 panels


def test_bad_layer_and_head_name_the_value_and_range(gpt2_vocab_checkpoint, tmp_path, capsys):
    main = tool("attention_map")
    for flag, value, message in (("--layer", "2", "--layer 2 out of range [0, 2)"),
                                 ("--layer", "-1", "--layer -1 out of range [0, 2)"),
                                 ("--head", "4", "--head 4 out of range [0, 4)")):
        argv = ["--model", gpt2_vocab_checkpoint, "--layer", "0", "--out", str(tmp_path / "x.png"), flag, value]
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, (flag, value)
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(SystemExit) as e:
        tool("logit_lens")(["--model", gpt2_vocab_checkpoint, "--text", "To be", "--positions", "5"])
    assert e.value.code == 2 and "--positions 5 out of range [-2, 2)" in capsys.readouterr().err


def test_missing_matplotlib_says_how_to_install_it(gpt2_vocab_checkpoint, model, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'nanogpt2\[viz\]'"):
        plot_attention(torch.full((1, 2, 2), 0.5), ["'a'", "'b'"], str(tmp_path / "a.png"))
    with pytest.raises(SystemExit) as e:
        tool("attention_map")(["--model", gpt2_vocab_checkpoint, "--layer", "0", "--out", str(tmp_path / "a.png")])
    assert e.value.code == 2 and "matplotlib, which is not installed" in capsys.readouterr().err
    assert not (tmp_path / "a.png").exists()
