"""Shared test setup: where the Triton kernels run, the `gpu` marker, and small Hugging Face checkpoints.

Without CUDA, TRITON_INTERPRET=1 (set before anything imports triton) runs the kernels on CPU through
Triton's interpreter. With CUDA they compile for real, as `make gpu-check` needs (TRITON_INTERPRET=1 in the
environment still forces the interpreter).

A test that only means something on a CUDA device (compiled kernels, CUDA graphs, host-sync checks) is
marked `@pytest.mark.gpu`: without CUDA it is skipped, and `make gpu-check` runs every test so marked
(`pytest -m gpu`). `@pytest.mark.cuda_graphs` is a kind of gpu test and counts as marked `gpu`.
"""
import os

import torch  # importing torch does not import triton, so the choice below still takes effect

# Triton reads TRITON_INTERPRET once, at import: decide it first.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")          # tests never reach the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

GPU_MARKERS = {
    "gpu": "needs a CUDA device (skipped without one); `make gpu-check` runs every test so marked",
    "cuda_graphs": "captures or replays a CUDA graph (implies gpu)",
}


def pytest_configure(config):
    for name, doc in GPU_MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")


@pytest.hookimpl(tryfirst=True)   # before `-m` deselects: a cuda_graphs test must already carry gpu
def pytest_collection_modifyitems(config, items):
    """cuda_graphs implies gpu (so `-m gpu` selects both); without CUDA every gpu test is skipped."""
    no_cuda = pytest.mark.skip(reason="needs a CUDA device (make gpu-check runs it)")
    for item in items:
        if item.get_closest_marker("cuda_graphs") and not item.get_closest_marker("gpu"):
            item.add_marker(pytest.mark.gpu)
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():
            item.add_marker(no_cuda)


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
