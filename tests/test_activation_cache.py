"""The ActivationCache run_with_cache returns: indexing, and every decomposition identity to 1e-5 in fp32, on a
plain and a left-padded batch; the cache on another device, and stopping the forward after a layer."""
import pytest
import torch

from nanogpt2 import GPT2Config, GPT2LMHeadModel, GPT2Model, KVCache
from nanogpt2.activations import ActivationCache
from nanogpt2.analysis import process_weights
from nanogpt2.attention import positions_from_mask

from helpers_analysis import left_padded, randomize

ATOL = 1e-5
L, H, C, V = 3, 3, 48, 101


@pytest.fixture(scope="module")
def model():
    return randomize(GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=C, n_layer=L, n_head=H)))


BATCHES = {"plain": lambda: (torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(2)), None),
           "left-padded": left_padded}


@pytest.fixture(params=list(BATCHES))
def run(request, model):
    """(ids, mask, logits, cache) of one forward on the batch."""
    ids, mask = BATCHES[request.param]()
    logits, cache = model.run_with_cache(ids, attention_mask=mask)
    return ids, mask, logits, cache


def close(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


# ---- the mapping --------------------------------------------------------------------------------

def test_indexes_by_name_and_shorthand_and_stays_a_dict(model):
    logits, cache = model.run_with_cache(torch.tensor([[1, 2, 3]]))
    assert isinstance(cache, ActivationCache)
    assert list(cache) == list(cache.keys()) == model.activation_names() and len(cache) == 2 + 13 * L
    assert cache["pattern", 1] is cache["h.1.attn.pattern"]
    assert cache["resid_pre", 0] is cache["embed"] and cache["resid_pre", 2] is cache["h.1.resid_post"]
    assert cache["resid_post", -1] is cache["h.2.resid_post"] and cache["attn.z", 0] is cache["h.0.attn.z"]
    for short, point in [("q", "attn.q"), ("z", "attn.z"), ("attn_out", "attn.out"), ("mlp_out", "mlp.out"),
                         ("pre", "mlp.pre"), ("post", "mlp.post"), ("ln1", "ln_1"), ("ln2", "ln_2"),
                         ("resid_mid", "resid_mid")]:
        assert cache[short, 1] is cache[f"h.1.{point}"]
    assert ("pattern", 1) in cache and "ln_f" in cache and ("pattern", 3) not in cache
    assert dict(cache.items())["ln_f"] is cache["ln_f"]
    cache["logits"] = logits   # verify.py adds entries
    assert cache["logits"] is logits
    with pytest.raises(KeyError, match=r"layer 3 out of range \[-3, 3\)"):
        cache["pattern", 3]
    with pytest.raises(KeyError, match=r"unknown shorthand 'scores'.*resid_pre.*attn\.pattern"):
        cache["scores", 0]


def test_missing_point_says_why(model):
    _, cache = model.run_with_cache(torch.tensor([[1, 2]]), names=["h.0.attn.z"])
    with pytest.raises(KeyError, match=r"'embed' is not in this cache \(1 points\).*names="):
        cache.accumulated_resid()


# ---- decompositions -----------------------------------------------------------------------------

def test_decomposition_sums_to_the_last_resid_post(run, model):
    ids, mask, _, cache = run
    parts, labels = cache.decompose_resid(return_labels=True)
    assert labels == ["tok_embed", "pos_embed"] + [f"h.{i}.{p}" for i in range(L) for p in ("attn.out", "mlp.out")]
    assert parts.shape == (2 + 2 * L, *ids.shape, C)
    close(parts.sum(0), cache["h.2.resid_post"])
    wte, wpe = model.transformer.wte.weight, model.transformer.wpe.weight
    assert torch.equal(parts[0], wte[ids])
    positions = positions_from_mask(mask, 0, ids.shape[1], "cpu").expand_as(ids)
    close(parts[1], wpe[positions], atol=1e-6)
    layer1 = cache.decompose_resid(layer=1)   # before block 1: embeddings and block 0
    assert layer1.shape[0] == 4
    close(layer1.sum(0), cache["h.0.resid_post"])


def test_head_results_plus_bias_sum_to_attn_out(run, model):
    ids, _, _, cache = run
    heads, labels = cache.stack_head_results(return_labels=True)
    assert heads.shape == (L * H, *ids.shape, C)
    assert labels[:4] == ["L0H0", "L0H1", "L0H2", "L1H0"] and len(labels) == L * H
    for i in range(L):
        bias = model.transformer.h[i].attn.c_proj.bias
        close(heads[i * H:(i + 1) * H].sum(0) + bias, cache[f"h.{i}.attn.out"])
    # one head's result is c_proj of attn.z with the other heads zeroed
    z = cache["h.1.attn.z"].clone()
    z[:, :, [0, 2]] = 0
    proj = model.transformer.h[1].attn.c_proj
    close(heads[H + 1], proj(z.flatten(2)) - proj.bias)
    assert cache.stack_head_results(layer=1).shape[0] == H
    full, full_labels = cache.decompose_resid(heads=True, return_labels=True)
    assert full_labels[2:2 + H + 1] == ["L0H0", "L0H1", "L0H2", "h.0.attn.c_proj.bias"]
    close(full.sum(0), cache["h.2.resid_post"])


def test_accumulated_resid_is_the_stream_before_each_block(run):
    ids, _, _, cache = run
    stack, labels = cache.accumulated_resid(return_labels=True)
    assert labels == ["embed", "h.0.resid_post", "h.1.resid_post", "h.2.resid_post"]
    assert all(torch.equal(stack[n], cache[name]) for n, name in enumerate(labels))
    _, mid_labels = cache.accumulated_resid(layer=2, incl_mid=True, return_labels=True)
    assert mid_labels == ["embed", "h.0.resid_mid", "h.0.resid_post", "h.1.resid_mid", "h.1.resid_post"]
    last = cache.accumulated_resid(apply_ln=True)[-1]
    close(last + cache.model.transformer.ln_f.bias, cache["ln_f"])


def test_layer_norm_with_the_cached_scale_keeps_the_sum(run, model):
    _, _, _, cache = run
    t = model.transformer
    close(cache.apply_ln_to_stack(cache.decompose_resid()).sum(0) + t.ln_f.bias, cache["ln_f"])
    for layer in range(L):   # block l's ln_1 at its own input
        normed = cache.decompose_resid(layer=layer, apply_ln=True)
        close(normed.sum(0) + t.h[layer].ln_1.bias, cache[f"h.{layer}.ln_1"])
    with pytest.raises(ValueError, match="same pos_slice"):
        cache.apply_ln_to_stack(cache.decompose_resid(pos_slice=-1))


def test_logit_attributions_sum_to_the_logit(run, model):
    ids, _, logits, cache = run
    B, T = ids.shape
    W_U, b_f = model.lm_head.weight, model.transformer.ln_f.bias
    parts = cache.decompose_resid(heads=True)
    # one token per position: logits[b, t, tok] - ln_f.bias @ W_U[tok]
    tokens = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(3))
    attrs = cache.logit_attrs(parts, tokens)
    assert attrs.shape == (parts.shape[0], B, T)
    close(attrs.sum(0), logits.gather(-1, tokens[..., None])[..., 0] - W_U[tokens] @ b_f)
    # a logit difference at the last position, one pair per row
    good, bad = torch.tensor([5, 17, 99][:B]), torch.tensor([6, 0, 42][:B])
    diff = cache.logit_attrs(parts[:, :, -1], good, incorrect_tokens=bad, pos_slice=-1)
    assert diff.shape == (parts.shape[0], B)
    rows = torch.arange(B)
    expected = logits[rows, -1, good] - logits[rows, -1, bad] - (W_U[good] - W_U[bad]) @ b_f
    close(diff.sum(0), expected)
    # built with the same pos_slice, the stack gives the same attributions; an int token is every row's
    sliced = cache.decompose_resid(heads=True, pos_slice=-1)
    close(cache.logit_attrs(sliced, good, bad, pos_slice=-1), diff)
    close(cache.logit_attrs(parts, 7)[..., -1], cache.logit_attrs(sliced, 7, pos_slice=-1))


