"""Training step throughput: forward + backward + AdamW step, nanogpt2 vs transformers, same weights and data;
with --fsdp, per-rank peak memory and tokens/s of DDP vs FSDP vs FSDP + CPU offload over several processes.

    python benchmarks/train_step.py [--quick] [--csv out.csv] [--device cuda --dtype bfloat16]
    python benchmarks/train_step.py --autocast bfloat16 --shapes 16x1024   # fp32 weights, bf16 autocast
    python benchmarks/train_step.py --fsdp [--nproc 2] [--preset gpt2-medium] [--shapes 1x128] [--repeats 3]

Reports median ms per step, tokens/s, the ratio of tokens/s (nanogpt2 / transformers, > 1 means we are
faster) and, on a GPU, model FLOPs utilisation: 6 * params * tokens + attention (12 * L * T * C per token,
PaLM appendix B) against the device's peak dense bf16 FLOP/s. The first step's losses are compared
(a speed figure for a wrong model is never printed). --dtype is the weights' dtype (AdamW updates them in it);
--autocast runs both models' forward under torch.autocast, as training does (tools/train.py's bf16 default on
a GPU), with the weights in --dtype.

--fsdp: the same fp32 training step (AdamW, fp32 weights and state, gradient clipping) in --nproc processes
(gloo on CPU, NCCL on GPUs: one per process), the model wrapped as tools/train.py wraps it
(nanogpt2.distributed.data_parallel, or shard_model for --fsdp / --fsdp-offload), one mode at a time, each in
fresh processes. Per rank: peak resident memory over the whole run (VmHWM: model build, sharding, steps; the max
over ranks is shown), and on a GPU the peak allocated GPU memory, which is what CPU offload lowers (on a CPU-only
machine "offloaded" shards live in the same RAM, so RSS cannot drop). tok/s counts all ranks' tokens
(B x T x nproc per step); CPU s/step is the busiest rank's own CPU time per step, a figure other jobs on a shared
machine disturb less than wall time. Default: the gpt2-medium shape (355M parameters), B x T = 1 x 128 per rank on CPU.
RSS also counts memory glibc keeps after torch frees it: its mmap threshold rises to the size of each freed
block (up to 32 MiB), after which blocks that size come from the heap and often stay there. FSDP frees
block-sized buffers all the time (every gather and reduce-scatter), so this retention weighs more on it;
--malloc-mmap-threshold 131072 fixes the threshold (mallopt) so RSS tracks live tensors instead.
"""
import argparse
import ctypes
import dataclasses
import multiprocessing
import os
import socket
import statistics
import sys
import time
from contextlib import nullcontext
from queue import Empty

import torch

from common import QUICK_CONFIG, Table, base_parser, machine_line, model_pair, paired, sync
from nanogpt2 import GPT2Config, GPT2LMHeadModel
from nanogpt2.distributed import data_parallel, gather_objects, init_distributed, shard_model
from nanogpt2.dtypes import FLAG_CHOICES, dtype_from_name
from nanogpt2.loss import lm_loss
from nanogpt2.optim import build_optimizer

# dense bf16 peak by device-name substring, first match wins (so "H100 PCIe" before "H100", the SXM part)
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0,
                    "4090": 165.0}
# (B, T) rows when --shapes is not given
DEFAULT_SHAPES = {"quick": [(2, 32)], "cpu": [(4, 256), (1, 1024)], "gpu": [(12, 1024), (8, 1024)]}


def peak_flops():
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tf in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tf * 1e12
    return None


def shape(text: str) -> tuple[int, int]:
    """'16x1024' -> (16, 1024): batch size x sequence length."""
    try:
        B, T = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not BxT, e.g. 16x1024") from None
    return B, T


