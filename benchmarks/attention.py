"""Attention benchmark: nanogpt2's Triton kernels vs PyTorch SDPA (flash, memory-efficient) and eager.

    python benchmarks/attention.py                  # on a GPU: the full table (bf16)
    python benchmarks/attention.py --dtype fp16 --csv attention.csv
    python benchmarks/attention.py --quick          # tiny shapes; also runs on CPU (TRITON_INTERPRET=1)

Three sections, GPT-2 small's heads (nh=12, hs=64) throughout:
  forward         causal prefill, B·T = 16k tokens for T = 512 … 8k, plus nanoGPT's training shape
                  (B=12, T=1024). TFLOP/s = 2·B·nh·T²·hs / t (causal: half of 4·B·nh·T²·hs).
  forward+backward  the same shapes; FLOPs = 3.5× the forward's (the backward is 2.5×).
  decode          one new token per row against a full KV cache; GB/s = bytes of K and V read / t.
q, k, v are strided views of one (B, T, 3, nh, hs) tensor, as the model's c_attn produces them.
Every result is checked against fp32 SDPA before it is timed; a wrong one prints WRONG, not a speed.
"peak MiB" is memory allocated by one call beyond its inputs. "vs flash" = sdpa-flash ms / ms.
Two times per row: "ms" is the wall time per call of back-to-back eager calls, so a call whose host work
(checks, allocation, launches) outlasts its kernels is timed by its host work; "graph ms" (GPU only) is one
call's device time with the host taken out, from a CUDA graph of --repeats calls replayed, as the kernels run
inside a captured decode step. "graph vs" = sdpa-flash graph ms / graph ms: the kernels' own comparison.
TFLOP/s and GB/s are from graph ms where there is one (on a GPU, unless capture failed: the note says so), else
from ms.
"""

import argparse
import csv
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, fields

import torch


@dataclass
class Options:
    dtype: str = field(default="bf16", metadata={"help": "bf16 | fp16 | fp32"})
    csv: str = field(default="", metadata={"help": "also write every row to this CSV file"})
    quick: bool = field(default=False, metadata={
        "help": "tiny shapes; runs on CPU under TRITON_INTERPRET=1 (timings meaningless there)"})
    warmup: int = field(default=5, metadata={"help": "untimed calls before timing"})
    repeats: int = field(default=20, metadata={
        "help": "calls per batch (and per captured graph); on a GPU batches repeat until 20 ms have passed"})
    rounds: int = field(default=0, metadata={
        "help": "rounds over the implementations, alternating; the median (0: 3, or 1 with --quick)"})


def parse_options(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(Options):
        if f.type is bool or f.type == "bool":
            parser.add_argument(f"--{f.name}", action="store_true", help=f.metadata["help"])
        else:
            parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default,
                                help=f"{f.metadata['help']} (default: {f.default!r})")
    return Options(**vars(parser.parse_args(argv)))


OPTS = parse_options()
ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    if not OPTS.quick:
        sys.exit("benchmarks/attention.py needs a CUDA GPU; --quick runs tiny shapes on CPU")
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import triton  # noqa: E402
from nanogpt2.dtypes import dtype_from_name  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from nanogpt2.kernels import decode_attention, flash_attention  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
# relative error ||out − ref|| / ||ref|| allowed against fp32 SDPA, per input dtype
REL_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}
H, D = 12, 64  # GPT-2 small


# ---- the contenders ------------------------------------------------------------------------------


def eager_attention(q, k, v, causal=True):
    """softmax(q·kᵀ/√hs)·v, written out as nanoGPT does when flash attention is unavailable."""
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))  # (B, nh, Tq, Tk)
    if causal:
        Tq, Tk = att.shape[-2:]
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)
        att = att.masked_fill(~mask, float("-inf"))
    att = torch.softmax(att.float(), dim=-1).to(q.dtype)
    return att @ v


def sdpa(backend):
    def attention(q, k, v, causal=True):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return attention


PREFILL_IMPLS = {
    "nanogpt2": lambda q, k, v: flash_attention(q, k, v, causal=True),
    "sdpa-flash": sdpa(SDPBackend.FLASH_ATTENTION),
    "sdpa-mem-eff": sdpa(SDPBackend.EFFICIENT_ATTENTION),
    "eager": eager_attention,
}

