"""oneDNN-packed weights (nanogpt2/packed.py): same results as F.linear, never wrong gradients or stale weights."""
import pytest
import torch

from nanogpt2 import GPT2Config, GPT2LMHeadModel, packed
from nanogpt2.packed import available, pack, packed_linears, unpack

pytestmark = pytest.mark.skipif(not available(), reason="this PyTorch build cannot pack weights for oneDNN")

TINY = dict(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4, initializer_range=0.7)


@pytest.fixture(autouse=True)
def pack_small_layers(monkeypatch):
    """The tiny test model's layers are below the size where packing pays off; pack them anyway."""
    monkeypatch.setattr(packed, "MIN_PACK_NUMEL", 0)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(**TINY)).eval()


def linears(model):
    return [m for m in model.modules() if type(m) is torch.nn.Linear]


def packed_layers(model):
    return [m for m in model.modules() if isinstance(m, packed.PackedLinear)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_packed_logits_match_plain(model, dtype, tol):
    model = model.to(dtype)
    ids = torch.randint(0, 101, (3, 9))
    with torch.no_grad():
        ref = model(ids).logits.float()
        n_linear = len(linears(model))
        with packed_linears(model) as swaps:
            assert len(swaps) == len(packed_layers(model)) == n_linear == 4 * 2 + 1   # 4 per block + lm_head
            assert linears(model) == []
            got = model(ids).logits.float()
    assert (got - ref).abs().max().item() <= tol * ref.abs().max().item()


def test_layers_are_restored_on_exit_even_on_error(model):
    with pytest.raises(RuntimeError, match="boom"):
        with packed_linears(model):
            raise RuntimeError("boom")
    assert packed_layers(model) == [] and len(linears(model)) == 9


def test_gradients_bypass_the_packed_copy(model):
    """Training inside the block must give the gradients of the plain model (the packed op has no autograd)."""
    ids = torch.randint(0, 101, (2, 8))
    model.train()
    torch.manual_seed(1)
    model(ids, labels=ids).loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with packed_linears(model):
        torch.manual_seed(1)
        model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)


def test_weights_changed_after_packing_are_not_ignored(model):
    ids = torch.randint(0, 101, (1, 5))
    with torch.no_grad(), packed_linears(model):
        before = model(ids).logits
        model.transformer.h[0].mlp.c_fc.weight.mul_(2.0)   # in place: the packed copy is stale now
        after = model(ids).logits
        model.transformer.h[0].mlp.c_fc.weight.div_(2.0)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(2.0)
        expected = model(ids).logits
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-5)


def test_nested_blocks_pack_once(model):
    with packed_linears(model) as outer:
        with packed_linears(model) as inner:
            assert inner == []
        assert len(packed_layers(model)) == len(outer) == 9   # the inner exit left the outer packing alone
    unpack(pack(model))
    assert packed_layers(model) == [] and len(linears(model)) == 9


def test_generate_packs_and_gives_the_same_tokens(model):
    ids = torch.randint(0, 101, (2, 6))
    plain = model.generate(ids, max_new_tokens=12, pack_weights=False)
    assert torch.equal(model.generate(ids, max_new_tokens=12), plain)
    assert torch.equal(model.generate(ids, max_new_tokens=12, pack_weights=True), plain)
    assert torch.equal(model.generate(ids, max_new_tokens=8, num_beams=3, pack_weights=True),
                       model.generate(ids, max_new_tokens=8, num_beams=3, pack_weights=False))
    assert packed_layers(model) == []


def test_pack_weights_must_be_a_bool_or_none(model):
    with pytest.raises(ValueError, match="pack_weights='yes'"):
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=2, pack_weights="yes")


def test_small_layers_are_left_alone_by_default(model, monkeypatch):
    monkeypatch.setattr(packed, "MIN_PACK_NUMEL", 1 << 19)
    with packed_linears(model) as layers:
        assert layers == []
    big = GPT2LMHeadModel(GPT2Config(vocab_size=2048, n_positions=16, n_embd=256, n_layer=1, n_head=4))
    with packed_linears(big) as swaps:
        assert [s.linear.weight.shape for s in swaps] == [torch.Size([2048, 256])]   # only lm_head has 2**19


@pytest.mark.parametrize("change", ["data", "assign", "to-bf16"])
def test_weights_replaced_after_packing_are_not_ignored(model, change):
    """Packed copies must never outlive the weights they were made from, however those are replaced."""
    ids = torch.randint(0, 101, (1, 5))
    layer = model.transformer.h[1].mlp.c_proj
    with torch.no_grad(), packed_linears(model):
        if change == "data":
            layer.weight.data = layer.weight.data * 3
        elif change == "assign":
            layer.weight = torch.nn.Parameter(layer.weight.detach() * 3)
        else:
            model.to(torch.bfloat16)
        got = model(ids).logits
    with torch.no_grad():
        expected = model(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_model_built_under_inference_mode_generates_packed():
    """Inference tensors keep no version counter: packing must not ask them for one (it used to raise)."""
    torch.manual_seed(0)
    with torch.inference_mode():
        model = GPT2LMHeadModel(GPT2Config(**TINY)).eval()
    assert model.transformer.wte.weight.is_inference()
    ids = torch.randint(0, 101, (2, 6))
    plain = model.generate(ids, max_new_tokens=8, pack_weights=False)
    assert torch.equal(model.generate(ids, max_new_tokens=8, pack_weights=True), plain)


def test_a_copy_taken_inside_the_block_is_a_plain_model_with_its_own_weights(model):
    """A deepcopy mid-generation (e.g. from a streamer callback) must compute with the copy's weights, never
    through the original's packed ones, and stay an ordinary model after the block."""
    import copy
    ids = torch.randint(0, 101, (1, 5))
    with torch.no_grad(), packed_linears(model):
        clone = copy.deepcopy(model)
        for p in clone.parameters():
            p.mul_(0.5)
        got = clone(ids).logits
        original = model(ids).logits
    assert packed_layers(clone) == [] and len(linears(clone)) == 9
    assert clone.lm_head.weight is clone.transformer.wte.weight            # the tie survives the copy
    with torch.no_grad():
        torch.testing.assert_close(got, clone(ids).logits)
        torch.testing.assert_close(original, model(ids).logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, original)


def test_layers_with_torch_hooks_are_not_packed(model):
    """A stand-in module would skip the Linear's own hooks: such a layer keeps its Linear, and its hook fires."""
    calls = []
    layer = model.transformer.h[0].attn.c_attn
    handle = layer.register_forward_hook(lambda m, a, out: calls.append(out.shape))
    try:
        with torch.no_grad(), packed_linears(model) as swaps:
            assert layer not in [s.linear for s in swaps] and len(swaps) == 8
            assert model.transformer.h[0].attn.c_attn is layer
            model(torch.tensor([[1, 2, 3]]))
    finally:
        handle.remove()
    assert calls == [torch.Size([1, 3, 96])]


def test_state_dict_names_are_unchanged_inside_the_block(model):
    names = list(model.state_dict())
    with packed_linears(model):
        assert list(model.state_dict()) == names
