"""Model parity with transformers (fp32, CPU): logits, every hidden state, every attention map, loss and the
gradient of every parameter, on odd configs and the 124M shape, with a left-padded batch."""
import pytest
import torch

from nanogpt2 import GPT2Config, GPT2LMHeadModel, GPT2Model
from nanogpt2.attention import positions_from_mask
from nanogpt2.weights import CONV1D_SUFFIXES

ATOL = 1e-4

CONFIGS = {
    "tiny": dict(),
    "odd-heads-relu-ninner": dict(n_head=3, n_embd=96, n_inner=200, activation_function="relu",
                                  layer_norm_epsilon=1e-6, vocab_size=300),
    "erf-gelu-inverse-layer-scale": dict(n_layer=3, activation_function="gelu", scale_attn_by_inverse_layer_idx=True),
    "upcast-unscaled": dict(n_layer=3, reorder_and_upcast_attn=True, scale_attn_weights=False, n_embd=48, n_head=2),
    "quick-gelu-vocab-77": dict(activation_function="quick_gelu", vocab_size=77, n_positions=40),
    "gpt2-124M": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
}


def left_padded_batch(vocab_size, T=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (3, T), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0   # left padding
    mask[2, :T - 1] = 0  # a single real token
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)  # no loss on logits at padding
    return ids, mask, labels


def hf_grad(hf, name):
    g = dict(hf.named_parameters())[name].grad
    return g.t() if name.endswith(CONV1D_SUFFIXES) else g


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_transformers(hf_checkpoint, name, backend):
    directory, hf = hf_checkpoint(seed=1, **CONFIGS[name])
    hf.config._attn_implementation = "eager"  # the reference for attention maps
    ours = GPT2LMHeadModel.from_pretrained(directory, attn_implementation=backend)
    ids, mask, labels = left_padded_batch(ours.config.vocab_size, T=11 if name == "gpt2-124M" else 13)
    real = mask.bool()

    a = ours(ids, attention_mask=mask, labels=labels, output_hidden_states=True, output_attentions=True)
    b = hf(ids, attention_mask=mask, position_ids=positions_from_mask(mask, 0, ids.shape[1], "cpu"), labels=labels,
           output_hidden_states=True, output_attentions=True)

    assert a.logits.shape == b.logits.shape
    torch.testing.assert_close(a.logits[real], b.logits[real], atol=ATOL, rtol=0)
    assert len(a.hidden_states) == len(b.hidden_states) == ours.config.n_layer + 1
    for i, (x, y) in enumerate(zip(a.hidden_states, b.hidden_states)):
        torch.testing.assert_close(x[real], y[real], atol=ATOL, rtol=0, msg=lambda m: f"hidden_states[{i}]: {m}")
    assert len(a.attentions) == len(b.attentions) == ours.config.n_layer
    for i, (x, y) in enumerate(zip(a.attentions, b.attentions)):
        assert x.shape == y.shape == (3, ours.config.n_head, ids.shape[1], ids.shape[1])
        q_real = real[:, None, :, None].expand_as(x)  # padding query rows are meaningless in both
        torch.testing.assert_close(x[q_real], y[q_real], atol=ATOL, rtol=0, msg=lambda m: f"attentions[{i}]: {m}")
    torch.testing.assert_close(a.loss, b.loss, atol=ATOL, rtol=0)

    a.loss.backward()
    b.loss.backward()
    hf_names = {n for n, _ in hf.named_parameters()}
    ours_params = dict(ours.named_parameters())
    assert set(ours_params) == hf_names  # same names; lm_head is tied (listed once, as wte) in both
    worst = max((ours_params[n].grad - hf_grad(hf, n)).abs().max().item() for n in hf_names)
    assert worst <= ATOL, f"max gradient difference {worst:.2e}"


def test_forward_without_outputs_uses_fast_path_and_matches(hf_checkpoint):
    """The plain call (no attentions requested) runs sdpa with is_causal; same logits as transformers."""
    directory, hf = hf_checkpoint(seed=2)
    ours = GPT2LMHeadModel.from_pretrained(directory)
    ids = torch.randint(0, 101, (2, 20))
    torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)


