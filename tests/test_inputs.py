"""Bad input gets a clear error naming the bad value and what would be valid; config validation."""
import pytest
import torch

from nanogpt2 import GPT2Config, GPT2LMHeadModel
from nanogpt2.attention import _kernels


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2)).eval()


def test_token_id_out_of_range(model):
    with pytest.raises(ValueError, match=r"token id 50 out of range \[0, 50\)"):
        model(torch.tensor([[1, 50, 2]]))
    with pytest.raises(ValueError, match=r"token id -3 out of range \[0, 50\)"):
        model(torch.tensor([[1, -3]]))


def test_sequence_longer_than_context(model):
    with pytest.raises(ValueError, match=r"sequence length 17 .*n_positions=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_non_integer_input_ids(model):
    with pytest.raises(TypeError, match=r"integer token ids.*torch\.float32"):
        model(torch.zeros(1, 4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([[1, 2, 3]])


def test_attention_mask_wrong_shape(model):
    with pytest.raises(ValueError, match=r"attention_mask must be 2-D .*\(1, 4\).*got shape \(1, 5\)"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match=r"attention_mask must be 2-D"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 1, 4, 4))


def test_labels_wrong_shape_and_input_choice(model):
    with pytest.raises(ValueError, match="labels must be"):
        model(torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="exactly one of input_ids"):
        model()


def test_one_dimensional_input_is_a_batch_of_one(model):
    assert model(torch.tensor([1, 2, 3])).logits.shape == (1, 3, 50)


def test_triton_backend_on_cpu_without_interpreter_is_refused(model, monkeypatch):
    _kernels()   # imported under the suite's TRITON_INTERPRET=1, which the kernels read once, at import
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model.set_attn_implementation("triton")
    try:
        with pytest.raises(ValueError, match="triton.*CUDA tensors.*'sdpa'"):
            model(torch.tensor([[1, 2]]))
    finally:
        model.set_attn_implementation("auto")


@pytest.mark.parametrize("kwargs,match", [
    (dict(n_embd=100, n_head=3), r"n_embd \(100\) must be divisible by n_head \(3\)"),
    (dict(activation_function="gelu_erf_new"), r"activation_function 'gelu_erf_new' is not supported; valid: gelu_new"),
    (dict(add_cross_attention=True), r"add_cross_attention=True .*not supported"),
    (dict(n_layer=0), r"n_layer must be a positive integer, got 0"),
    (dict(attn_pdrop=1.5), r"attn_pdrop must be in \[0, 1\), got 1.5"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPT2Config(**kwargs)


def test_config_from_dict_refuses_other_architectures():
    with pytest.raises(ValueError, match="model_type 'llama'"):
        GPT2Config.from_dict({"model_type": "llama"})
    with pytest.raises(ValueError, match="unknown GPT-2 preset 'gpt3'; valid: gpt2, gpt2-medium"):
        GPT2Config.preset("gpt3")


def test_presets_match_released_sizes():
    with torch.device("meta"):
        sizes = {name: GPT2LMHeadModel(GPT2Config.preset(name)).num_parameters() for name in ("gpt2", "distilgpt2")}
    assert sizes["gpt2"] == 124_439_808 and sizes["distilgpt2"] == 81_912_576


def test_token_ids_checked_on_the_device_without_a_sync_when_asked():
    """forward checks CUDA ids with a device-side assert (no host sync per step); on CPU the check is the exact
    one whatever is asked, and generate's once-per-call check names the value."""
    from nanogpt2.inputs import check_token_ids
    for sync_free in (False, True):
        with pytest.raises(ValueError, match=r"input_ids: token id 50 out of range \[0, 50\)"):
            check_token_ids(torch.tensor([[1, 50]]), 50, "input_ids", sync_free=sync_free)
    if torch.cuda.is_available():
        ids = torch.tensor([[1, 2]], device="cuda")
        torch.cuda.set_sync_debug_mode("error")
        try:
            assert check_token_ids(ids, 50, "input_ids", sync_free=True).dtype == torch.long
        finally:
            torch.cuda.set_sync_debug_mode("default")