def test_attributions_after_process_weights_name_the_unembed_bias(model):
    """fold_ln moves ln_f's bias into lm_head.bias: the term left out of the sum becomes lm_head.bias[tok]."""
    import copy
    processed = process_weights(copy.deepcopy(model), center_unembed=False)
    ids, mask = left_padded()
    logits, cache = processed.run_with_cache(ids, attention_mask=mask)
    tokens = torch.randint(0, V, ids.shape, generator=torch.Generator().manual_seed(4))
    attrs = cache.logit_attrs(cache.stack_head_results(), tokens)   # heads only: a partial decomposition
    rest = cache.logit_attrs(cache.decompose_resid(), tokens).sum(0)
    close(rest, logits.gather(-1, tokens[..., None])[..., 0] - processed.lm_head.bias[tokens])
    assert attrs.shape == (L * H, *ids.shape)


def test_attribution_argument_errors(run, model, hf_checkpoint):
    _, _, _, cache = run
    parts = cache.decompose_resid()
    with pytest.raises(ValueError, match=rf"tokens: token id {V} out of range \[0, {V}\)"):
        cache.logit_attrs(parts, V)
    with pytest.raises(ValueError, match="does not line up with the positions"):
        cache.logit_attrs(parts, torch.zeros(5, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"decompose_resid layer 4 out of range \[0, 3\]"):
        cache.decompose_resid(layer=4)
    directory, _ = hf_checkpoint(seed=0)
    _, base_cache = GPT2Model.from_pretrained(directory).run_with_cache(torch.tensor([[1, 2]]))
    with pytest.raises(TypeError, match="needs a GPT2LMHeadModel.*got GPT2Model"):
        base_cache.logit_attrs(base_cache.decompose_resid(), 1)


# ---- where the cache lives, and stopping early ---------------------------------------------------

def test_cache_on_another_device(model):
    ids = torch.tensor([[1, 2, 3]])
    logits, cache = model.run_with_cache(ids, device="meta")   # a device every machine has
    assert all(t.device.type == "meta" for t in cache.values()) and logits.device.type == "cpu"
    if torch.cuda.is_available():
        gpu = randomize(GPT2LMHeadModel(model.config)).cuda()
        logits, cache = gpu.run_with_cache(ids.cuda(), device="cpu")
        assert logits.is_cuda and all(t.device.type == "cpu" for t in cache.values())
        close(cache.decompose_resid().sum(0), cache["h.2.resid_post"])


@pytest.mark.parametrize("k", [0, 1, L])
def test_stop_at_layer_runs_nothing_after_it(model, k):
    ids, mask = left_padded()
    _, full = model.run_with_cache(ids, attention_mask=mask)
    seen = []
    with model.hooks({name: (lambda x, name: seen.append(name)) for name in model.activation_names()}):
        resid, cache = model.run_with_cache(ids, attention_mask=mask, stop_at_layer=k)
    last = "embed" if k == 0 else f"h.{k - 1}.resid_post"
    names = model.activation_names()
    assert seen == names[:names.index(last) + 1]   # not one point beyond the stop was computed
    assert list(cache) == seen
    assert torch.equal(resid, full[last])
    if k:
        close(cache.decompose_resid(layer=k).sum(0), resid)


def test_stop_at_layer_errors(model):
    with pytest.raises(ValueError, match=r"stop_at_layer 4 out of range \[0, 3\]"):
        model.run_with_cache(torch.tensor([[1]]), stop_at_layer=4)
    with pytest.raises(ValueError, match="half-written"):
        model.run_with_cache(torch.tensor([[1]]), stop_at_layer=1, past_key_values=KVCache.for_model(model.config, 1))
    assert not model.transformer.hook_registry.fns   # nothing left behind
