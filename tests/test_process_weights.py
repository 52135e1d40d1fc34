"""process_weights (weight_processing.py): each transform alone and all together leave the logits (center_unembed:
the log-probabilities) within 1e-4 in fp32 and the greedy tokens the same; the default model is untouched."""
import copy

import pytest
import torch

from nanogpt2 import GPT2Config, GPT2LMHeadModel, GPT2Model
from nanogpt2.analysis import process_weights
from nanogpt2.lora import apply_lora

from helpers_analysis import left_padded, randomize

ATOL = 1e-4
L, C, V = 3, 48, 101
TRANSFORMS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases")


@pytest.fixture(scope="module")
def model():
    return randomize(GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=C, n_layer=L, n_head=3)))


def processed(model, only=None, **flags):
    """A processed deep copy: every transform (only=None), or `only` that one."""
    if only is not None:
        flags = {t: t == only for t in TRANSFORMS}
    return process_weights(copy.deepcopy(model), **flags)


@pytest.mark.parametrize("only", [*TRANSFORMS, None], ids=[*TRANSFORMS, "all"])
def test_outputs_unchanged(model, only):
    ids, mask = left_padded()
    real = mask.bool()   # padding positions compute nothing meaningful (fold_value_biases moves theirs)
    before = model(ids, attention_mask=mask).logits
    after = processed(model, only)(ids, attention_mask=mask).logits
    if only in ("center_unembed", None):   # logits move by a constant per position; probabilities do not
        torch.testing.assert_close(after.log_softmax(-1)[real], before.log_softmax(-1)[real], atol=ATOL, rtol=0)
        shift = (after - before)[real]
        assert shift.std(-1).max() < ATOL and shift.abs().max() > 1e-2
    else:
        torch.testing.assert_close(after[real], before[real], atol=ATOL, rtol=0)


def test_all_but_center_unembed_keeps_the_logits(model):
    ids, mask = left_padded()
    real = mask.bool()
    after = processed(model, center_unembed=False)(ids, attention_mask=mask).logits
    torch.testing.assert_close(after[real], model(ids, attention_mask=mask).logits[real], atol=ATOL, rtol=0)


def test_greedy_generation_unchanged(model):
    ids, mask = left_padded()
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    expected = model.generate(ids, **kwargs)
    for flags in ({}, {"center_unembed": False}):
        assert torch.equal(processed(model, **flags).generate(ids, **kwargs), expected), flags


def test_what_each_transform_leaves(model):
    p = processed(model)
    t = p.transformer
    assert p.lm_head.weight is not t.wte.weight and not p.config.tie_word_embeddings
    for ln in [t.ln_f] + [b.ln_1 for b in t.h] + [b.ln_2 for b in t.h]:   # pure normalisation
        assert torch.equal(ln.weight, torch.ones(C)) and torch.equal(ln.bias, torch.zeros(C))
    zero = lambda x: torch.testing.assert_close(x, torch.zeros_like(x), atol=1e-6, rtol=0)  # noqa: E731
    zero(t.wte.weight.mean(-1))
    zero(t.wpe.weight.mean(-1))
    for b in t.h:
        for proj in (b.attn.c_proj, b.mlp.c_proj):   # every write into the residual has zero mean
            zero(proj.weight.mean(0))
            zero(proj.bias.mean())
        zero(b.attn.c_attn.weight.mean(-1))          # reading weights centred by fold_ln
        assert torch.equal(b.attn.c_attn.bias[2 * C:], torch.zeros(C))   # value bias folded into c_proj
    zero(p.lm_head.weight.mean(0))                   # unembedding centred over the vocabulary
    zero(p.lm_head.bias.mean())


def test_processing_is_opt_in_and_in_place(model):
    original = copy.deepcopy(model)
    assert original.lm_head.weight is original.transformer.wte.weight   # tied, as loaded
    untouched = {n: p.clone() for n, p in original.state_dict().items()}
    copy_ = copy.deepcopy(original)
    assert process_weights(copy_) is copy_                               # in place, returned for chaining
    assert all(torch.equal(p, untouched[n]) for n, p in original.state_dict().items())
    assert original.config.tie_word_embeddings and original.lm_head.bias is None
    only_values = processed(original, only="fold_value_biases")          # touches neither wte nor lm_head
    assert only_values.lm_head.weight is only_values.transformer.wte.weight


def test_refuses_what_it_cannot_fold(model):
    with pytest.raises(TypeError, match="needs a GPT2LMHeadModel.*got GPT2Model"):
        process_weights(GPT2Model(model.config))
    with_lora = apply_lora(copy.deepcopy(model), r=2, alpha=4)
    with pytest.raises(TypeError, match=r"h\.0\.attn\.c_attn is LoRALinear: merge LoRA"):
        process_weights(with_lora)


def test_bundled_model_processed_generates_the_same_text():
    """Real weights (GPT-2's 50257-token vocabulary, trained LayerNorms): TransformerLens's default processing
    changes no greedy token and the identities of the activation cache still hold on it."""
    from nanogpt2 import get_tokenizer
    model = GPT2LMHeadModel.from_pretrained("shakespeare-tiny").eval()
    ids = torch.tensor([get_tokenizer().encode("ROMEO:\nBut soft, what light")])
    expected = model.generate(ids, max_new_tokens=20, do_sample=False)
    process_weights(model)
    assert torch.equal(model.generate(ids, max_new_tokens=20, do_sample=False), expected)
    logits, cache = model.run_with_cache(ids)
    nxt = int(expected[0, ids.shape[1]])   # the token greedy decoding picked next
    attrs = cache.logit_attrs(cache.decompose_resid(heads=True, pos_slice=-1), nxt, pos_slice=-1)
    torch.testing.assert_close(attrs.sum(0), logits[:, -1, nxt] - model.lm_head.bias[nxt], atol=1e-4, rtol=0)


def test_a_processed_model_refuses_to_save(tmp_path):
    """Its lm_head has a bias and its own matrix: no GPT-2 checkpoint holds that, so saving must not pretend."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    processed = process_weights(copy.deepcopy(model))
    with pytest.raises(ValueError, match="processed for analysis.*save the model before processing"):
        processed.save_pretrained(tmp_path)
    assert not (tmp_path / "model.safetensors").exists()
    model.save_pretrained(tmp_path)   # the original is untouched and saves