def main():
    p = base_parser(__doc__)
    p.add_argument("--shapes", type=shape, nargs="+", default=None,
                   help="BxT per row (default " + "; ".join(f"{k}: " + " ".join(f"{b}x{t}" for b, t in v)
                                                           for k, v in DEFAULT_SHAPES.items()) + ")")
    p.add_argument("--autocast", default=None, choices=FLAG_CHOICES,
                   help="run the forward under torch.autocast to this dtype (default: none)")
    p.add_argument("--fsdp", action="store_true",
                   help="instead: DDP vs FSDP vs FSDP + CPU offload, per-rank peak memory and tok/s (see above)")
    p.add_argument("--nproc", type=int, default=2, help="--fsdp: processes (ranks) per mode")
    p.add_argument("--threads", type=int, default=1, help="--fsdp: torch threads per process on CPU")
    p.add_argument("--malloc-mmap-threshold", type=int, default=None,
                   help="--fsdp: fix glibc's mmap threshold to this many bytes in each rank (default: glibc's own)")
    p.set_defaults(preset=None)  # gpt2, or gpt2-medium with --fsdp
    args = p.parse_args()
    args.preset = args.preset or ("gpt2-medium" if args.fsdp else "gpt2")
    if args.fsdp:
        return fsdp_main(args)
    repeats = args.repeats or (2 if args.quick else 4)
    shapes = args.shapes or DEFAULT_SHAPES["quick" if args.quick else "cpu" if args.device == "cpu" else "gpu"]
    autocast = (lambda: torch.autocast(torch.device(args.device).type, dtype=dtype_from_name(args.autocast))) \
        if args.autocast else nullcontext
    print(machine_line())
    ours, hf = model_pair(args, hf_attn="sdpa")
    for m in (ours, hf):
        m.train()
        for mod in m.modules():  # dropout off: identical computations to compare losses
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
    ours.transformer.h[0].attn.attn_pdrop = 0.0
    for blk in ours.transformer.h:
        blk.attn.attn_pdrop = 0.0
    opt = {"ours": torch.optim.AdamW(ours.parameters(), lr=1e-4), "hf": torch.optim.AdamW(hf.parameters(), lr=1e-4)}
    n_params = ours.num_parameters()
    cfg = ours.config
    peak = peak_flops()
    print(f"# training step (fwd + bwd + AdamW), {args.dtype} weights"
          + (f", {args.autocast} autocast" if args.autocast else "") + f", {n_params / 1e6:.1f}M parameters")
    table = Table([("B", 4), ("T", 6), ("nanogpt2 ms", 13), ("hf ms", 10), ("ours tok/s", 12), ("hf tok/s", 10),
                   ("ratio", 8), ("MFU", 7), ("|dloss|", 10)])
    for B, T in shapes:
        ids = torch.randint(0, cfg.vocab_size, (B, T), device=args.device)

        def step(name, model):
            def run():
                with autocast():
                    loss = model(ids, labels=ids).loss
                loss.backward()
                opt[name].step()
                opt[name].zero_grad(set_to_none=True)
                return loss
            return run

        la, lb = step("ours", ours)(), step("hf", hf)()
        dloss = abs(la.item() - lb.item())
        if dloss > (1e-3 if args.dtype == "float32" and not args.autocast else 5e-2):
            raise SystemExit(f"losses differ by {dloss:.3g} at B={B} T={T}: refusing to time a wrong result")
        t = paired({"ours": step("ours", ours), "hf": step("hf", hf)}, repeats)
        tokens = B * T
        flops = 6 * n_params * tokens + 12 * cfg.n_layer * T * cfg.n_embd * tokens
        mfu = f"{flops / t['ours'] / peak:.1%}" if peak else "-"
        table.add(B, T, t["ours"] * 1e3, t["hf"] * 1e3, tokens / t["ours"], tokens / t["hf"], t["hf"] / t["ours"],
                  mfu, dloss)
    table.write_csv(args.csv)


# ---- --fsdp: DDP vs FSDP vs FSDP + offload, one set of fresh processes per mode -------------------------------

MODES = ("ddp", "fsdp", "fsdp+offload")
RANK_TIMEOUT_S = 3600   # one mode's processes, start to figures
# (B, T) per rank when --shapes is not given: small T on CPU keeps activations from hiding the sharded state
FSDP_SHAPES = {"quick": (1, 32), "cpu": (1, 128), "gpu": (8, 1024)}


