"""nanogpt2.patching: batched activation patching equals one forward per cell; attribution patching is the exact
gradient estimate; the result carries its axes; bad inputs are refused by name."""
import pytest
import torch
import torch.nn as nn

from nanogpt2 import GPT2Config, GPT2LMHeadModel, GPT2Model
from nanogpt2 import patching
from nanogpt2.patching import POINTS, attribution_patch, logit_diff, patch, patch_naive

L, H, T, B, V = 3, 4, 7, 2, 97


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # a larger init than GPT-2's 0.02 so that patches move the metric well above rounding
    cfg = GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=L, n_head=H, initializer_range=0.2)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(0, V, (B, T), generator=g)
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 11) % V      # one token differs, at position 2
    return clean, corrupted


METRIC = logit_diff(torch.tensor([3, 8]), torch.tensor([5, 1]))   # one answer pair per prompt


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("by_position", [True, False])
def test_batched_equals_one_forward_per_cell(model, prompts, point, by_position):
    clean, corrupted = prompts
    for into, keep in [("corrupted", 0), ("clean", 1)]:
        fast = patch(model, clean, corrupted, METRIC, point, by_position=by_position, into=into, logits_to_keep=keep)
        ref = patch_naive(model, clean, corrupted, METRIC, point, by_position=by_position, into=into,
                          logits_to_keep=keep)
        maxdiff = (fast.values - ref.values).abs().max().item()
        print(f"{point} by_position={by_position} into={into}: maxdiff {maxdiff:.2e}")
        assert fast.axes == ref.axes and fast.values.shape == ref.values.shape
        torch.testing.assert_close(fast.values, ref.values, atol=1e-5, rtol=1e-5)
        assert (fast.clean, fast.corrupted) == (ref.clean, ref.corrupted)
        unpatched = ref.corrupted if into == "corrupted" else ref.clean
        assert (ref.values - unpatched).abs().max() > 1e-3, "patches must move the metric, or this proves nothing"


@pytest.mark.parametrize("point", ["resid_pre", "mlp.out", "attn.z", "attn.pattern"])
def test_a_metric_reading_earlier_positions_sees_the_target_run_there(model, prompts, point):
    """logits_to_keep=3 reads positions 4..6: a cell at position 5 computes 5..6 itself, 4 comes from the target."""
    clean, corrupted = prompts

    def metric(logits):       # (B, 3, V): every kept position counts
        return logits[:, :, 3].sum() - logits[:, 0, 7].mean()

    fast = patch(model, clean, corrupted, metric, point, logits_to_keep=3)
    ref = patch_naive(model, clean, corrupted, metric, point, logits_to_keep=3)
    torch.testing.assert_close(fast.values, ref.values, atol=1e-5, rtol=1e-5)


def test_padded_batch_equals_one_forward_per_cell(model):
    """Left padding, one mask for both prompts: equal to the reference, and a patch at a padding column changes
    nothing (no real token attends to padding)."""
    g = torch.Generator().manual_seed(2)
    clean = torch.randint(0, V, (3, T), generator=g)
    corrupted = clean.clone()
    corrupted[:, 4] = (clean[:, 4] + 7) % V
    mask = torch.ones(3, T, dtype=torch.long)
    mask[1, :2] = 0           # row 1: two pads on the left
    mask[2, :3] = 0
    metric = logit_diff(3, 5)
    for point, by_position in [("resid_pre", True), ("attn.z", True), ("attn.z", False), ("mlp.out", False)]:
        fast = patch(model, clean, corrupted, metric, point, by_position=by_position, attention_mask=mask)
        ref = patch_naive(model, clean, corrupted, metric, point, by_position=by_position, attention_mask=mask)
        torch.testing.assert_close(fast.values, ref.values, atol=1e-5, rtol=1e-5)
    # rows 1 and 2 alone are padding at columns 0 and 1 in both prompts: a patch there moves nothing
    padded_only = patch(model, clean[1:], corrupted[1:], metric, attention_mask=mask[1:])
    torch.testing.assert_close(padded_only.values[:, :2], torch.full((L, 2), padded_only.corrupted))