def test_position_ids_token_type_ids_inputs_embeds(hf_checkpoint):
    directory, hf = hf_checkpoint(seed=3)
    ours = GPT2LMHeadModel.from_pretrained(directory)
    ids = torch.randint(0, 101, (2, 9))
    pos = torch.arange(5, 14)[None].expand(2, -1)
    tt = torch.randint(0, 101, (2, 9))
    torch.testing.assert_close(ours(ids, position_ids=pos, token_type_ids=tt).logits,
                               hf(ids, position_ids=pos, token_type_ids=tt).logits, atol=ATOL, rtol=0)
    emb = ours.transformer.wte(ids)
    torch.testing.assert_close(ours(inputs_embeds=emb).logits, hf(inputs_embeds=emb).logits, atol=ATOL, rtol=0)


def test_right_padding_leaves_real_tokens_unchanged(hf_checkpoint):
    directory, _ = hf_checkpoint(seed=4)
    ours = GPT2LMHeadModel.from_pretrained(directory)
    ids = torch.randint(0, 101, (1, 10))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    full = ours(ids[:, :7]).logits
    torch.testing.assert_close(ours(ids, attention_mask=mask).logits[:, :7], full, atol=ATOL, rtol=0)


def test_left_padded_row_equals_row_alone(hf_checkpoint):
    directory, _ = hf_checkpoint(seed=5)
    ours = GPT2LMHeadModel.from_pretrained(directory)
    ids, mask, _ = left_padded_batch(101)
    alone = ours(ids[1:2, 4:]).logits
    torch.testing.assert_close(ours(ids, attention_mask=mask).logits[1:2, 4:], alone, atol=ATOL, rtol=0)


def test_dropout_active_only_in_training():
    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2))
    ids = torch.randint(0, 50, (2, 8))
    m.eval()
    assert torch.equal(m(ids).logits, m(ids).logits)
    m.train()
    assert not torch.allclose(m(ids).logits, m(ids).logits)


def test_lm_head_is_tied_and_init_matches_gpt2_scheme():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=1000, n_positions=64, n_embd=256, n_layer=8, n_head=4)
    m = GPT2LMHeadModel(cfg)
    assert m.lm_head.weight is m.transformer.wte.weight
    std = m.transformer.h[0].attn.c_attn.weight.std().item()
    std_proj = m.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(std - 0.02) < 2e-3 and abs(std_proj - 0.02 / (2 * 8) ** 0.5) < 1e-3
    assert m.num_parameters() == sum(p.numel() for p in m.parameters())


def test_gpt2model_matches_hidden_state(hf_checkpoint):
    directory, hf = hf_checkpoint(seed=6)
    base = GPT2Model.from_pretrained(directory)  # reads a checkpoint written for GPT2LMHeadModel
    ids = torch.randint(0, 101, (2, 12))
    out = base(ids)
    assert out.logits is None and out.last_hidden_state.shape == (2, 12, 32)
    torch.testing.assert_close(out.last_hidden_state, hf.transformer(ids).last_hidden_state, atol=ATOL, rtol=0)


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=3, n_head=2, resid_pdrop=0, embd_pdrop=0,
                     attn_pdrop=0)
    m = GPT2LMHeadModel(cfg).train()
    ids = torch.randint(0, 50, (2, 8))
    m(ids, labels=ids).loss.backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m.transformer.gradient_checkpointing = True
    m(ids, labels=ids).loss.backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], atol=1e-6, rtol=0)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_torch_compile_traces_forward_in_one_graph(padded):
    """torch.compile(model) (training with --compile, prefill benchmarks): one graph, no breaks. The input checks
    that read tensor values (id range, "is anything padding?") are skipped while tracing for that reason."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    ids, mask, labels = left_padded_batch(128)
    kw = dict(attention_mask=mask) if padded else {}
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(ids, labels=labels, **kw)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    compiled = torch.compile(model, backend="eager")   # dynamo only: the traced graph computes the same loss
    assert torch.allclose(compiled(ids, labels=labels, **kw).loss, model(ids, labels=labels, **kw).loss, atol=1e-6)
