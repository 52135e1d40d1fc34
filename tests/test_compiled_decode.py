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


@pytest.fixture
def fresh_model(models, monkeypatch):
    """A copy of the peaky model whose compiled step runs eagerly and stays attached to it (no real compile)."""
    monkeypatch.setattr(compiled, "_compile", lambda fn, frozen, model=None: fn)
    return copy.deepcopy(models[1])


def test_static_buffers_are_reused_across_steps_and_calls(fresh_model, models, batch, monkeypatch):
    """One runner per shape bucket: its cache, token, lengths and logits keep their addresses for every token of
    every generate() call of that shape (what a CUDA graph needs), and the tokens are the eager path's."""
    hf, ours = models
    ids, mask, _ = batch
    addresses = []
    call = compiled.StaticDecode.__call__

    def recording(self, token, mask):
        out = call(self, token, mask)
        addresses.append((out.data_ptr(), self.cache.k.data_ptr(), self.token.data_ptr(), self.seqlens.data_ptr()))
        return out
    monkeypatch.setattr(compiled.StaticDecode, "__call__", recording)
    for _ in range(2):
        got = fresh_model.generate(ids, attention_mask=mask, max_new_tokens=NEW, compile=True)
        assert torch.equal(got, hf_generate(hf, ids, mask, max_new_tokens=NEW))
    beams = fresh_model.generate(ids, attention_mask=mask, max_new_tokens=NEW, num_beams=2, compile=True)
    assert torch.equal(beams, ours.generate(ids, attention_mask=mask, max_new_tokens=NEW, num_beams=2))
    runners = fresh_model.compiled_decode.runners
    assert len(runners) == 2                                  # batch 3 (greedy) and 3 x 2 beams
    greedy = addresses[:2 * (NEW - 1)]
    assert len(set(greedy)) == 1, "a static buffer moved between tokens or generate() calls"


def test_runners_are_bounded_and_least_recently_used_go(fresh_model):
    ids = torch.tensor([[5, 6, 7]])
    for rows in range(1, compiled.CompiledDecode.MAX_RUNNERS + 2):
        fresh_model.generate(ids.expand(rows, 3), max_new_tokens=3, compile=True)
    sizes = [key[0] for key in fresh_model.compiled_decode.runners]
    assert sizes == list(range(2, compiled.CompiledDecode.MAX_RUNNERS + 2))   # batch 1 dropped first


def test_named_hooks_make_the_compiled_step_run_eagerly(fresh_model):
    """A captured graph would skip Python hooks: with model.hooks active, compile=True takes the eager step."""
    seen = []
    with fresh_model.hooks({"ln_f": lambda x, name: seen.append(x.shape[1])}):
        out = fresh_model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, compile=True)
    assert seen == [3, 1, 1, 1] and fresh_model.compiled_decode is None
    assert torch.equal(out, fresh_model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4))


@pytest.mark.cuda_graphs
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_runs_the_triton_kernels(tmp_path, dtype, monkeypatch):
    """The tiny test models have head dim 8, where "auto" takes SDPA: here head dim 64, so the compiled, captured
    step runs our decode kernel (torch.compile sees it through triton_op; the first GPU run found it failing to
    compile there: inductor passed the softmax scale as fp64). Peaky weights: greedy tokens cannot hinge on
    rounding, so compiled and eager agree exactly, left padding and all."""
    from helpers_generation import assert_greedy_up_to_near_ties, left_padded, peaky_pair
    from nanogpt2 import attention
    _, model = peaky_pair(tmp_path, n_embd=128, n_head=2, n_positions=128)
    model = model.to("cuda", dtype)
    ids, mask = (t.cuda() for t in left_padded(model.config.vocab_size))
    kernels, decode_calls = attention._kernels(), []
    real_decode = kernels.decode_attention

    def counting_decode(*args, **kwargs):   # eagerly: every step; compiled: once per trace (then the graph)
        decode_calls.append(1)
        return real_decode(*args, **kwargs)
    monkeypatch.setattr(kernels, "decode_attention", counting_decode)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=40)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=40, compile=True)
    (runner,) = model.compiled_decode.runners.values()
    assert runner.graph is not None
    assert decode_calls, "the Triton decode kernel never ran"
    if dtype == torch.float32:
        assert torch.equal(got, want)
    else:   # bf16: inductor's fused norms round unlike eager's, so a near-tie may flip and the rows part
        assert_greedy_up_to_near_ties(model, got, ids.shape[1], mask)


@pytest.mark.cuda_graphs
def test_cuda_graph_decode_captures_once_and_replays(models, batch):
    """On CUDA the runner captures its step in a CUDA graph on the first token and replays it for every later
    token and generate() call of that shape; the tokens stay the eager path's, and no step syncs the host."""
    model = copy.deepcopy(models[1]).cuda()
    ids, mask, _ = (t.cuda() if isinstance(t, torch.Tensor) else t for t in batch)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=NEW, compile=True), want)
    (runner,) = model.compiled_decode.runners.values()
    graph = runner.graph
    assert graph is not None
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=NEW, compile=True), want)
    assert runner.graph is graph                             # replayed, not captured again
    step = model.compiled_decode.step(runner.cache, None)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(ids[:, -1], None)                               # one replay: no host sync
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with torch.no_grad():                                    # a weight replaced: graphs read stale addresses
        model.transformer.h[0].mlp.c_fc.weight = torch.nn.Parameter(model.transformer.h[0].mlp.c_fc.weight * 2)
    want = model.generate(ids, attention_mask=mask, max_new_tokens=NEW)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=NEW, compile=True), want)
    assert next(iter(model.compiled_decode.runners.values())) is not runner


