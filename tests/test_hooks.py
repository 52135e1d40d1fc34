"""Named activation points: run_with_cache agrees with transformers, hooks patch and ablate, and leave no trace."""
import pytest
import torch

from nanogpt2 import GPT2LMHeadModel, GPT2Model, KVCache
from nanogpt2.attention import positions_from_mask
from nanogpt2.hooks import BLOCK_POINTS

ATOL = 1e-4


@pytest.fixture
def pair(hf_checkpoint):
    directory, hf = hf_checkpoint(seed=7, n_layer=3, n_embd=48, n_head=3)
    hf.config._attn_implementation = "eager"
    return GPT2LMHeadModel.from_pretrained(directory), hf


def batch():
    torch.manual_seed(0)
    ids = torch.randint(0, 101, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def test_run_with_cache_matches_transformers(pair):
    ours, hf = pair
    ids, mask = batch()
    logits, cache = ours.run_with_cache(ids, attention_mask=mask)
    ref = hf(ids, attention_mask=mask, position_ids=positions_from_mask(mask, 0, 9, "cpu"),
             output_hidden_states=True, output_attentions=True)
    real = mask.bool()
    assert set(cache) == set(ours.activation_names()) and len(cache) == 2 + 3 * len(BLOCK_POINTS)
    torch.testing.assert_close(logits[real], ref.logits[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(cache["embed"][real], ref.hidden_states[0][real], atol=ATOL, rtol=0)
    for i in range(2):
        torch.testing.assert_close(cache[f"h.{i}.resid_post"][real], ref.hidden_states[i + 1][real], atol=ATOL, rtol=0)
    torch.testing.assert_close(cache["ln_f"][real], ref.hidden_states[-1][real], atol=ATOL, rtol=0)
    for i in range(3):
        p = cache[f"h.{i}.attn.pattern"]
        assert p.shape == (2, 3, 9, 9)
        q_real = real[:, None, :, None].expand_as(p)
        torch.testing.assert_close(p[q_real], ref.attentions[i][q_real], atol=ATOL, rtol=0)
    assert cache["h.0.attn.q"].shape == cache["h.0.attn.z"].shape == (2, 9, 3, 16)
    assert cache["h.0.mlp.pre"].shape == cache["h.0.mlp.post"].shape == (2, 9, 192)
    assert not any(t.requires_grad for t in cache.values())


def test_named_subset_only(pair):
    ours, _ = pair
    _, cache = ours.run_with_cache(torch.tensor([[1, 2, 3]]), names=["h.1.attn.pattern", "h.2.mlp.post"])
    assert set(cache) == {"h.1.attn.pattern", "h.2.mlp.post"}


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_pattern_from_fused_backends(pair, backend):
    ours, _ = pair
    eager_logits, eager = ours.run_with_cache(torch.tensor([[5, 6, 7, 8]]), names=["h.0.attn.pattern"])
    ours.set_attn_implementation(backend)
    logits, cache = ours.run_with_cache(torch.tensor([[5, 6, 7, 8]]), names=["h.0.attn.pattern"])
    torch.testing.assert_close(cache["h.0.attn.pattern"], eager["h.0.attn.pattern"], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits, eager_logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("config", [{}, dict(scale_attn_by_inverse_layer_idx=True),
                                    dict(reorder_and_upcast_attn=True, scale_attn_weights=False)])
def test_patterns_without_autograd_equal_those_with_it(hf_checkpoint, config):
    """Without autograd (on CPU) the eager path scales, masks and softmaxes in the scores' own buffer (one buffer a
    layer, not two); with autograd it cannot. Both give the same bits, on a padded batch too (padding queries,
    masked keys), with scales that are not powers of two (1 / (sqrt(D) (layer + 1))) and with upcasting."""
    directory, _ = hf_checkpoint(seed=7, n_layer=3, n_embd=48, n_head=3, **config)
    ours = GPT2LMHeadModel.from_pretrained(directory)
    ids, mask = batch()
    logits, with_grad = ours.run_with_cache(ids, attention_mask=mask)
    assert logits.requires_grad  # the scores needed a backward: the out-of-place path ran
    with torch.inference_mode():
        _, without = ours.run_with_cache(ids, attention_mask=mask)
    for name in with_grad:
        assert torch.equal(with_grad[name], without[name]), name


def test_run_with_cache_with_kv_cache(pair):
    ours, _ = pair
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    _, full = ours.run_with_cache(ids, names=["h.2.resid_post", "h.2.attn.pattern"])
    kv = KVCache.for_model(ours.config, 1, max_len=8)
    ours(ids[:, :4], past_key_values=kv)
    _, step = ours.run_with_cache(ids[:, 4:], names=["h.2.resid_post", "h.2.attn.pattern"], past_key_values=kv)
    torch.testing.assert_close(step["h.2.resid_post"], full["h.2.resid_post"][:, 4:], atol=ATOL, rtol=0)
    torch.testing.assert_close(step["h.2.attn.pattern"], full["h.2.attn.pattern"][:, :, 4:, :], atol=ATOL, rtol=0)


def test_patching_with_itself_changes_nothing(pair):
    ours, _ = pair
    ids, mask = batch()
    base = ours(ids, attention_mask=mask).logits
    _, cache = ours.run_with_cache(ids, attention_mask=mask)
    patch = {name: (lambda x, n, t=t: t.clone()) for name, t in cache.items()}
    with ours.hooks(patch):
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits, base, atol=1e-6, rtol=0)


def test_head_ablation_matches_transformers(pair):
    ours, hf = pair
    layer, head, D = 1, 2, 16
    ids = torch.randint(0, 101, (2, 7))

    def zero_head(z, name):
        z = z.clone()
        z[:, :, head] = 0
        return z

    with ours.hooks({f"h.{layer}.attn.z": zero_head}):
        ablated = ours(ids).logits

    def pre_hook(module, args):  # transformers: zero that head's slice of c_proj's input
        x = args[0].clone()
        x[..., head * D:(head + 1) * D] = 0
        return (x,)

    handle = hf.transformer.h[layer].attn.c_proj.register_forward_pre_hook(pre_hook)
    try:
        expected = hf(ids).logits
    finally:
        handle.remove()
    torch.testing.assert_close(ablated, expected, atol=ATOL, rtol=0)
    assert not torch.allclose(ablated, ours(ids).logits, atol=1e-3)


def test_steering_and_pattern_replacement_change_output(pair):
    ours, _ = pair
    ids = torch.tensor([[1, 2, 3, 4]])
    base = ours(ids).logits
    steer = torch.randn(48)  # a direction (a constant shift would vanish in the next LayerNorm)
    with ours.hooks({"h.0.resid_post": lambda x, n: x + steer}):
        assert not torch.allclose(ours(ids).logits, base, atol=1e-3)

    def uniform(p, n):  # causal uniform attention
        u = torch.tril(torch.ones_like(p))
        return u / u.sum(-1, keepdim=True)

    with ours.hooks({"h.0.attn.pattern": uniform}):
        _, c = ours.run_with_cache(ids, names=["h.0.attn.pattern"])
        patched = ours(ids).logits
    assert torch.allclose(c["h.0.attn.pattern"][0, 0, 3], torch.full((4,), 0.25))
    assert not torch.allclose(patched, base, atol=1e-3)


def test_hooks_removed_after_block_even_on_error(pair):
    ours, _ = pair
    calls = []
    with ours.hooks({"h.0.ln_1": lambda x, n: calls.append(n)}):
        ours(torch.tensor([[1, 2]]))
    assert calls == ["h.0.ln_1"] and not ours.transformer.hook_registry.fns
    with pytest.raises(RuntimeError, match="boom"):
        with ours.hooks({"h.0.ln_1": lambda x, n: None}):
            raise RuntimeError("boom")
    assert not ours.transformer.hook_registry.fns
    ours(torch.tensor([[1, 2]]))
    assert calls == ["h.0.ln_1"]


def test_hooks_fire_during_generate_and_on_base_model(pair, hf_checkpoint):
    ours, _ = pair
    seen = []
    with ours.hooks({"ln_f": lambda x, n: seen.append(x.shape[1])}):
        ours.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3)
    assert seen[0] == 3 and seen[1:] == [1, 1]  # prefill, then one token per step
    directory, _ = hf_checkpoint(seed=1)
    base = GPT2Model.from_pretrained(directory)
    h, cache = base.run_with_cache(torch.tensor([[1, 2]]), names=["ln_f"])
    torch.testing.assert_close(h, cache["ln_f"])


def test_bad_names_and_shapes(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match=r"'h\.3\.ln_1'.*block index 3 out of range \[0, 3\)"):
        ours.run_with_cache(torch.tensor([[1]]), names=["h.3.ln_1"])
    with pytest.raises(ValueError, match=r"unknown activation point 'h\.0\.attn\.scores'.*attn\.pattern"):
        ours.hooks({"h.0.attn.scores": lambda x, n: x})
    with pytest.raises(ValueError, match=r"hook at 'h\.0\.ln_1' returned shape \(1, 1\)"):
        with ours.hooks({"h.0.ln_1": lambda x, n: x[..., :1, :1][0]}):
            ours(torch.tensor([[1, 2]]))
