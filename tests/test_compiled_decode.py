"""generate(compile=True): the fixed-shape decode step (compiled.py) gives transformers' tokens.

The fixed-shape logic (StaticSlot writes at a tensor position, AttentionMask.static_decode masks the whole
buffer) is checked eagerly against transformers for every generation case; one test then really compiles it
(inductor, freezing) on a tiny model, which takes tens of seconds on 2 cores.
"""
import copy

import pytest
import torch

from helpers_generation import hf_generate, run_compiled_step_eagerly
from nanogpt2 import compiled, generation
from nanogpt2.attention import AttentionMask

from test_generation import CASES, NEW, batch, models, resolve  # noqa: F401  (fixtures)


@pytest.fixture
def eager_static_step(monkeypatch):
    """CompiledStep with its fixed-shape function run eagerly (no compile): the same code path, in seconds."""
    run_compiled_step_eagerly(monkeypatch)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_fixed_shape_step_gives_transformers_tokens(models, batch, case, padded, eager_static_step):
    hf, ours = models
    ids, mask, common = batch
    if not padded:
        ids, mask = ids[:1], None
    kw = resolve(case, common)
    got = generation.generate(ours, ids, mask, max_new_tokens=NEW, compile=True, **kw)
    want = hf_generate(hf, ids, mask, max_new_tokens=NEW, **kw)
    assert torch.equal(got, want)


def test_static_mask_sees_exactly_the_valid_keys():
    seqlens = torch.tensor([5, 5], dtype=torch.int32)
    kv_start = torch.tensor([0, 2], dtype=torch.int32)
    m = AttentionMask.static_decode(seqlens, kv_start, max_len=8)
    assert m.dense("cpu")[:, 0, 0].tolist() == [[True] * 5 + [False] * 3,
                                                [False] * 2 + [True] * 3 + [False] * 3]
    assert m.kv_start() is kv_start and m.kv_len == 8


def test_compile_rejects_pack_weights_and_non_bools(models):
    ours = models[1]
    with pytest.raises(ValueError, match="pack_weights=True and compile=True"):
        ours.generate(torch.tensor([[3, 4]]), max_new_tokens=2, compile=True, pack_weights=True)
    with pytest.raises(ValueError, match="compile='yes'"):
        ours.generate(torch.tensor([[3, 4]]), max_new_tokens=2, compile="yes")


def test_really_compiled_step_matches(models, batch):
    hf, ours = models
    ids, mask, _ = batch
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=NEW, compile=True)
    assert torch.equal(got, hf_generate(hf, ids, mask, max_new_tokens=NEW))
    # weights changed in place: the frozen step must not be reused; the model runs the shared step from then on
    with torch.no_grad():
        ours.transformer.h[0].mlp.c_fc.weight.mul_(1.5)
        hf.transformer.h[0].mlp.c_fc.weight.mul_(1.5)
    try:
        with pytest.warns(UserWarning, match="weights changed since"):
            got = ours.generate(ids, attention_mask=mask, max_new_tokens=NEW, compile=True)
        assert torch.equal(got, hf_generate(hf, ids, mask, max_new_tokens=NEW))
        assert ours.compiled_decode.frozen_state is None   # not frozen again: frozen graphs are never freed
    finally:
        with torch.no_grad():
            ours.transformer.h[0].mlp.c_fc.weight.div_(1.5)
            hf.transformer.h[0].mlp.c_fc.weight.div_(1.5)
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=NEW, compile=True),
                       hf_generate(hf, ids, mask, max_new_tokens=NEW))


def test_frozen_step_sees_edits_that_skip_the_version_counter(models, batch):
    """`p.data.mul_()` (old-style optimizers) and models built under inference_mode change weights without a
    version bump; the frozen step must still not run the old weights."""
    ids = batch[0][:1]
    with torch.inference_mode():
        model = copy.deepcopy(models[1])   # the copy's tensors are inference tensors: no version counter
        model.load_state_dict(models[1].state_dict())
    assert model.transformer.wte.weight.is_inference()
    assert torch.equal(model.generate(ids, max_new_tokens=NEW, compile=True), model.generate(ids, max_new_tokens=NEW))
    before = model.generate(ids, max_new_tokens=NEW)
    model.transformer.wte.weight.data.mul_(-2)
    want = model.generate(ids, max_new_tokens=NEW)
    assert not torch.equal(want, before)
    with pytest.warns(UserWarning, match="weights changed since"):
        assert torch.equal(model.generate(ids, max_new_tokens=NEW, compile=True), want)


def test_compiled_steps_never_share_frozen_weights_between_models(models, batch):
    """Two models of one shape: dynamo's guards would let the second reuse the first's graph, whose weights are
    frozen constants on CPU; each model must run its own."""
    ours = models[1]
    other = copy.deepcopy(ours)
    with torch.no_grad():
        other.transformer.wte.weight.add_(torch.randn_like(other.transformer.wte.weight))
    ids = batch[0][:1]
    want_ours = ours.generate(ids, max_new_tokens=NEW)
    want_other = other.generate(ids, max_new_tokens=NEW)
    assert not torch.equal(want_ours, want_other)   # else the test could not tell the models apart
    assert torch.equal(ours.generate(ids, max_new_tokens=NEW, compile=True), want_ours)
    assert torch.equal(other.generate(ids, max_new_tokens=NEW, compile=True), want_other)


def test_stream_checks_its_options_before_the_first_token(models):
    with pytest.raises(ValueError, match="pack_weights=True and compile=True"):
        generation.stream(models[1], torch.tensor([[3, 4]]), max_new_tokens=2, compile=True, pack_weights=True)


def test_cache_lengths_are_bucketed_only_when_compiling(models):
    ours = models[1]   # n_positions 64
    assert generation.cache_length(ours, 10, generation.GenerationConfig()) == 10
    on = generation.GenerationConfig(compile=True)
    assert generation.cache_length(ours, 10, on) == min(64, compiled.COMPILE_BUCKET)
    assert generation.cache_length(ours, 64, on) == 64
