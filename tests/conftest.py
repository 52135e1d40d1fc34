"""Shared test setup: Triton's CPU interpreter, a clean sys.path, and small Hugging Face checkpoints.

TRITON_INTERPRET=1 must be set before anything imports triton, so the kernels run on CPU (no GPU here).
"""
import os
import sys

# Run Triton kernels on CPU through Triton's interpreter unless told otherwise (TRITON_INTERPRET=0
# on a GPU machine compiles them for real). Triton reads this once, at import: set it first.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")          # tests never reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The repository root holds kernels/ (installed as nanogpt2.kernels); on sys.path it would pose as PyPI's
# unrelated `kernels` package, which transformers imports whenever it finds one.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402


def hf_quiet():
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


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
