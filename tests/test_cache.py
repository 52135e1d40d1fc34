"""KVCache: decoding a sequence piece by piece through the cache gives the logits of one full forward.

A hypothesis property over split points, chunk sizes, batch sizes, left-padding patterns and attention
backends; plus reorder (beam search: the rows it moves, and nothing else) and the row repetition generate uses
to run a prompt once for several continuations. Logits at padding positions are meaningless in every
implementation and are not compared.
"""
from functools import lru_cache

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanogpt2 import GPT2Config, GPT2LMHeadModel, KVCache
from nanogpt2.generation import repeat_rows

ATOL = 1e-4


@lru_cache(maxsize=None)
def tiny_model():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, initializer_range=0.3)
    return GPT2LMHeadModel(config).eval()


def run_in_chunks(model, ids, mask, chunks):
    """Feed ids (B, T) through one preallocated cache, chunks[i] tokens at a time; returns logits (B, T, V)."""
    B, T = ids.shape
    cache = KVCache.for_model(model.config, B, max_len=T)
    out, start = [], 0
    for n in chunks:
        end = start + n
        logits = model(ids[:, start:end], attention_mask=mask[:, :end], past_key_values=cache, use_cache=True).logits
        out.append(logits)
        start = end
    assert cache.length == T and cache.k.shape[3] == T   # filled exactly, never reallocated
    return torch.cat(out, dim=1)


@st.composite
def cases(draw):
    B = draw(st.integers(1, 3))
    T = draw(st.integers(2, 14))
    pads = draw(st.lists(st.integers(0, T - 1), min_size=B, max_size=B))   # every row keeps >= 1 real token
    prefill = draw(st.integers(1, T - 1))                                    # the split point
    chunks, left = [prefill], T - prefill
    while left:
        chunks.append(draw(st.integers(1, min(3, left))))                    # single tokens and small chunks
        left -= chunks[-1]
    backend = draw(st.sampled_from(["sdpa", "eager"]))
    seed = draw(st.integers(0, 2**16))
    return B, T, pads, chunks, backend, seed


@settings(max_examples=25, deadline=None)
@given(cases())
def test_incremental_decoding_equals_full_forward(case):
    B, T, pads, chunks, backend, seed = case
    model = tiny_model()
    model.set_attn_implementation(backend)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (B, T), generator=g)
    mask = (torch.arange(T)[None] >= torch.tensor(pads)[:, None]).long()
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        pieces = run_in_chunks(model, ids, mask, chunks)
    real = mask.bool()
    err = (full[real] - pieces[real]).abs().max().item()
    assert err <= ATOL, f"max |full - incremental| = {err:.2e} for B={B} T={T} pads={pads} chunks={chunks}"


def test_reorder_moves_rows_like_permuted_inputs():
    """After reorder(index), row b continues old row index[b]'s history: same logits as running the permuted batch."""
    model = tiny_model()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, 97, (4, 6), generator=torch.Generator().manual_seed(1))
    index = torch.tensor([2, 2, 0, 3])   # beams may duplicate and drop rows
    with torch.no_grad():
        cache = KVCache.for_model(model.config, 4, max_len=6)
        model(ids[:, :5], past_key_values=cache, use_cache=True)
        cache.reorder(index)
        got = model(ids[index, 5:], past_key_values=cache, use_cache=True).logits
        want = model(ids[index]).logits[:, 5:]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def filled_cache(L, B, H, S, D, length, sentinel, seed=0):
    """A cache with random keys/values at its `length` written positions and `sentinel` (nan, or "row": row b
    holds -(b + 1), so a copied unwritten position shows) at the positions not yet written."""
    g = torch.Generator().manual_seed(seed)
    cache = KVCache(L, B, H, S, D)
    for buf in (cache.k, cache.v):
        buf.copy_(torch.randn(buf.shape, generator=g))
        if sentinel == "row":
            buf[:, :, :, length:] = -torch.arange(1.0, B + 1)[:, None, None, None]
        else:
            buf[:, :, :, length:] = float("nan")
    cache.length = length
    return cache


@settings(max_examples=40, deadline=None)
@given(B=st.integers(1, 6), length=st.integers(0, 7), data=st.data(), sentinel=st.sampled_from(["nan", "row"]))
def test_reorder_equals_index_select_on_written_positions(B, length, data, sentinel):
    """Written positions: what index_select on the whole buffer gives (rows repeated, dropped, permuted).
    Positions not yet written: untouched, and their NaNs reach no written position."""
    index = data.draw(st.lists(st.integers(0, B - 1), min_size=B, max_size=B), label="index")
    L, H, S, D = 3, 2, 7, 5
    cache = filled_cache(L, B, H, S, D, length, sentinel)
    before_k, before_v = cache.k.clone(), cache.v.clone()
    cache.reorder(torch.tensor(index))
    for got, before in ((cache.k, before_k), (cache.v, before_v)):
        want = before.index_select(1, torch.tensor(index))
        # (torch.equal is False for any NaN: none leaked into the written positions)
        assert torch.equal(got[:, :, :, :length], want[:, :, :, :length]), f"index {index}, length {length}"
        unwritten = got[:, :, :, length:]
        if sentinel == "row":   # every row's own sentinel still there: no unwritten position was copied
            assert torch.equal(unwritten, before[:, :, :, length:]), f"index {index}, length {length}"
        else:
            assert unwritten.isnan().all()


@pytest.mark.parametrize("as_list", [False, True], ids=["tensor", "list"])
def test_reorder_identity_copies_nothing(as_list):
    """Every beam continued itself: no copy at all (the buffers' version counters do not move)."""
    cache = filled_cache(2, 4, 2, 6, 3, length=4, sentinel="nan")
    before_k, before_v = cache.k.clone(), cache.v.clone()
    versions = cache.k._version, cache.v._version
    index = list(range(4)) if as_list else torch.arange(4)
    cache.reorder(index)
    assert (cache.k._version, cache.v._version) == versions
    assert torch.equal(cache.k[:, :, :, :4], before_k[:, :, :, :4])
    assert torch.equal(cache.v[:, :, :, :4], before_v[:, :, :, :4])
    cache.reorder([0, 0, 2, 3])   # one row moves: a copy
    assert cache.k._version > versions[0] and cache.v._version > versions[1]


@pytest.mark.parametrize("index", [[0, 1, 4], [0, -1, 2], [0, 1]], ids=["too-big", "negative", "too-short"])
def test_reorder_rejects_a_bad_index(index):
    cache = KVCache(1, 3, 1, 4, 2)
    with pytest.raises(ValueError, match=r"reorder index .* must hold 3 row numbers in \[0, 3\)"):
        cache.reorder(index)


@pytest.mark.parametrize("n", [1, 3])
def test_repeat_rows_continues_every_copy(n):
    model = tiny_model()
    model.set_attn_implementation("sdpa")
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        cache = KVCache.for_model(model.config, 2, max_len=6)
        model(ids[:, :4], past_key_values=cache, use_cache=True)
        big = repeat_rows(cache, n)
        assert big.batch_size == 2 * n and big.length == 4 and big.max_len == 6
        got = model(ids[:, 4:].repeat_interleave(n, 0), past_key_values=big, use_cache=True).logits
        want = model(ids).logits[:, 4:].repeat_interleave(n, 0)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
