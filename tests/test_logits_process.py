"""Logits processors against transformers' own: the processed scores must be identical (bit for bit, -inf
where filtered), on random scores and on the edge cases that decide ties: equal scores, -inf already present,
one dominant token, k / p at their limits, min_tokens_to_keep. And generation.process() must chain them in
transformers' order with transformers' defaults (compared with the list transformers' generate builds)."""
import pytest
import torch

from helpers_generation import hf_quiet
from nanogpt2 import logits_process as lp
from nanogpt2.generation import GenerationConfig, Prompt, process

transformers = hf_quiet()
T = transformers.generation.logits_process
V = 40


def score_table():
    """Rows chosen to break filters: random, heavy ties, -inf entries, flat, one dominant token."""
    g = torch.Generator().manual_seed(0)
    rows = [
        torch.randn(V, generator=g) * 3,
        torch.randint(-2, 3, (V,), generator=g).float(),          # many exact ties
        torch.where(torch.arange(V) % 3 == 0, -float("inf"), torch.randn(V, generator=g)),
        torch.zeros(V),                                             # all equal
        torch.cat([torch.tensor([30.0]), torch.randn(V - 1, generator=g)]),   # one token has ~all the mass
        torch.linspace(-5, 5, V),
    ]
    return torch.stack(rows)


def same(ours, theirs):
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)    # equal, -inf matching -inf


@pytest.mark.parametrize("k", [1, 2, 5, V - 1, V, V + 7])
@pytest.mark.parametrize("keep", [1, 3])
def test_top_k(k, keep):
    s = score_table()
    same(lp.top_k(s, k, keep), T.TopKLogitsWarper(k, min_tokens_to_keep=keep)(None, s.clone()))
    if k == 2 and keep == 1:   # ties at the k-th score are kept: the tie row keeps every token scored 2
        assert (lp.top_k(s, k)[1] > -float("inf")).sum() == (s[1] == s[1].max()).sum()


@pytest.mark.parametrize("p", [1e-6, 0.1, 0.5, 0.9, 0.999, 1.0])
@pytest.mark.parametrize("keep", [1, 3])
def test_top_p(p, keep):
    s = score_table()
    same(lp.top_p(s, p, keep), T.TopPLogitsWarper(p, min_tokens_to_keep=keep)(None, s.clone()))


@pytest.mark.parametrize("p", [0.0, 0.05, 0.5, 1.0])
@pytest.mark.parametrize("keep", [1, 3])
def test_min_p(p, keep):
    s = score_table()
    same(lp.min_p(s, p, keep), T.MinPLogitsWarper(p, min_tokens_to_keep=keep)(None, s.clone()))


@pytest.mark.parametrize("t", [0.05, 0.7, 1.0, 3.0])
def test_temperature(t):
    s = score_table()
    same(lp.temperature(s, t), T.TemperatureLogitsWarper(t)(None, s.clone()))


def histories(n_rows, L=12, vocab=6, seed=1):
    """Token histories from a small vocabulary, so tokens and n-grams repeat."""
    return torch.randint(0, vocab, (n_rows, L), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("penalty", [0.5, 1.0, 1.3, 4.0])
def test_repetition_penalty(penalty):
    s = score_table()
    h = histories(len(s))
    same(lp.repetition_penalty(s, h, penalty), T.RepetitionPenaltyLogitsProcessor(penalty)(h, s.clone()))
    # left padding (V in our history) is skipped, as transformers skips prompt_ignore_length tokens per row
    n_pad = torch.tensor([0, 3, 11, 5, 1, 0])
    padded = h.masked_fill(torch.arange(h.shape[1])[None] < n_pad[:, None], V)
    theirs = T.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=n_pad)(h, s.clone())
    same(lp.repetition_penalty(s, padded, penalty), theirs)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("L", [1, 3, 12])
def test_no_repeat_ngram(n, L):
    s = score_table()
    h = histories(len(s), L=L)
    ours = lp.no_repeat_ngram(s, h, n)
    same(ours, T.NoRepeatNGramLogitsProcessor(n)(h, s.clone()))
    if n == 2 and L == 12:   # the history repeats bigrams, so something must be banned
        assert torch.isinf(ours).sum() > torch.isinf(s).sum()


def test_no_repeat_ngram_ignores_padding():
    """Padding (V) never forms an n-gram: a padded row bans what the same row bans alone."""
    s = score_table()[:1]
    row = torch.tensor([[4, 1, 4, 2, 4]])
    alone = lp.no_repeat_ngram(s, row, 2)
    padded = lp.no_repeat_ngram(s, torch.cat([torch.full((1, 3), V), row], dim=1), 2)
    same(padded, alone)
    assert torch.isinf(alone[0, [1, 2]]).all()   # 4 was followed by 1 and by 2


@pytest.mark.parametrize("eos", [[7], [7, 0, 39]])
def test_ban_tokens_is_min_new_tokens(eos):
    s = score_table()
    h = histories(len(s), L=5)
    theirs = T.MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=3, min_new_tokens=4, eos_token_id=eos)
    same(lp.ban_tokens(s, torch.tensor(eos)), theirs(h, s.clone()))   # 2 new < 4: eos banned


@pytest.mark.parametrize("do_sample", [True, False])
def test_process_chains_like_transformers(do_sample):
    """Every processor at once, padded history: generation.process() == the list transformers' generate builds
    (its order, its defaults such as top_k=50 when sampling, its min_tokens_to_keep)."""
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=8, n_layer=1,
                                                              n_head=2)).eval()
    kw = dict(do_sample=do_sample, temperature=0.7, top_p=0.9, min_p=0.05, repetition_penalty=1.3,
              no_repeat_ngram_size=2, min_new_tokens=3, eos_token_id=[5, 9], pad_token_id=3)
    gc, _ = hf._prepare_generation_config(transformers.GenerationConfig(**kw))
    hf._prepare_special_tokens(gc, device="cpu")
    prompt_len = 8
    ids = histories(6, L=prompt_len + 2)                 # a prompt of 8, then 2 generated tokens
    mask = torch.ones(6, prompt_len, dtype=torch.long)
    mask[1, :3] = 0
    mask[4, :7] = 0
    chain = hf._get_logits_processor(gc, input_ids_seq_length=prompt_len, device="cpu",
                                     model_kwargs={"attention_mask": mask})
    assert len(chain) == (7 if do_sample else 3)
    s = score_table()
    theirs = chain(ids, s.clone())

    history = ids.clone()
    history[:, :prompt_len] = ids[:, :prompt_len].masked_fill(mask == 0, V)
    cfg = GenerationConfig(**kw)
    prompt = Prompt(ids[:, :prompt_len], mask, history[:, :prompt_len], 4, torch.tensor([5, 9]), 3)
    same(process(s, history, 2, cfg, prompt), theirs)