def test_two_open_streams_of_one_shape_do_not_share_a_runner(fresh_model, batch):
    """An open stream keeps its runner: a second stream (or a generate() inside a streamer) of the same shape
    gets buffers of its own, and both give the eager tokens."""
    ids = batch[0][:1]
    want_a = fresh_model.generate(ids, max_new_tokens=NEW)
    want_b = fresh_model.generate(ids.flip(-1), max_new_tokens=NEW)
    a = generation.stream(fresh_model, ids, max_new_tokens=NEW, compile=True)
    b = generation.stream(fresh_model, ids.flip(-1), max_new_tokens=NEW, compile=True)
    got_a, got_b = [], []
    for ta, tb in zip(a, b):                                   # interleaved, token by token
        got_a.append(ta)
        got_b.append(tb)
        inner = fresh_model.generate(ids, max_new_tokens=NEW, compile=True)   # a third, inside
        assert torch.equal(inner, want_a)
    assert torch.equal(torch.stack(got_a, 1), want_a[:, ids.shape[1]:])
    assert torch.equal(torch.stack(got_b, 1), want_b[:, ids.shape[1]:])
    assert not any(r.busy for r in fresh_model.compiled_decode.runners.values())   # all released


def test_a_copy_of_the_model_starts_without_its_compiled_step(fresh_model):
    fresh_model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, compile=True)
    assert fresh_model.compiled_decode is not None
    clone = copy.deepcopy(fresh_model)
    assert clone.compiled_decode is None
    assert torch.equal(clone.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, compile=True),
                       fresh_model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3))


def test_static_positions_follow_the_one_positions_rule():
    """The fixed-shape step's positions equal positions_from_mask's for the same padding and length."""
    from nanogpt2.attention import positions_from_mask, static_positions
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    kv_start = torch.tensor([2, 0], dtype=torch.int32)
    seqlens = torch.full((2,), 6, dtype=torch.int32)
    assert torch.equal(static_positions(seqlens, kv_start), positions_from_mask(mask, 5, 1, "cpu"))


def test_gemm_backends_follow_the_weights():
    """cpu_compile_options (compiled.py): float models get inductor's C++ GEMM templates only (autotuning with MKL
    in the running picked the slower one), int4 models the templates plus torch's op for lm_head, int8 models
    torch's op only (the int8 template decoded wrong tokens)."""
    import nanogpt2
    from nanogpt2 import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=101, n_positions=32)
    plain = GPT2LMHeadModel(cfg)
    assert compiled.cpu_compile_options(plain)["max_autotune_gemm_backends"] == "CPP"
    assert compiled.cpu_compile_options(GPT2LMHeadModel(cfg).double())["max_autotune_gemm_backends"] == "CPP,ATEN"
    assert compiled.cpu_compile_options(nanogpt2.quantize(GPT2LMHeadModel(cfg), "int4", 32))[
        "max_autotune_gemm_backends"] == "CPP,ATEN"
    assert compiled.cpu_compile_options(nanogpt2.quantize(plain, "int8"))["max_autotune_gemm_backends"] == "ATEN"


def test_compiled_int8_decode_at_gpt2_width_and_depth_gives_the_eager_tokens():
    """The shape where inductor's int8 template went wrong (12 layers of 768, GPT-2's vocabulary; 6 layers were
    right): ~15 s, a really compiled 124M step. Peaky logits (wte at std 0.1) so rounding cannot flip a token."""
    import nanogpt2
    from nanogpt2 import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config.preset("gpt2")).eval()
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0.0, 0.1)
    nanogpt2.quantize(model, "int8")
    ids = torch.randint(0, 50257, (1, 16))
    assert torch.equal(model.generate(ids, max_new_tokens=8, compile=True), model.generate(ids, max_new_tokens=8))


@pytest.mark.parametrize("kind", ["float64", "int4 at GPT-2's vocabulary"])
def test_compile_works_where_the_cpp_templates_do_not_reach(kind):
    """The cases cpu_compile_options keeps ATEN for: float64 matmuls (no C++ template takes them: "CPP" alone
    fails with NoValidChoicesError) and int4's lm_head with 50257 rows (torch's op, no template)."""
    import nanogpt2
    from nanogpt2 import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    vocab = 101 if kind == "float64" else 50257
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=vocab, n_positions=64)).eval()
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0.0, 0.5)   # peaky logits: rounding cannot flip a token
    model = model.to(torch.float64) if kind == "float64" else nanogpt2.quantize(model, "int4", 32)
    ids = torch.randint(0, vocab, (1, 9))
    assert torch.equal(model.generate(ids, max_new_tokens=4, compile=True), model.generate(ids, max_new_tokens=4))
