"""Shared test setup: Triton's CPU interpreter and small Hugging Face checkpoints.

TRITON_INTERPRET=1 must be set before anything imports triton, so the kernels run on CPU (no GPU here).
"""
import os

# Run Triton kernels on CPU through Triton's interpreter unless told otherwise (TRITON_INTERPRET=0
# on a GPU machine compiles them for real). Triton reads this once, at import: set it first.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")          # tests never reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


from nanogpt2.reference import hf_quiet  # noqa: E402


def make_hf_model(seed=0, **config_kwargs):
    """A random transformers.GPT2LMHeadModel (eval mode); config_kwargs override a tiny default config."""
    transformers = hf_quiet()
    kwargs = dict(vocab_size=101, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    kwargs.update(config_kwargs)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs)).eval()


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: save a random transformers GPT-2 to a fresh directory; returns (directory, hf_model)."""
    counter = [0]

    def factory(seed=0, **config_kwargs):
        counter[0] += 1
        model = make_hf_model(seed, **config_kwargs)
        directory = tmp_path / f"hf-{counter[0]}"
        model.save_pretrained(directory)
        return str(directory), model

    return factory
