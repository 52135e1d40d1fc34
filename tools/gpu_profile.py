"""Where the GPU time goes: torch.profiler over a compiled greedy decode and one training step (issue 13's
"profile of where the time goes" for any goal the benchmarks show unmet), printed as kernel tables.

    python tools/gpu_profile.py            # GPT-2 124M shape, random weights, bf16, on CUDA
    python tools/gpu_profile.py --quick    # a tiny GPT-2 on CPU: checks the script runs (make gpu-check DRY=1)

1. decode: generate(compile=True), batch 1, prompt 16, 64 new tokens, profiled on its third call (the first
   compiles and captures). Printed: wall ms per new token, device busy ms per new token (the sum of kernel
   times: wall >> busy means the CPU or launch gaps bound the step, not the GPU), and the top kernels; the
   prompt's prefill is in all three (one forward over 16 tokens, against 64 decode steps).
2. train: one step of train_step's shape (16x1024, bf16 autocast, fwd + bwd + fused AdamW), profiled after two
   warm-up steps; top kernels by device time, grouped as matmul / attention / other in one line.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from nanogpt2 import GPT2Config, GPT2LMHeadModel

QUICK = dict(vocab_size=512, n_positions=256, n_embd=64, n_layer=2, n_head=4)
PROMPT, NEW = 16, 64


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def profiled(fn, device: str):
    """(profiler, wall seconds) of one call of fn, the device drained before and after."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        fn()
        sync(device)
        wall = time.perf_counter() - t0
    return prof, wall


def device_us(event, cuda: bool) -> float:
    """An averaged event's own time on the device (CUDA) or the CPU, in microseconds, across torch versions."""
    if not cuda:
        return event.self_cpu_time_total
    for name in ("self_device_time_total", "self_cuda_time_total"):
        if hasattr(event, name):
            return getattr(event, name)
    return 0.0


ATTENTION_NAMES = ("flash", "attn", "attention", "_decode_", "fmha")
# cuBLAS/cuBLASLt GEMMs on Hopper ("nvjet_…", "sm90_xmma_gemm_…", "cutlass…"), our int8/int4 kernels
# ("…_gemv_…", "…_gemm_…"), inductor's mm templates ("triton_tem_fused_mm…", "…_addmm…")
MATMUL_NAMES = ("gemm", "gemv", "matmul", "nvjet", "cutlass", "xmma", "_mm_", "_mm", "addmm", "bmm")


def kind(name: str) -> str:
    """attention / matmul / other, by a kernel's name (a heuristic: the table lists the names themselves)."""
    n = name.lower()
    if any(k in n for k in ATTENTION_NAMES):
        return "attention"
    if any(k in n for k in MATMUL_NAMES):
        return "matmul"
    return "other"


def report(prof, title: str, cuda: bool, per: int, rows: int = 15) -> None:
    """Top `rows` kernels by own device time (per `per` units: tokens or steps), then totals by kind."""
    events = [e for e in prof.key_averages() if device_us(e, cuda) > 0]
    if cuda:   # kernels only: on CUDA the aten ops' own device time is their kernels', counted twice otherwise
        events = [e for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: -device_us(e, cuda))
    total = sum(device_us(e, cuda) for e in events)
    by_kind = {}
    for e in events:
        by_kind[kind(e.key)] = by_kind.get(kind(e.key), 0.0) + device_us(e, cuda)
    print(f"\n## {title}: {'device' if cuda else 'CPU'} time {total / per / 1e3:.3f} ms per unit; by kind: "
          + ", ".join(f"{k} {v / per / 1e3:.3f} ms ({v / max(total, 1e-9):.0%})" for k, v in
                      sorted(by_kind.items(), key=lambda kv: -kv[1])))
    print(f"{'ms/unit':>9} {'share':>6} {'calls/unit':>10}  kernel")
    for e in events[:rows]:
        us = device_us(e, cuda)
        print(f"{us / per / 1e3:>9.4f} {us / max(total, 1e-9):>6.1%} {e.count / per:>10.1f}  {e.key[:110]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny GPT-2 on CPU: checks the script runs")
    ap.add_argument("--shape", default="16x1024", help="training step BxT (default 16x1024)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.quick
    device = "cuda" if cuda else "cpu"
    cfg = GPT2Config(**QUICK) if args.quick else GPT2Config.preset("gpt2")
    cfg.resid_pdrop = cfg.embd_pdrop = cfg.attn_pdrop = 0.0   # as benchmarks/train_step.py: no dropout kernels
    B, T = (2, 64) if args.quick else map(int, args.shape.lower().split("x"))
    print(f"# {torch.cuda.get_device_name() if cuda else 'CPU'} | torch {torch.__version__} | "
          f"{'tiny' if args.quick else 'GPT-2 124M'} shape, random weights")

    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).to(device)
    ids = torch.randint(0, cfg.vocab_size, (1, PROMPT), device=device)
    decoder = model.to(torch.bfloat16) if cuda else model
    decode = lambda: decoder.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, compile=True)  # noqa: E731
    with torch.inference_mode():
        decode(), decode()   # compile, capture, and one replay
        prof, wall = profiled(decode, device)
    print(f"\n# decode: B=1, prompt {PROMPT}, {NEW} new tokens, compile=True: wall {wall / NEW * 1e3:.3f} ms per "
          f"token ({NEW / wall:.0f} tok/s), prefill included")
    report(prof, "decode (per new token)", cuda, NEW)

    model = model.float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    batch = torch.randint(0, cfg.vocab_size, (B, T), device=device)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cuda):
            loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(), step()
    prof, wall = profiled(step, device)
    print(f"\n# train: {B}x{T}, bf16 autocast, fwd + bwd + AdamW: wall {wall * 1e3:.1f} ms "
          f"({B * T / wall:.0f} tok/s)")
    report(prof, "training step (per step)", cuda, 1, rows=25)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
