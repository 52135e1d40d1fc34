"""The whole model on attn_implementation="triton" (the fused kernels) equals "sdpa": logits, every
parameter's gradient, and generated tokens, with and without left padding.

The models live on CUDA where there is one (the kernels compiled; `make gpu-check` runs this file there), else
on CPU with the kernels under TRITON_INTERPRET=1 (tests/conftest.py).

GPT-2's numerics flags map onto the kernels: scale_attn_weights / scale_attn_by_inverse_layer_idx become
sm_scale, and reorder_and_upcast_attn needs nothing (the kernels accumulate q·k and softmax in fp32 always).
"""
import os
import sys

import pytest
import torch

from helpers_generation import left_padded
from nanogpt2 import GPT2Config, GPT2LMHeadModel
from nanogpt2.attention import _kernels

pytestmark = pytest.mark.skipif(_kernels() is None, reason="the triton package is not installed here")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

TINY = dict(vocab_size=101, n_positions=48, n_embd=32, n_layer=2, n_head=2, initializer_range=0.5,
            attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)   # head_dim 16; no dropout: comparable gradients


def pair(**config):
    torch.manual_seed(0)
    sdpa = GPT2LMHeadModel(GPT2Config(**{**TINY, **config}))
    triton = GPT2LMHeadModel(GPT2Config(**{**TINY, **config}))
    triton.load_state_dict(sdpa.state_dict())
    sdpa.set_attn_implementation("sdpa")
    triton.set_attn_implementation("triton")
    return sdpa.to(DEVICE), triton.to(DEVICE)


def eager_copy(model):
    eager = GPT2LMHeadModel(model.config)
    eager.load_state_dict(model.state_dict())
    eager.set_attn_implementation("eager")
    return eager.to(DEVICE)


def on_device(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


FLAGS = {
    "default": {},
    "inverse-layer-idx": dict(scale_attn_by_inverse_layer_idx=True),
    "unscaled": dict(scale_attn_weights=False, initializer_range=0.1),
    "reorder-upcast": dict(reorder_and_upcast_attn=True),
}


@pytest.mark.parametrize("flags", sorted(FLAGS))
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_logits_and_gradients_match_sdpa(flags, padded):
    sdpa, triton = pair(**FLAGS[flags])
    ids, mask = on_device(*left_padded(101, B=3, T=11, pads=(0, 4, 9)))
    if not padded:
        mask = None
    labels = ids.clone()
    if mask is not None:   # no loss where the predicting position is padding (its output is undefined)
        labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    outs = [m(ids, attention_mask=mask, labels=labels) for m in (sdpa, triton)]
    # padding positions too: a padding query attends to nothing on every backend (AttentionMask)
    torch.testing.assert_close(outs[1].logits, outs[0].logits, atol=2e-5, rtol=1e-4)
    for out in outs:
        out.loss.backward()
    for (name, p), q in zip(sdpa.named_parameters(), triton.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=2e-5, rtol=1e-4, msg=name)


def test_reorder_and_upcast_equals_the_eager_upcast_path():
    """transformers' reorder_and_upcast_attn = fp32 scores and softmax: the eager path does it by hand, the
    kernels by construction. In fp16 both must stay close to an fp32 reference, and to each other."""
    sdpa, triton = pair(reorder_and_upcast_attn=True)
    eager = eager_copy(sdpa)
    ids = torch.randint(0, 101, (2, 13), device=DEVICE)
    ref = sdpa(ids).logits
    for m in (eager, triton):
        torch.testing.assert_close(m(ids).logits, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kw", [dict(), dict(num_beams=3)], ids=["greedy", "beam"])
def test_generation_gives_the_same_tokens(kw):
    sdpa, triton = pair()
    ids, mask = on_device(*left_padded(101, B=2, T=6, pads=(0, 3)))
    want = sdpa.generate(ids, attention_mask=mask, max_new_tokens=8, **kw)
    got = triton.generate(ids, attention_mask=mask, max_new_tokens=8, **kw)
    assert torch.equal(got, want)
    want = sdpa.generate(ids[:1], max_new_tokens=8, **kw)
    assert torch.equal(triton.generate(ids[:1], max_new_tokens=8, **kw), want)


def test_output_attentions_work_on_the_triton_backend():
    sdpa, triton = pair()
    ids = torch.randint(0, 101, (1, 9), device=DEVICE)
    a = sdpa(ids, output_attentions=True).attentions
    b = triton(ids, output_attentions=True).attentions
    for x, y in zip(a, b):
        torch.testing.assert_close(y, x, atol=1e-6, rtol=1e-5)


def test_padding_positions_agree_on_every_backend():
    """Hidden states at padding positions are the same whichever backend ran (a padding query's attention output
    is zero everywhere), and a padding query's attention probabilities are a row of zeros."""
    sdpa, triton = pair()
    eager = eager_copy(sdpa)
    ids, mask = on_device(*left_padded(101, B=3, T=11, pads=(0, 4, 9)))
    outs = [m(ids, attention_mask=mask, output_hidden_states=True) for m in (sdpa, eager, triton)]
    for out in outs[1:]:
        for i, (x, y) in enumerate(zip(out.hidden_states, outs[0].hidden_states)):
            torch.testing.assert_close(x, y, atol=2e-5, rtol=1e-4, msg=lambda m: f"hidden_states[{i}]: {m}")
    probs = eager(ids, attention_mask=mask, output_attentions=True).attentions[0]   # (B, H, T, S)
    assert probs[1, :, :4].abs().sum() == 0 and probs[2, :, :9].abs().sum() == 0
    torch.testing.assert_close(probs[1, :, 4:].sum(-1), torch.ones(2, 7, device=DEVICE))   # real queries: distributions


def compiled_variants(kernel) -> int:
    """How many compiled binaries a @triton.jit function holds, over all devices (its in-memory cache)."""
    return sum(len(cache[0]) for cache in kernel.device_caches.values())


@pytest.mark.gpu
def test_the_kernels_really_compile_on_cuda():
    """On CUDA the triton backend runs compiled kernels, not the interpreter: after a forward, a backward and a
    few decode steps, the kernel modules hold compiled binaries for at least a flash forward, a flash
    backward and a decode kernel."""
    from triton.runtime.jit import JITFunction   # here: triton is not installed everywhere (see pytestmark)
    assert os.environ.get("TRITON_INTERPRET") != "1", "TRITON_INTERPRET=1 on a CUDA machine: nothing compiles"
    sdpa, triton = pair()
    ids = torch.randint(0, 101, (2, 13), device=DEVICE)
    triton(ids, labels=ids).loss.backward()
    triton.generate(ids, max_new_tokens=3)
    counts = {f"{module_name}.{name}": compiled_variants(fn)
              for module_name, module in list(sys.modules.items()) if module_name.startswith("nanogpt2.kernels")
              for name, fn in vars(module).items() if isinstance(fn, JITFunction)}
    compiled = sorted(name for name, n in counts.items() if n)
    assert len(compiled) >= 3, f"compiled {compiled}, of {counts}"