DECODE_IMPLS = {  # q (B, nh, hs); caches (B, nh, S, hs), every position valid
    "nanogpt2": lambda q, kc, vc, lens: decode_attention(q, kc, vc, lens),
    "sdpa-flash": lambda q, kc, vc, lens: sdpa(SDPBackend.FLASH_ATTENTION)(q[:, :, None], kc, vc, False)[:, :, 0],
    "sdpa-mem-eff": lambda q, kc, vc, lens: sdpa(SDPBackend.EFFICIENT_ATTENTION)(q[:, :, None], kc, vc, False)[:, :, 0],
    "eager": lambda q, kc, vc, lens: eager_attention(q[:, :, None], kc, vc, False)[:, :, 0],
}


# ---- measuring -------------------------------------------------------------------------------------


def sync():
    if ON_GPU:
        torch.cuda.synchronize()


MIN_S = 0.02 if ON_GPU else 0.0   # a measurement runs at least this long: 20 calls of 0.1 ms are timer noise
MAX_CALLS = 5000


def time_ms(fn):
    """Mean wall time of one call in ms: batches of OPTS.repeats back-to-back calls (perf_counter around them,
    one sync per batch) until MIN_S has passed."""
    for _ in range(OPTS.warmup):
        fn()
    sync()
    calls, t0 = 0, time.perf_counter()
    while True:
        for _ in range(OPTS.repeats):
            fn()
        calls += OPTS.repeats
        sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= MIN_S or calls >= MAX_CALLS:
            return elapsed * 1e3 / calls


def graph_ms(fn):
    """Device time of one call (ms): OPTS.repeats calls captured in one CUDA graph, the graph replayed; None
    on CPU. Warmed up on a side stream first, as torch.cuda.graphs asks (allocator and autograd state)."""
    if not ON_GPU:
        return None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(OPTS.repeats):
            fn()
    graph.replay()
    sync()
    replays, t0 = 0, time.perf_counter()
    while True:
        graph.replay()
        replays += 1
        sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= MIN_S or replays * OPTS.repeats >= MAX_CALLS:
            break
    del graph
    return elapsed * 1e3 / (replays * OPTS.repeats)


def peak_mib(fn):
    """Memory one call allocates beyond what is already allocated (MiB); None on CPU."""
    if not ON_GPU:
        return None
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def fits_in_memory(nbytes):
    return not ON_GPU or nbytes < 0.7 * torch.cuda.mem_get_info()[0]


def measure_all(impls: dict) -> dict:
    """{name: (fn, check)} -> {name: (ms, graph ms, peak MiB, note)}. Each is checked first; those right are
    timed in OPTS.rounds rounds that alternate between them (so that clocks ramping up, or another process,
    cannot favour whichever runs first), the median kept. ms is None when the result is wrong or the
    implementation is unavailable for these inputs; graph ms None on CPU, or when capture failed (the note then
    says why: a nanogpt2 kernel that cannot be captured is a bug the table must show)."""
    results, ok = {}, {}
    for name, (fn, check) in impls.items():
        try:
            err = check()
        except torch.cuda.OutOfMemoryError:
            err = "OOM"
        except RuntimeError as e:  # e.g. an SDPA backend that refuses this dtype/device
            err = "unavailable: " + str(e).split("\n")[0][:50]
        if err is None:
            ok[name] = fn
        else:
            results[name] = (None, None, None, err)
    times = {name: [] for name in ok}
    graph_times = {name: [] for name in ok}
    notes = {name: "" for name in ok}
    for _ in range(OPTS.rounds or (1 if OPTS.quick else 3)):
        for name, fn in ok.items():
            if notes[name] == "OOM":
                continue
            try:
                times[name].append(time_ms(fn))
            except torch.cuda.OutOfMemoryError:
                notes[name] = "OOM"
                continue
            if ON_GPU and not notes[name]:
                try:
                    graph_times[name].append(graph_ms(fn))
                except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                    notes[name] = "graph capture failed: " + str(e).split("\n")[0][:60]
    for name, fn in ok.items():
        if notes[name] == "OOM":
            results[name] = (None, None, None, "OOM")
            continue
        graph = statistics.median(graph_times[name]) if graph_times[name] else None
        results[name] = (statistics.median(times[name]), graph, peak_mib(fn), notes[name])
    return {name: results[name] for name in impls}


# ---- sections ----------------------------------------------------------------------------------------