def test_memory_budget_splits_the_cells_into_several_forwards(model, prompts, monkeypatch):
    clean, corrupted = prompts
    passes, unembeds = [], []
    real_hidden, real_unembed = patching._patched_hidden, patching._unembed

    def counting_hidden(model, job, cells, *args):
        passes.append(len(cells))
        return real_hidden(model, job, cells, *args)

    def counting_unembed(model, job, batch, *args):
        unembeds.append(len(batch))
        return real_unembed(model, job, batch, *args)

    monkeypatch.setattr(patching, "_patched_hidden", counting_hidden)
    monkeypatch.setattr(patching, "_unembed", counting_unembed)
    whole = patch(model, clean, corrupted, METRIC)
    assert passes == [L] * T, "default budget: one pass through the blocks per position, all layers' cells in it"
    assert unembeds == [T], "and one unembedding for all of them"
    passes.clear(), unembeds.clear()
    tiny = patch(model, clean, corrupted, METRIC, max_memory=1)
    assert passes == [1] * (L * T) and unembeds == [1] * (L * T), "a budget below one cell: one cell at a time"
    torch.testing.assert_close(tiny.values, whole.values, atol=1e-5, rtol=1e-5)


def test_what_a_user_knows_without_running_it(model, prompts):
    """resid_pre at layer 0, all positions, is the clean prompt itself; before the corrupted position, and at
    positions where both prompts agree at layer 0, a patch changes nothing."""
    clean, corrupted = prompts
    every = patch(model, clean, corrupted, METRIC, by_position=False)
    assert every.values[0].item() == pytest.approx(every.clean, abs=1e-5)
    by_pos = patch(model, clean, corrupted, METRIC)
    torch.testing.assert_close(by_pos.values[:, :2], torch.full((L, 2), by_pos.corrupted))
    torch.testing.assert_close(by_pos.values[0, 3:], torch.full((T - 3,), by_pos.corrupted))
    assert by_pos.values[0, 2].item() == pytest.approx(by_pos.clean, abs=1e-5)
    # the reverse direction: corrupted activations into the clean run
    rev = patch(model, clean, corrupted, METRIC, into="clean")
    assert rev.values[0, 2].item() == pytest.approx(rev.corrupted, abs=1e-5)
    torch.testing.assert_close(rev.values[:, :2], torch.full((L, 2), rev.clean))


def test_result_names_its_axes(model, prompts):
    clean, corrupted = prompts
    cases = {("resid_pre", True): ("layer", "pos"), ("attn.out", False): ("layer",),
             ("attn.z", False): ("layer", "head"), ("attn.pattern", True): ("layer", "pos", "head")}
    sizes = {"layer": L, "pos": T, "head": H}
    for (point, by_position), axes in cases.items():
        r = patch(model, clean[:1], corrupted[:1], logit_diff(3, 5), point, by_position=by_position)
        assert r.axes == axes and r.values.shape == tuple(sizes[a] for a in axes)
        assert all(len(r.labels[a]) == sizes[a] for a in axes)
        assert r.point == point and r.method == "activation" and r.values.device.type == "cpu"
    r = patch(model, clean, corrupted, METRIC)
    norm = r.normalized()
    assert norm[0, 2].item() == pytest.approx(1.0, abs=1e-4) and norm[0, 0].item() == pytest.approx(0.0, abs=1e-6)
    r.labels["pos"] = [f"t{i}" for i in range(T)]
    text = str(r)
    assert "resid_pre" in text and "t6" in text and len(text.splitlines()) == 2 + L


def test_logit_diff_per_prompt_tokens():
    logits = torch.zeros(2, 3, 10)
    logits[0, -1, 4], logits[1, -1, 6], logits[1, 0, 6] = 2.0, 5.0, 100.0
    assert logit_diff(torch.tensor([4, 6]), torch.tensor([1, 1]))(logits).item() == pytest.approx(3.5)
    assert logit_diff(4, 1)(logits).item() == pytest.approx(1.0)
    assert logit_diff(6, 1, pos=0)(logits).item() == pytest.approx(50.0)


# ---- attribution patching -------------------------------------------------------------------------------

