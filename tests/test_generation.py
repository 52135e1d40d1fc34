"""generate(): the same tokens as transformers' generate (greedy, beam search, penalties; single prompts and
left-padded batches), batch invariance, reproducible sampling, streaming, and a clear error for every bad
argument. The checkpoint has peaky logits (helpers_generation.py) so token equality means equal semantics."""
import pytest
import torch

from helpers_generation import hf_generate, left_padded, peaky_pair, run_compiled_step_eagerly
from nanogpt2.generation import generate, stream

NEW = 12


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return peaky_pair(tmp_path_factory.mktemp("peaky"))


@pytest.fixture(scope="module")
def batch(models):
    """A left-padded batch (3 rows: 0, 3 and 6 padding tokens), and eos ids the model really produces."""
    ids, mask = left_padded(models[1].config.vocab_size)
    new = generate(models[1], ids, mask, max_new_tokens=NEW)[:, ids.shape[1]:]
    counts = torch.bincount(new.flatten(), minlength=models[1].config.vocab_size)
    common = counts.argsort(descending=True)[:8].tolist()   # frequent tokens: rows end early, at different steps
    return ids, mask, common


def single(batch):
    ids, mask, _ = batch
    return ids[:1], None


CASES = {
    "greedy": dict(),
    "greedy-eos": dict(eos="one", pad_token_id=1),
    "greedy-eos-list-min-new": dict(eos="two", pad_token_id=1, min_new_tokens=4),
    "greedy-penalties": dict(eos="one", pad_token_id=1, repetition_penalty=1.8, no_repeat_ngram_size=2),
    "greedy-penalty-below-1": dict(repetition_penalty=0.6, no_repeat_ngram_size=3),
    "beam": dict(num_beams=3, eos="one", pad_token_id=1),
    "beam-return-2": dict(num_beams=4, num_return_sequences=2, eos="two", pad_token_id=1),
    "beam-early-true-lp2": dict(num_beams=3, eos="two", pad_token_id=1, early_stopping=True, length_penalty=2.0),
    "beam-early-false-lp0.5": dict(num_beams=3, eos="two", pad_token_id=1, early_stopping=False, length_penalty=0.5),
    "beam-never-lp-neg": dict(num_beams=3, eos="two", pad_token_id=1, early_stopping="never", length_penalty=-1.0),
    "beam-never-lp1": dict(num_beams=2, eos="one", pad_token_id=1, early_stopping="never", num_return_sequences=2),
    "beam-no-eos": dict(num_beams=3, num_return_sequences=3),
    # eight eos ids: most of the best candidates end at every step, the pool fills fast
    "beam-many-eos": dict(num_beams=2, eos="many", pad_token_id=1, length_penalty=0.0, num_return_sequences=2),
    "beam-penalties": dict(num_beams=3, eos="two", pad_token_id=1, repetition_penalty=1.5, no_repeat_ngram_size=2,
                           min_new_tokens=2),
}


def resolve(case, common):
    kw = dict(CASES[case])
    eos = kw.pop("eos", None)
    if eos is not None:
        kw["eos_token_id"] = {"one": common[0], "two": common[:2], "many": common}[eos]
    return kw


@pytest.mark.parametrize("padded", [False, True], ids=["one-prompt", "left-padded-batch"])
@pytest.mark.parametrize("case", list(CASES))
def test_same_tokens_as_transformers(models, batch, case, padded):
    hf, ours = models
    ids, mask, common = batch
    if not padded:
        ids, mask = ids[:1], None
    kw = resolve(case, common)
    got = generate(ours, ids, mask, max_new_tokens=NEW, **kw)
    want = hf_generate(hf, ids, mask, max_new_tokens=NEW, **kw)
    assert got.shape == want.shape, f"{case}: shape {tuple(got.shape)} vs transformers {tuple(want.shape)}"
    assert torch.equal(got, want), f"{case}:\nours\n{got}\ntransformers\n{want}"
    n = kw.get("num_return_sequences", 1)
    assert torch.equal(got[:, :ids.shape[1]], ids.repeat_interleave(n, 0))   # the prompt, padding included