def prefill_shapes():
    if OPTS.quick:
        return [(2, 64), (1, 100)]
    return [(16384 // T, T) for T in (512, 1024, 2048, 4096, 8192)] + [(12, 1024)]


def decode_shapes():
    if OPTS.quick:
        return [(b, s) for b in (1, 4) for s in (16, 100)]
    return [(b, s) for b in (1, 8, 32) for s in (128, 1024, 4096)]


def bench_prefill(dtype, backward):
    rows = []
    heads = 2 if OPTS.quick else H
    for B, T in prefill_shapes():
        torch.manual_seed(0)
        qkv = torch.randn(B, T, 3, heads, D, device=DEVICE, dtype=dtype, requires_grad=backward)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, nh, T, hs) strided views
        dout = torch.randn(B, heads, T, D, device=DEVICE, dtype=dtype)
        # fp32 SDPA (whichever backend PyTorch picks) as the reference
        ref_qkv = qkv.detach().float().requires_grad_(backward)
        ref = F.scaled_dot_product_attention(*(ref_qkv[:, :, i].transpose(1, 2) for i in range(3)), is_causal=True)
        ref_grad = torch.autograd.grad(ref, ref_qkv, dout.float())[0] if backward else None
        del ref_qkv
        flops = 2 * B * heads * T * T * D * (3.5 if backward else 1.0)
        eager_bytes = B * heads * T * T * (3 * qkv.element_size() + 8) * (2 if backward else 1)

        impls, skipped = {}, {}
        for name, attn in PREFILL_IMPLS.items():
            if name == "eager" and not fits_in_memory(eager_bytes):
                skipped[name] = (None, None, None, f"skipped: needs ~{eager_bytes / 2**30:.0f} GiB for (T, T) scores")
                continue
            if backward:
                def fn(attn=attn):
                    return torch.autograd.grad(attn(q, k, v), qkv, dout)[0]

                def check(attn=attn):
                    out = attn(q, k, v)
                    grad = torch.autograd.grad(out, qkv, dout)[0]
                    e = max(rel_err(out, ref), rel_err(grad, ref_grad))
                    return None if e <= REL_TOL[dtype] else f"WRONG: rel err {e:.1e}"
            else:
                def fn(attn=attn):
                    with torch.no_grad():
                        return attn(q, k, v)

                def check(fn=fn):
                    e = rel_err(fn(), ref)
                    return None if e <= REL_TOL[dtype] else f"WRONG: rel err {e:.1e}"
            impls[name] = (fn, check)
        results = {**measure_all(impls), **skipped}
        results = {name: results[name] for name in PREFILL_IMPLS}   # the table's order
        rows += _rows("forward+backward" if backward else "forward", B, T, heads, results, flops=flops)
        del qkv, q, k, v, dout, ref, ref_grad
        if ON_GPU:
            torch.cuda.empty_cache()
    return rows


def bench_decode(dtype):
    rows = []
    heads = 2 if OPTS.quick else H
    for B, S in decode_shapes():
        torch.manual_seed(0)
        q = torch.randn(B, heads, D, device=DEVICE, dtype=dtype)
        k_cache = torch.randn(B, heads, S, D, device=DEVICE, dtype=dtype)
        v_cache = torch.randn(B, heads, S, D, device=DEVICE, dtype=dtype)
        lens = torch.full((B,), S, dtype=torch.int32, device=DEVICE)
        ref = F.scaled_dot_product_attention(q[:, :, None].float(), k_cache.float(), v_cache.float())[:, :, 0]
        nbytes = 2 * B * heads * S * D * k_cache.element_size()
        impls = {}
        for name, attn in DECODE_IMPLS.items():
            def fn(attn=attn):
                return attn(q, k_cache, v_cache, lens)

            def check(fn=fn):
                e = rel_err(fn(), ref)
                return None if e <= REL_TOL[dtype] else f"WRONG: rel err {e:.1e}"
            impls[name] = (fn, check)
        rows += _rows("decode", B, S, heads, measure_all(impls), nbytes=nbytes)
    return rows


def _rows(section, B, T, heads, results, flops=None, nbytes=None):
    """Table rows; the rates (TFLOP/s, GB/s) use the graph time where there is one (the kernels' own speed)."""
    flash_ms, flash_graph_ms = results.get("sdpa-flash", (None, None, None, None))[:2]   # (ms, graph ms, ...)
    rows = []
    for name, (ms, gms, mib, note) in results.items():
        t = gms or ms
        rows.append(dict(
            section=section, B=B, T=T, H=heads, D=D, impl=name, ms=ms, graph_ms=gms,
            tflops=flops / (t * 1e-3) / 1e12 if t and flops else None,
            gbps=nbytes / (t * 1e-3) / 1e9 if t and nbytes else None,
            peak_mib=mib, vs_flash=flash_ms / ms if ms and flash_ms else None,
            graph_vs_flash=flash_graph_ms / gms if gms and flash_graph_ms else None, note=note,
        ))
    return rows


# ---- output --------------------------------------------------------------------------------------------


def _fmt(value, width, digits):
    return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def print_table(rows, section, dtype_name):
    if section == "decode":
        print(f"\ndecode  {dtype_name}  nh={rows[0]['H']} hs={D}  one query per row, full cache  "
              f"(GB/s = 2·B·nh·S·hs·bytes / t; t = graph ms where measured)")
        print(f"{'B':>4} {'cache':>6}  {'impl':<13}{'ms':>9} {'graph ms':>9} {'GB/s':>8} {'peak MiB':>9} "
              f"{'vs flash':>9} {'graph vs':>9}  note")
    else:
        mult = "3.5·" if section == "forward+backward" else ""
        print(f"\nattention {section}  {dtype_name}  nh={rows[0]['H']} hs={D} causal  "
              f"(TFLOP/s = {mult}2·B·nh·T²·hs / t; t = graph ms where measured)")
        print(f"{'B':>4} {'T':>6}  {'impl':<13}{'ms':>9} {'graph ms':>9} {'TFLOP/s':>8} {'peak MiB':>9} "
              f"{'vs flash':>9} {'graph vs':>9}  note")
    for r in rows:
        rate = r["gbps"] if section == "decode" else r["tflops"]
        print(f"{r['B']:>4} {r['T']:>6}  {r['impl']:<13}{_fmt(r['ms'], 9, 3)} {_fmt(r['graph_ms'], 9, 3)} "
              f"{_fmt(rate, 8, 1)} {_fmt(r['peak_mib'], 9, 1)} {_fmt(r['vs_flash'], 9, 2)} "
              f"{_fmt(r['graph_vs_flash'], 9, 2)}  {r['note']}")


def warm_up_clocks(seconds=1.0):
    """Keep the GPU busy for a second before the first row: an idle GPU starts at low clocks, and the first
    rows would pay for the ramp. (On CPU: nothing.)"""
    if not ON_GPU:
        return
    a = torch.randn(4096, 4096, device=DEVICE, dtype=torch.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            a @ a
        sync()


def machine_line(dtype_name):
    if ON_GPU:
        where = torch.cuda.get_device_name()
    else:
        where = "CPU, Triton interpreter (TRITON_INTERPRET=1): timings are meaningless, only the checks count"
    return f"# {where} | torch {torch.__version__} | triton {triton.__version__} | {dtype_name}"


def main():
    dtype_name = OPTS.dtype
    if dtype_name not in ("bf16", "fp16", "fp32"):
        sys.exit(f"--dtype {dtype_name!r} not supported; valid: bf16, fp16, fp32")
    if not ON_GPU and dtype_name == "bf16":
        dtype_name = "fp32"  # the interpreter's bf16 tl.dot is wrong on CPU
    dtype = dtype_from_name(dtype_name)
    print(machine_line(dtype_name))
    warm_up_clocks()
    all_rows = []
    for section, run in (("forward", lambda: bench_prefill(dtype, backward=False)),
                         ("forward+backward", lambda: bench_prefill(dtype, backward=True)),
                         ("decode", lambda: bench_decode(dtype))):
        rows = run()
        print_table(rows, section, dtype_name)
        all_rows += [dict(r, dtype=dtype_name) for r in rows]
    if OPTS.csv:
        with open(OPTS.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(all_rows[0]))
            writer.writeheader()
            writer.writerows(all_rows)
        print(f"\nwrote {len(all_rows)} rows to {OPTS.csv}")
    wrong = [r for r in all_rows if r["note"].startswith("WRONG") and r["impl"] == "nanogpt2"]
    if wrong:
        sys.exit(f"{len(wrong)} nanogpt2 result(s) disagree with SDPA")


if __name__ == "__main__":
    main()
