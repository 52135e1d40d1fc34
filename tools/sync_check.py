"""Host syncs in the hot loops: one decode step and one training step under torch.cuda.set_sync_debug_mode.

    python tools/sync_check.py            # on CUDA: exit 1 if a step makes the CPU wait for the GPU

A host sync is the CPU reading a value off the GPU (`.item()`, `int(t)`, `bool(t)`, `nonzero()`, a print):
it waits for every queued kernel, so a step that syncs can never run ahead of the GPU, and a decode step
cannot be captured in a CUDA graph (issue 13, point 3). Each step runs once to warm up (kernels compile),
then again under set_sync_debug_mode("error"), where PyTorch raises at the first sync. For a step that
syncs, it runs once more under "warn" to list every sync, each by the nanogpt2 line that caused it.

The steps are the ones the library runs, on a small GPT-2 (2 layers, head dim 64, the Triton backend):
  decode step     generation.decode_one_token over a filled KV cache, B=2, unpadded and left-padded
  training step   train.train_step of a real run (bundled tinyshakespeare, bf16 autocast where CUDA has it):
                  batch to device, forward, loss, backward, grad clip, fused AdamW, lr schedule
Without CUDA the same steps run without the debug mode (it needs CUDA): that checks only that they run.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import traceback
import warnings
from contextlib import contextmanager

import torch

import nanogpt2
from nanogpt2 import generation, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(os.path.dirname(nanogpt2.__file__), "assets", "data", "tinyshakespeare.txt")
SMALL = dict(n_layer=2, n_head=2, n_embd=128, vocab_size=50257)   # head dim 64: the kernels' main shape
B, T_PROMPT, BLOCK = 2, 12, 64


@contextmanager
def sync_debug(mode: str):
    """torch.cuda.set_sync_debug_mode(mode) for the block, back to "default" after."""
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def where(stack: list[traceback.FrameSummary]) -> str:
    """The innermost frame in this repository (or the innermost frame at all), as 'path:line  code'."""
    ours = [f for f in stack if f.filename.startswith(REPO) and not f.filename.endswith("sync_check.py")]
    frame = (ours or stack)[-1]
    return f"{os.path.relpath(frame.filename, REPO)}:{frame.lineno}  {frame.line}"


def sync_sites(step) -> list[str]:
    """Every host sync in one call of `step`, under set_sync_debug_mode("warn"): the line that caused each."""
    sites = []

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            sites.append(where(traceback.extract_stack()[:-1]))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        with sync_debug("warn"):
            step()
    return list(dict.fromkeys(sites))   # each line once, in order of first sync


def check(name: str, step) -> bool:
    """Run `step` warm, then under the sync debug mode; print the verdict. True if no host sync (or no CUDA)."""
    step()   # warm-up: kernels compile, caches allocate (first calls may sync legitimately)
    if not torch.cuda.is_available():
        step()
        print(f"{name:<40} ran (no CUDA: not checked for host syncs)")
        return True
    try:
        with sync_debug("error"):
            step()
        torch.cuda.synchronize()
    except RuntimeError as e:
        if "synchroniz" not in str(e):
            raise
        first = where(traceback.extract_tb(e.__traceback__))
        try:
            sites = sync_sites(step) or [first]
        except Exception as again:   # the step may not run again from where the first sync stopped it
            sites = [first, f"(listing the others failed: {type(again).__name__}: {again})"]
        print(f"{name:<40} HOST SYNC ({len(sites)} site{'s' * (len(sites) != 1)}):")
        for site in sites:
            print(f"    {site}")
        return False
    print(f"{name:<40} no host sync")
    return True


def checked(name: str, step) -> bool:
    """check(), with a step that fails for another reason reported (and the next step still checked)."""
    try:
        return check(name, step)
    except Exception:
        print(f"{name:<40} ERROR:\n{traceback.format_exc()}")
        return False


def make_run(workdir: str) -> train.Run:
    """A real training run's state (model, data, optimizer, schedule) on the default device."""
    cfg = train.TrainConfig(data=SHAKESPEARE, cache_dir=workdir, out_dir=os.path.join(workdir, "out"),
                            batch_size=B, block_size=BLOCK, max_steps=10, warmup_steps=2, **SMALL)
    return train.setup(cfg)


def decode_steps(model) -> dict:
    """{name: step}: one decode step each, over a cache filled by the prompt (unpadded, left-padded)."""
    device = model.lm_head.weight.device
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (B, T_PROMPT), generator=g).to(device)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0   # row 1: five positions of left padding
    kv_start = (T_PROMPT - mask.sum(-1)).to(torch.int32)
    steps = {}
    for label, prompt_mask in (("unpadded", None), ("left-padded", mask)):
        cache = generation.new_cache(model, B, T_PROMPT + 8)
        with torch.inference_mode():
            token = generation.prefill(model, ids, prompt_mask, cache).argmax(-1)   # (B,)
        starts = None if prompt_mask is None else kv_start

        def step(cache=cache, token=token, prompt_mask=prompt_mask, starts=starts):
            with torch.inference_mode():   # the same token again: check() calls a step at most 3 times
                step_mask = None if prompt_mask is None else \
                    torch.nn.functional.pad(prompt_mask, (0, cache.length + 1 - T_PROMPT), value=1)
                generation.decode_one_token(model, token, step_mask, cache, starts)
        steps[f"decode step (B={B}, {label})"] = step
    return steps


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    cuda = torch.cuda.is_available()
    machine = f"GPU {torch.cuda.get_device_name()}" if cuda else "CPU (no CUDA: the steps run, unchecked)"
    print(f"# {machine} | torch {torch.__version__} | TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}")
    with tempfile.TemporaryDirectory() as workdir:
        run = make_run(workdir)
        print(f"# {train.describe(run)}")
        model = copy.deepcopy(run.model).eval()
        if cuda:
            model = model.to(torch.bfloat16)   # decoding runs the weights in bf16 on a GPU
        steps = {**decode_steps(model), f"training step (B={B}, T={BLOCK})": lambda: train.train_step(run)}
        ok = [checked(name, step) for name, step in steps.items()]
    if not all(ok):
        print(f"{ok.count(False)} of {len(ok)} steps sync the host or fail")
    else:
        print("no host syncs" if cuda else "every step ran (host syncs not checked: no CUDA)")
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
