"""Shared by the generation tests: a tiny checkpoint with peaky logits, loaded by both libraries, and
transformers' generate called with nothing but the arguments a test names.

Random GPT-2s with the usual init (std 0.02) have nearly flat next-token distributions, where argmax and beam
ranking are decided by 1e-6 rounding differences between any two implementations; a large init std makes the
distributions peaky (top token ~0.8-0.99), so equal tokens are a real test of equal semantics.
"""
import torch

from nanogpt2 import GPT2LMHeadModel, compiled
from nanogpt2.reference import hf_quiet

TINY = dict(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.7)


def peaky_pair(directory, seed=0, **config):
    """(transformers GPT2LMHeadModel with eager attention, nanogpt2 GPT2LMHeadModel) with the same weights."""
    transformers = hf_quiet()
    torch.manual_seed(seed)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**TINY, **config})).eval()
    hf.config._attn_implementation = "eager"
    hf.save_pretrained(directory)
    return hf, GPT2LMHeadModel.from_pretrained(str(directory))


def hf_generate(hf, input_ids, attention_mask=None, **kwargs):
    """transformers' generate with a GenerationConfig holding exactly `kwargs` (its global defaults fill the rest,
    e.g. top_k=50 when sampling, the same defaults nanogpt2 documents)."""
    transformers = hf_quiet()
    return hf.generate(input_ids, attention_mask=attention_mask,
                       generation_config=transformers.GenerationConfig(**kwargs))


def left_padded(vocab_size, B=3, T=7, pads=(0, 3, 6), pad_id=2, seed=0):
    """(ids (B, T), mask (B, T)): row b has pads[b] padding tokens (id pad_id) on the left; real ids avoid pad_id."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(pad_id + 1, vocab_size, (B, T), generator=g)
    mask = torch.ones_like(ids)
    for b, n in enumerate(pads):
        mask[b, :n] = 0
    return ids.masked_fill(mask == 0, pad_id), mask


def run_compiled_step_eagerly(monkeypatch, calls=None):
    """generate(compile=True) with its fixed-shape step run eagerly: the same code path without a compile, in
    seconds (test_compiled_decode compiles for real). Each call gets a fresh owner, so no eager step stays
    attached to a model; `calls`, a list, records the model of each step made."""
    monkeypatch.setattr(compiled, "_compile", lambda fn, frozen, model=None: fn)

    def fresh(model):
        if calls is not None:
            calls.append(model)
        return compiled.CompiledDecode(model)
    monkeypatch.setattr(compiled, "compiled_decode", fresh)


def assert_greedy_up_to_near_ties(model, out, prompt_len, attention_mask=None, near_tie=0.15):
    """Every new token of `out` (B, prompt_len + new) is `model`'s greedy choice given the tokens before it, to
    within `near_tie` of the logit spread (best − mean): the check for a low-precision run whose rounding flips a
    near-tie, after which the sequences part and token equality means nothing. (benchmarks/common.py's
    check_greedy is the same rule.) `attention_mask` covers the prompt; the new tokens count as real."""
    mask = None
    if attention_mask is not None:
        mask = torch.cat([attention_mask, torch.ones_like(out[:, prompt_len:])], dim=1)
    with torch.no_grad():
        logits = model(out, attention_mask=mask).logits[:, prompt_len - 1:-1].float()   # (B, new, V)
    chosen = logits.gather(-1, out[:, prompt_len:, None])[..., 0]
    best, mean = logits.max(-1).values, logits.mean(-1)
    worst = ((best - chosen) / (best - mean).clamp_min(1e-6)).max().item()
    assert worst <= near_tie, f"a token {worst:.3f} of the logit spread below the greedy one (allowed {near_tie})"