def test_padding_inferred_from_pad_token_like_transformers(models, batch):
    """No attention_mask, pad_token_id not an eos: transformers masks the pad tokens; so do we."""
    hf, ours = models
    ids, mask, common = batch   # the padding id is 2
    kw = dict(max_new_tokens=NEW, pad_token_id=2, eos_token_id=common[0])
    got = generate(ours, ids, **kw)
    assert torch.equal(got, generate(ours, ids, mask, **kw))
    assert torch.equal(got, hf_generate(hf, ids, **kw))
    with pytest.raises(ValueError, match=r"inferred from pad_token_id=2.* row 0 is not left-padded"):
        generate(ours, torch.tensor([[5, 2, 6]]), pad_token_id=2)


def test_eos_rows_finish_early_and_pad(models, batch):
    """The parity cases above exercise eos: rows really end at different steps, then carry pad_token_id."""
    ids, mask, common = batch
    out = generate(models[1], ids, mask, max_new_tokens=NEW, eos_token_id=common[0], pad_token_id=1)
    new = out[:, ids.shape[1]:]
    ends = [row.tolist().index(common[0]) if common[0] in row.tolist() else None for row in new]
    assert sum(e is not None and e < new.shape[1] - 1 for e in ends) >= 2, ends
    for row, e in zip(new, ends):
        if e is not None:
            assert (row[e + 1:] == 1).all()


@pytest.mark.filterwarnings("ignore:Using the model-agnostic default")
@pytest.mark.parametrize("kw", [dict(), dict(max_length=10), dict(max_new_tokens=3)], ids=str)
def test_length_arguments_like_transformers(models, batch, kw):
    """Neither length: 20 new tokens; max_length counts the prompt; max_new_tokens does not."""
    hf, ours = models
    ids = batch[0][:1]
    got = generate(ours, ids, **kw)
    assert torch.equal(got, hf_generate(hf, ids, **kw))
    assert got.shape[1] == {(): 7 + 20, ("max_length",): 10, ("max_new_tokens",): 7 + 3}[tuple(kw)]


@pytest.mark.parametrize("kw", [dict(), dict(num_beams=3, num_return_sequences=2),
                                dict(eos="one", pad_token_id=1), dict(num_beams=3, eos="two", pad_token_id=1)],
                         ids=["greedy", "beam", "greedy-eos", "beam-eos"])
def test_batch_invariance(models, batch, kw):
    """Each row of a left-padded batch generates exactly what it generates alone (no padding)."""
    ours = models[1]
    ids, mask, common = batch
    kw = dict(kw)
    if kw.pop("eos", None):
        kw["eos_token_id"] = common[0] if "num_beams" not in kw else common[:2]
    n = kw.get("num_return_sequences", 1)
    together = generate(ours, ids, mask, max_new_tokens=NEW, **kw)
    T = ids.shape[1]
    for b in range(ids.shape[0]):
        real = ids[b][mask[b].bool()][None]
        alone = generate(ours, real, max_new_tokens=NEW, **kw)[:, real.shape[1]:]       # (n, own length)
        rows = together[b * n:(b + 1) * n, T:]
        assert torch.equal(rows[:, :alone.shape[1]], alone), f"row {b}"
        assert (rows[:, alone.shape[1]:] == 1).all()   # the batch ran longer: that row is padding