@pytest.mark.parametrize("point", ["attn.out", "mlp.out", "attn.z", "attn.v", "attn.pattern"])
@pytest.mark.parametrize("by_position", [True, False])
def test_attribution_is_exact_where_the_metric_is_linear(prompts, point, by_position):
    """Without the final LayerNorm, the logits are linear in the last block's mlp.out; with its MLP silenced too
    (c_proj zero), in its attn.out, attn.z, and (queries and keys fixed) attn.v and attn.pattern. There the
    first-order estimate is the patch itself: this pins the gradient, the (source - target) difference and every
    reduction to an axis."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=L, n_head=H,
                                       initializer_range=0.2)).eval()
    model.transformer.ln_f = nn.Identity()
    if point.startswith("attn"):
        with torch.no_grad():
            model.transformer.h[-1].mlp.c_proj.weight.zero_()
            model.transformer.h[-1].mlp.c_proj.bias.zero_()
    clean, corrupted = prompts
    for into in ("corrupted", "clean"):
        act = patch(model, clean, corrupted, METRIC, point, by_position=by_position, into=into)
        est = attribution_patch(model, clean, corrupted, METRIC, point, by_position=by_position, into=into)
        assert est.axes == act.axes and est.method == "attribution"
        assert (est.clean, est.corrupted) == pytest.approx((act.clean, act.corrupted))
        torch.testing.assert_close(est.values[L - 1], act.values[L - 1], atol=1e-4, rtol=1e-4)
        unpatched = act.corrupted if into == "corrupted" else act.clean
        assert (act.values[L - 1] - unpatched).abs().max() > 1e-3


def test_attribution_approximates_patching_on_the_bundled_model():
    """On shakespeare-tiny, attribution ranks the heads (attn.z, all positions) like real patching does, for a
    small corruption (one word). BENCHMARKS.md gives the figure for every point, pooled over many prompt pairs
    (benchmarks/patching.py), including where the estimate is poor (resid_pre at the corrupted token)."""
    from nanogpt2 import get_tokenizer
    model = GPT2LMHeadModel.from_pretrained("shakespeare-tiny").eval()
    tok = get_tokenizer()
    clean = tok.encode("JULIET:\nGood morrow, my lord.\n\nROMEO:\nGood morrow, my")
    corrupted = tok.encode("JULIET:\nGood morrow, my lady.\n\nROMEO:\nGood morrow, my")
    metric = logit_diff(tok.encode(" lord")[0], tok.encode(" lady")[0])
    act = patch(model, clean, corrupted, metric, "attn.z", by_position=False)
    est = attribution_patch(model, clean, corrupted, metric, "attn.z", by_position=False)
    x, y = (act.values - act.corrupted).flatten(), (est.values - est.corrupted).flatten()
    r = torch.corrcoef(torch.stack([x, y]))[0, 1].item()
    print(f"attn.z [layer, head]: r = {r:.4f}")
    assert r > 0.95


# ---- refusals -------------------------------------------------------------------------------------------

def test_refusals_name_the_bad_value(model, prompts):
    clean, corrupted = prompts
    with pytest.raises(ValueError, match="clean has 7 tokens, corrupted 6"):
        patch(model, clean, corrupted[:, :6], METRIC)
    with pytest.raises(ValueError, match="clean has 2, corrupted 1"):
        patch(model, clean, corrupted[:1], METRIC)
    with pytest.raises(ValueError, match=r"unknown patching point 'resid'.*resid_pre.*attn\.z"):
        patch(model, clean, corrupted, METRIC, "resid")
    with pytest.raises(ValueError, match="into='sideways'"):
        patch(model, clean, corrupted, METRIC, into="sideways")
    with pytest.raises(ValueError, match=r"logits_to_keep=8 must be in \[0, 7\]"):
        patch(model, clean, corrupted, METRIC, logits_to_keep=8)
    with pytest.raises(ValueError, match=r"clean: token id 97 out of range \[0, 97\)"):
        patch(model, torch.full((1, T), V), corrupted[:1], METRIC)
    with pytest.raises(ValueError, match=r"attention_mask must be 2-D .* = \(2, 7\)"):
        patch(model, clean, corrupted, METRIC, attention_mask=torch.ones(2, 6))
    with pytest.raises(ValueError, match=r"metric must return one number .* got shape \(2,\)"):
        patch(model, clean, corrupted, lambda logits: logits[:, -1, 0])
    with pytest.raises(ValueError, match="max_memory=0"):
        patch(model, clean, corrupted, METRIC, max_memory=0)
    with pytest.raises(TypeError, match="GPT2LMHeadModel, got GPT2Model"):
        patch(GPT2Model(model.config).eval(), clean, corrupted, METRIC)
    with model.hooks({"h.0.attn.z": lambda x, name: None}):
        with pytest.raises(ValueError, match=r"hooks are already set at \['h.0.attn.z'\]"):
            patch(model, clean, corrupted, METRIC)
    model.train()
    try:
        with pytest.raises(ValueError, match="training mode"):
            patch(model, clean, corrupted, METRIC)
    finally:
        model.eval()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside torch.inference_mode"):
        attribution_patch(model, clean, corrupted, METRIC)