def status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in KiB: VmRSS (now), VmHWM (peak so far)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


def fsdp_worker(rank: int, world: int, port: int, mode: str, config: dict, shape: tuple, steps: int, device: str,
                threads: int, mmap_threshold, queue) -> None:
    """One rank of one mode: build the model (seeded: every rank the same), wrap it, time `steps` training steps
    after one warm-up step, and send (VmRSS after setup, VmHWM, GPU peak, step seconds) to rank 0, which queues
    every rank's figures."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(threads)
    if mmap_threshold is not None:  # M_MMAP_THRESHOLD = -3; a fixed value also stops glibc raising it
        if ctypes.CDLL("libc.so.6").mallopt(-3, mmap_threshold) != 1:
            raise SystemExit(f"mallopt(M_MMAP_THRESHOLD, {mmap_threshold}) failed")
    dist, dev = init_distributed(device, need_group=True)  # --nproc 1 too: fully_shard and barrier need a group
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**config)).train()
    offload = mode == "fsdp+offload"
    if mode == "ddp":
        net = data_parallel(model.to(dev), dist, dev)
    else:
        net = shard_model(model, dev, offload=offload)
    optimizer = build_optimizer(model, 1e-4, (0.9, 0.95), 0.1, torch.device("cpu") if offload else dev)
    rss_setup = status_kib("VmRSS")
    B, T = shape
    gen = torch.Generator().manual_seed(rank)
    x = torch.randint(0, config["vocab_size"], (B, T), generator=gen).to(dev)
    y = torch.roll(x, -1, dims=1)
    times, cpu_times = [], []
    for _ in range(1 + steps):  # tools/train.py's step with one micro-batch (nanogpt2.train.train_step)
        t0, c0 = time.perf_counter(), time.process_time()
        lm_loss(net, x, y, None).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        cpu_times.append(time.process_time() - c0)  # this rank's own work, whatever else the machine runs
        torch.distributed.barrier()  # the step ends when the slowest rank's does
        times.append(time.perf_counter() - t0)
    gpu_peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
    figures = gather_objects((rss_setup, status_kib("VmHWM"), gpu_peak, times[1:], cpu_times[1:]), dist)
    if dist.master:
        queue.put(figures)
    torch.distributed.destroy_process_group()


def run_mode(mode: str, args, config: dict, shape: tuple, steps: int) -> list:
    """Every rank's figures for `mode`, from --nproc fresh processes (forked on CPU: no second torch import;
    spawned on CUDA, which a forked child cannot use)."""
    ctx = multiprocessing.get_context("spawn" if args.device.startswith("cuda") else "fork")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=fsdp_worker, args=(r, args.nproc, port, mode, config, shape, steps, args.device,
                                                   args.threads, args.malloc_mmap_threshold, queue))
             for r in range(args.nproc)]
    for p in procs:
        p.start()
    figures, waited = None, 0.0
    while figures is None and waited < RANK_TIMEOUT_S:   # poll, so a rank that dies is noticed at once
        try:
            figures = queue.get(timeout=1.0)
        except Empty:
            waited += 1.0
            if any(p.exitcode not in (None, 0) for p in procs):
                break
    timed_out = figures is None and waited >= RANK_TIMEOUT_S
    stuck = []   # ranks still alive 60 s after every rank's figures were gathered: a hang in teardown, not a result
    for rank, p in enumerate(procs):
        if figures is None and p.is_alive():
            p.terminate()      # a rank died or time ran out: the others would wait for it in a collective
        p.join(timeout=60)
        if p.is_alive():
            p.terminate()
            p.join()
            if figures is not None:
                stuck.append(rank)
    if stuck:   # seen once under a loaded test suite (rank 1, after the gather): said, not hidden
        print(f"# --fsdp mode {mode}: rank(s) {stuck} had not exited 60 s after the figures were gathered (a hang "
              "in process-group teardown); stopped them. The figures are complete.", file=sys.stderr, flush=True)
    codes = [p.exitcode for rank, p in enumerate(procs) if rank not in stuck]
    if figures is None or any(c != 0 for c in codes):
        why = (f"no figures from rank 0 within {RANK_TIMEOUT_S} s" if timed_out
               else "the failing rank's traceback is printed above")
        raise SystemExit(f"--fsdp mode {mode}: a rank failed (exit codes {codes}; -N: killed by signal N, -9 often "
                         f"out of memory, -15 stopped by this script): {why}")
    return figures


def fsdp_main(args):
    if args.nproc < 1:
        raise SystemExit(f"--nproc must be >= 1, got {args.nproc}")
    if args.shapes and len(args.shapes) != 1:
        raise SystemExit(f"--fsdp takes one --shapes BxT (per rank), got {len(args.shapes)}")
    if args.dtype != "float32" or args.autocast:
        raise SystemExit("--fsdp measures the fp32 step (AdamW in fp32): leave --dtype and --autocast out")
    B, T = args.shapes[0] if args.shapes else FSDP_SHAPES["quick" if args.quick else
                                                          "gpu" if args.device.startswith("cuda") else "cpu"]
    shape_cfg = GPT2Config(**QUICK_CONFIG) if args.quick else GPT2Config.preset(args.preset)
    config = {f.name: getattr(shape_cfg, f.name) for f in dataclasses.fields(GPT2Config) if f.name != "extra"}
    if T > config["n_positions"]:
        raise SystemExit(f"T = {T} exceeds the model's n_positions {config['n_positions']}")
    config.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    steps = args.repeats or (2 if args.quick else 3)
    with torch.device("meta"):
        n_params = GPT2LMHeadModel(GPT2Config(**config)).num_parameters()
    # weights, gradients, AdamW's two moments, DDP's gradient buckets: 20 bytes per parameter on every rank
    need = args.nproc * 20 * n_params / 2**30 + 2
    if args.device == "cpu" and mem_available_gib() < need:
        raise SystemExit(f"DDP of {n_params / 1e6:.0f}M parameters on {args.nproc} ranks needs about {need:.0f} GiB "
                         f"of RAM, {mem_available_gib():.1f} GiB is available: use a smaller --preset")
    print(machine_line())
    print(f"# DDP vs FSDP: {args.preset if not args.quick else 'tiny'} shape, {n_params / 1e6:.1f}M parameters, "
          f"fp32 AdamW, {args.nproc} ranks x {args.threads} thread(s), B x T = {B} x {T} per rank, "
          f"median of {steps} steps after 1 warm-up; glibc mmap threshold "
          + (f"fixed at {args.malloc_mmap_threshold} bytes" if args.malloc_mmap_threshold else "glibc's default"))
    gpu = args.device.startswith("cuda")
    table = Table([("mode", 14), ("peak RSS MiB", 14), ("x DDP", 7), ("setup MiB", 11)]
                  + ([("GPU peak MiB", 14), ("x DDP", 7)] if gpu else [])
                  + [("ms/step", 10), ("tok/s", 9), ("x DDP", 7), ("CPU s/step", 12), ("x DDP", 7)])
    base = None
    for mode in MODES:
        figures = run_mode(mode, args, config, (B, T), steps)
        setup_kib = max(f[0] for f in figures)
        peak_kib = max(f[1] for f in figures)
        gpu_peak = max(f[2] for f in figures)
        step_s = statistics.median(max(f[3][i] for f in figures) for i in range(steps))
        cpu_s = statistics.median(max(f[4][i] for f in figures) for i in range(steps))
        tok_s = B * T * args.nproc / step_s
        base = base or (peak_kib, gpu_peak, tok_s, cpu_s)
        table.add(mode, peak_kib / 1024, peak_kib / base[0], setup_kib / 1024,
                  *([gpu_peak / 2**20, gpu_peak / base[1]] if gpu else []), step_s * 1e3, tok_s, tok_s / base[2],
                  cpu_s, cpu_s / base[3])
    table.write_csv(args.csv)


if __name__ == "__main__":
    main()