def test_sampling_is_reproducible(models, batch):
    ours = models[1]
    ids, mask, _ = batch
    kw = dict(do_sample=True, temperature=1.5, top_k=0, max_new_tokens=NEW, num_return_sequences=2)
    torch.manual_seed(123)
    a = generate(ours, ids, mask, **kw)
    torch.manual_seed(123)
    b = generate(ours, ids, mask, **kw)
    assert torch.equal(a, b)
    assert not torch.equal(a[0::2], a[1::2])   # the two samples per prompt differ

    state = torch.get_rng_state()
    c = generate(ours, ids, mask, generator=torch.Generator().manual_seed(7), **kw)
    d = generate(ours, ids, mask, generator=torch.Generator().manual_seed(7), **kw)
    e = generate(ours, ids, mask, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(c, d) and not torch.equal(c, e)
    assert torch.equal(torch.get_rng_state(), state)   # a passed generator leaves the global RNG alone


def test_beam_sampling_is_reproducible(models, batch):
    ids, mask, common = batch
    kw = dict(do_sample=True, num_beams=3, num_return_sequences=2, eos_token_id=common[:2], pad_token_id=1,
              max_new_tokens=NEW, temperature=2.0)
    a = generate(models[1], ids, mask, generator=torch.Generator().manual_seed(0), **kw)
    b = generate(models[1], ids, mask, generator=torch.Generator().manual_seed(0), **kw)
    assert torch.equal(a, b) and a.shape[0] == 6


def test_streamer_is_called_per_step_as_tokens_are_made(models, batch):
    ours = models[1]
    ids, mask, common = batch
    forwards, seen = [0], []
    handle = ours.transformer.h[0].register_forward_pre_hook(   # one call per prefill or decode step
        lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    try:
        out = generate(ours, ids, mask, max_new_tokens=NEW, eos_token_id=common[0], pad_token_id=1,
                       streamer=lambda t: seen.append((forwards[0], t.clone())))
    finally:
        handle.remove()
    assert torch.equal(torch.stack([t for _, t in seen], dim=1), out[:, ids.shape[1]:])
    # step i's tokens arrive after the prefill and i decode forwards: before the next forward runs
    assert [f for f, _ in seen] == list(range(1, len(seen) + 1))


def test_transformers_style_streamer_gets_prompt_then_tokens(models, batch):
    ids = batch[0][:1]

    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value)

        def end(self):
            self.ended = True

    r = Recorder()
    out = generate(models[1], ids, max_new_tokens=5, streamer=r)
    assert torch.equal(r.puts[0], ids) and r.ended
    assert torch.equal(torch.stack(r.puts[1:], dim=1), out[:, ids.shape[1]:])


def test_stream_iterator(models, batch):
    ours = models[1]
    ids, mask, common = batch
    kw = dict(max_new_tokens=NEW, eos_token_id=common[0], pad_token_id=1)
    out = generate(ours, ids, mask, **kw)
    steps = list(stream(ours, ids, mask, **kw))
    assert torch.equal(torch.stack(steps, dim=1), out[:, ids.shape[1]:])
    it = stream(ours, ids, mask, **kw)
    first = [next(it), next(it)]
    it.close()   # stopping early is fine
    assert torch.equal(torch.stack(first, 1), out[:, ids.shape[1]:ids.shape[1] + 2])
    assert torch.is_grad_enabled()   # no_grad does not leak out of the suspended generator
    with pytest.raises(ValueError, match="top_p"):   # checked at the call, not at the first next()
        stream(ours, ids, do_sample=True, top_p=2.0)
    with pytest.raises(ValueError, match="num_beams"):
        stream(ours, ids, num_beams=2)


# ---- validation: each bad argument is a ValueError naming it, its value and what is valid ------------------

BAD = [
    (dict(do_sample=True, temperature=0.0), r"temperature=0.0 .*> 0 when do_sample=True"),
    (dict(do_sample=True, temperature=-1.0), r"temperature=-1.0 .*> 0"),
    (dict(do_sample=True, top_p=0.0), r"top_p=0.0 .*\(0, 1\]"),
    (dict(do_sample=True, top_p=1.5), r"top_p=1.5 .*\(0, 1\]"),
    (dict(do_sample=True, top_k=-1), r"top_k=-1 .*>= 0"),
    (dict(do_sample=True, top_k=2.5), r"top_k=2.5 .*integer"),
    (dict(do_sample=True, min_p=-0.1), r"min_p=-0.1 .*\[0, 1\]"),
    (dict(do_sample=True, min_p=1.5), r"min_p=1.5 .*\[0, 1\]"),
    (dict(num_beams=0), r"num_beams=0 .*>= 1"),
    (dict(num_beams=2, num_return_sequences=3), r"num_return_sequences=3 .*at most num_beams=2"),
    (dict(num_return_sequences=2), r"num_return_sequences=2 .*greedy decoding returns 1"),
    (dict(num_return_sequences=0), r"num_return_sequences=0 .*>= 1"),
    (dict(repetition_penalty=0.0), r"repetition_penalty=0.0 .*> 0"),
    (dict(repetition_penalty=-1.2), r"repetition_penalty=-1.2 .*> 0"),
    (dict(no_repeat_ngram_size=-1), r"no_repeat_ngram_size=-1 .*>= 0"),
    (dict(min_new_tokens=-2), r"min_new_tokens=-2 .*>= 0"),
    (dict(max_new_tokens=0), r"max_new_tokens=0 .*>= 1"),
    (dict(max_new_tokens=58), r"prompt \(7 tokens\) \+ max_new_tokens \(58\) = 65 .*n_positions=64.*57 new"),
    (dict(max_length=65), r"prompt \(7 tokens\) \+ max_new_tokens \(58\) = 65 .*n_positions=64"),
    (dict(max_length=12, max_new_tokens=4), r"max_length=12 and max_new_tokens=4 disagree .*would be 11"),
    (dict(max_length=7), r"max_length=7 .*must be > 7"),
    (dict(early_stopping="sometimes"), r"early_stopping='sometimes' .*True, False or 'never'"),
    (dict(length_penalty="long"), r"length_penalty='long' .*number"),
    (dict(eos_token_id=101), r"eos_token_id: 101 .*\[0, 101\)"),
    (dict(eos_token_id=[3, -1]), r"eos_token_id: -1 .*\[0, 101\)"),
    (dict(pad_token_id=500), r"pad_token_id: 500 .*\[0, 101\)"),
]


@pytest.mark.parametrize("kw,message", BAD, ids=[str(k) for k, _ in BAD])
def test_bad_argument_is_a_clear_value_error(models, batch, kw, message):
    with pytest.raises(ValueError, match=message):
        generate(models[1], batch[0][:1], **kw)


def test_bad_inputs(models, batch):
    ours = models[1]
    ids, mask, _ = batch
    with pytest.raises(ValueError, match=r"token id 101 out of range \[0, 101\)"):
        generate(ours, torch.tensor([[5, 101]]))
    with pytest.raises(ValueError, match=r"attention_mask must be 2-D \(B, T\) = \(3, 7\)"):
        generate(ours, ids, mask[:, 1:])
    right = mask.flip(1)
    with pytest.raises(ValueError, match=r"row 1 is not left-padded .*padding_side='left'"):
        generate(ours, ids, right)
    empty = mask.clone()
    empty[2] = 0
    with pytest.raises(ValueError, match="row 2 has no real token"):
        generate(ours, ids, empty)
    with pytest.raises(ValueError, match="streamer cannot be used with beam search"):
        generate(ours, ids, mask, num_beams=2, streamer=print)
    with pytest.raises(TypeError, match="unexpected keyword argument 'top_kk'"):
        generate(ours, ids, top_kk=3)


def test_model_generate_method_delegates(models, batch):
    ids, mask, _ = batch
    ours = models[1]
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=4),
                       generate(ours, ids, mask, max_new_tokens=4))


@pytest.mark.parametrize("compile", [False, True])
def test_module_forward_hooks_fire_for_every_token(models, compile, monkeypatch):
    """generate() normally bypasses forward per token (model.decode_step); torch hooks on the model must still
    see one forward per token, as with transformers."""
    run_compiled_step_eagerly(monkeypatch)   # no real compile
    ours = models[1]
    calls = []
    handles = [ours.register_forward_hook(lambda m, a, kw, out: calls.append(kw.get("past_key_values")),
                                          with_kwargs=True),
               ours.transformer.register_forward_pre_hook(lambda m, a: calls.append("pre"))]
    try:
        out = generate(ours, torch.tensor([[5, 6, 7]]), max_new_tokens=5, compile=compile)
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == 2 * 5   # prefill + 4 decode steps (the last token is never fed back), two hooks each
    assert torch.equal(out, generate(ours, torch.tensor([[5, 6, 7]]), max_new_tokens=5))
