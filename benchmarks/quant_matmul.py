"""Weight-only quantized matmul: nanogpt2's int8/int4 Triton kernels vs a bf16 F.linear (cuBLAS), GPT-2's shapes.

    python benchmarks/quant_matmul.py                 # on a GPU: the full tables (x in bf16)
    python benchmarks/quant_matmul.py --dtype fp16 --group-size 128 --csv quant.csv
    python benchmarks/quant_matmul.py --quick         # tiny shapes; also runs on CPU (TRITON_INTERPRET=1)

Three sections:
  decode      M = 1 row of x: y = x·Wᵀ for each linear layer of GPT-2 small (768 → 2304 c_attn, 768 → 768 attn
              c_proj, 768 → 3072 c_fc, 3072 → 768 mlp c_proj, 768 → 50257 lm_head) and gpt2-xl (1600 wide).
              Memory-bound: "GB/s" = bytes of weight read (integers + scales + zeros) / t, and "x read" compares
              it with the streaming read bandwidth measured in the same run (torch.sum over a 1 GiB buffer): 1.0
              is a kernel reading its weights as fast as the GPU reads anything.
  prefill     M = 512 rows: the same shapes; TFLOP/s = 2·M·N·K / t.
  crossover   M = 1…32 with the GEMV and the GEMM forced, int8 and int4: where kernel=None should switch
              (quant_matmul.GEMV_MAX_M).
"µs" is the GPU time of one call with a cold L2 (triton.testing.do_bench: it clears the cache between calls
and reports the median), as in a decode step whose other layers have evicted this one's weights. "call µs"
is the wall time per call of back-to-back eager calls: launch overhead included, what an eager decode loop
without CUDA graphs pays. "vs bf16" = bf16 F.linear µs / µs (> 1: faster). Every result is checked against
an fp32 reference (x·dequantized Wᵀ) before it is timed; a wrong one prints WRONG, not a speed.
"""

import argparse
import csv
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, fields

import torch


@dataclass
class Options:
    dtype: str = field(default="bf16", metadata={"help": "x's dtype: bf16 | fp16 | fp32"})
    group_size: int = field(default=64, metadata={"help": "int4 group size: 32 | 64 | 128 (128 skips gpt2-xl)"})
    csv: str = field(default="", metadata={"help": "also write every row to this CSV file"})
    quick: bool = field(default=False, metadata={
        "help": "tiny shapes; runs on CPU under TRITON_INTERPRET=1 (timings meaningless there)"})
    warmup: int = field(default=5, metadata={"help": "untimed calls before timing"})
    repeats: int = field(default=20, metadata={"help": "timed calls per measurement"})
    compile_jobs: int = field(default=-1, metadata={
        "help": "processes compiling the kernels in parallel before timing (-1: one per shape, at most the "
                "CPU count; 0: compile as they run)"})


def parse_options(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(Options):
        if f.type is bool or f.type == "bool":
            parser.add_argument(f"--{f.name.replace('_', '-')}", action="store_true", help=f.metadata["help"])
        else:
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                                help=f"{f.metadata['help']} (default: {f.default!r})")
    return Options(**vars(parser.parse_args(argv)))


OPTS = parse_options()
ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    if not OPTS.quick:
        sys.exit("benchmarks/quant_matmul.py needs a CUDA GPU; --quick runs tiny shapes on CPU")
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton

import triton  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from common import read_bandwidth  # noqa: E402
from nanogpt2.dtypes import dtype_from_name  # noqa: E402
from nanogpt2.kernels import int4_linear, int8_linear  # noqa: E402
from nanogpt2.kernels import quant_matmul  # noqa: E402
from nanogpt2.quantization import quantize_int4, quantize_int8  # noqa: E402

DEVICE = "cuda" if ON_GPU else "cpu"
REL_TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 1e-4}  # ||y − ref|| / ||ref||
# (K in-features, N out-features, layer)
GPT2_SHAPES = [(768, 2304, "gpt2 c_attn"), (768, 768, "gpt2 attn.c_proj"), (768, 3072, "gpt2 c_fc"),
               (3072, 768, "gpt2 mlp.c_proj"), (768, 50257, "gpt2 lm_head"),
               (1600, 4800, "xl c_attn"), (1600, 1600, "xl attn.c_proj"), (1600, 6400, "xl c_fc"),
               (6400, 1600, "xl mlp.c_proj"), (1600, 50257, "xl lm_head")]
QUICK_SHAPES = [(64, 48, "tiny"), (128, 35, "tiny odd N")]


# ---- the contenders: same (K, N) layer in three formats ------------------------------------------------


def make_layer(K, N, dtype, group_size):
    """A random float layer and its int8 and int4 quantizations (nanogpt2.quantization's, as the model stores them).
    Returns {impl: (fn(x), weight bytes)} and the fp32 weights each format stands for (for the checks)."""
    torch.manual_seed(0)
    w = torch.randn(N, K, device=DEVICE) * 0.02
    # the formats exactly as the model stores them (nanogpt2/quantization.py), scales in `dtype`
    q8, s8 = quantize_int8(w, dtype)
    packed, s4, z4 = quantize_int4(w, group_size, dtype)
    w_float = w.to(dtype)
    impls = {
        f"{OPTS.dtype} F.linear": (lambda x, kernel=None: F.linear(x, w_float),
                                   w_float.numel() * w_float.element_size()),
        "int8": (lambda x, kernel=None: int8_linear(x, q8, s8, kernel=kernel),
                 q8.numel() + s8.numel() * s8.element_size()),
        f"int4 g{group_size}": (lambda x, kernel=None: int4_linear(x, packed, s4, z4, group_size, kernel=kernel),
                                packed.numel() + 2 * s4.numel() * s4.element_size()),
    }
    refs = {
        f"{OPTS.dtype} F.linear": w_float.float(),
        "int8": quant_matmul.dequantize_int8(q8, s8, torch.float32),
        f"int4 g{group_size}": quant_matmul.dequantize_int4(packed, s4, z4, group_size, torch.float32),
    }
    return impls, refs


# ---- measuring -------------------------------------------------------------------------------------


def sync():
    if ON_GPU:
        torch.cuda.synchronize()


def gpu_us(fn):
    """GPU time of one call, cold L2, median (µs); on CPU the mean wall time of OPTS.repeats calls."""
    if ON_GPU:
        return 1e3 * do_bench(fn, warmup=max(OPTS.warmup, 1), rep=max(OPTS.repeats, 1) * 5, return_mode="median")
    return call_us(fn)


def call_us(fn):
    """Mean wall time of one call over OPTS.repeats back-to-back calls (µs): launch overhead included."""
    for _ in range(OPTS.warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(OPTS.repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) * 1e6 / max(OPTS.repeats, 1)


def rel_err(out, ref):
    return ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def measure(fn, x, ref_w, dtype):
    """Check against x·ref_wᵀ in fp32, then time. Returns (µs, call µs, note); None times when wrong."""
    ref = x.float() @ ref_w.T
    err = rel_err(fn(), ref)
    if not err <= REL_TOL[dtype]:
        return None, None, f"WRONG: rel err {err:.1e}"
    return gpu_us(fn), call_us(fn), ""


# ---- sections ----------------------------------------------------------------------------------------


def shapes():
    chosen = QUICK_SHAPES if OPTS.quick else GPT2_SHAPES
    return [(K, N, name) for K, N, name in chosen if K % OPTS.group_size == 0]


def crossover_shapes():
    chosen = [(64, 48, "tiny")] if OPTS.quick else [(768, 3072, "gpt2 c_fc"), (768, 50257, "gpt2 lm_head")]
    return [(K, N, name) for K, N, name in chosen if K % OPTS.group_size == 0]


PREFILL_M = 20 if OPTS.quick else 512
CROSSOVER_M = (1, 5) if OPTS.quick else (1, 2, 4, 8, 16, 32)


def _compile_shape(K, N, layer, dtype_name):
    """Run once every kernel variant that the sections will time at one shape (in a spawned process: this
    fills Triton's on-disk cache, from which the timing process then loads them)."""
    dtype = dtype_from_name(dtype_name)
    impls, _ = make_layer(K, N, dtype, OPTS.group_size)
    runs = [(1, None), (PREFILL_M, None)]
    if (K, N, layer) in crossover_shapes():
        runs += [(M, kernel) for M in CROSSOVER_M for kernel in quant_matmul.KERNELS]
    for M, kernel in runs:
        x = torch.randn(M, K, device=DEVICE).to(dtype)
        for impl, (fn, _) in impls.items():
            if impl.startswith("int"):
                fn(x, kernel)
    sync()


def compile_in_parallel(dtype_name):
    """Compiling is most of a first run (a second or more of ptxas per variant, ~40 variants): do it in
    parallel processes first (Triton keys its disk cache on the kernel and its specialisation, not the
    process)."""
    jobs = [(K, N, layer, dtype_name) for K, N, layer in dict.fromkeys(shapes() + crossover_shapes())]
    workers = min(len(jobs), max(1, (os.cpu_count() or 2) - 1)) if OPTS.compile_jobs < 0 else OPTS.compile_jobs
    if not ON_GPU or workers == 0:
        return
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for future in [pool.submit(_compile_shape, *job) for job in jobs]:
            future.result()
    print(f"# compiled the kernels for {len(jobs)} shapes in {workers} processes: {time.perf_counter() - t0:.0f} s")


def bench_layers(dtype, M, bandwidth):
    rows = []
    for K, N, layer in shapes():
        impls, refs = make_layer(K, N, dtype, OPTS.group_size)
        x = torch.randn(M, K, device=DEVICE).to(dtype)
        base = None
        for impl, (fn, nbytes) in impls.items():
            us, call, note = measure(lambda fn=fn: fn(x), x, refs[impl], dtype)
            base = us if base is None else base
            gbps = nbytes / (us * 1e-6) / 1e9 if us else None
            rows.append(dict(section="decode" if M == 1 else "prefill", layer=layer, M=M, K=K, N=N, impl=impl,
                             kernel=quant_matmul._pick_kernel(M, None) if impl[:3] == "int" else
                             "cublas" if ON_GPU else "torch",
                             us=us, call_us=call, weight_mb=nbytes / 1e6, gbps=gbps,
                             x_read=gbps * 1e9 / bandwidth if gbps and bandwidth else None,
                             tflops=2 * M * N * K / (us * 1e-6) / 1e12 if us else None,
                             vs_bf16=base / us if us and base else None, note=note))
        del impls, refs
    return rows


def bench_crossover(dtype):
    rows = []
    for K, N, layer in crossover_shapes():
        impls, refs = make_layer(K, N, dtype, OPTS.group_size)
        for M in CROSSOVER_M:
            x = torch.randn(M, K, device=DEVICE).to(dtype)
            for impl, (fn, _) in impls.items():
                if not impl.startswith("int"):
                    continue
                got = {}
                for kernel in quant_matmul.KERNELS:
                    got[kernel] = measure(lambda fn=fn, kernel=kernel: fn(x, kernel), x, refs[impl], dtype)
                gemv, gemm = got["gemv"][0], got["gemm"][0]
                faster = "-" if gemv is None or gemm is None else ("gemv" if gemv <= gemm else "gemm")
                rows.append(dict(section="crossover", layer=layer, M=M, K=K, N=N, impl=impl, gemv_us=gemv,
                                 gemm_us=gemm, faster=faster, default=quant_matmul._pick_kernel(M, None),
                                 note=(got["gemv"][2] + " " + got["gemm"][2]).strip()))
        del impls, refs
    return rows


# ---- output --------------------------------------------------------------------------------------------


def _fmt(value, width, digits):
    return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}}"


def print_layers(rows, bandwidth):
    M = rows[0]["M"]
    if M == 1:
        print(f"\ndecode  M=1  x {OPTS.dtype}  (GB/s = weight bytes / t; x read = GB/s / {bandwidth / 1e9:.0f} GB/s, "
              f"torch.sum's read bandwidth)")
    else:
        print(f"\nprefill  M={M}  x {OPTS.dtype}  (TFLOP/s = 2·M·N·K / t)")
    print(f"{'layer':<17}{'K':>6}{'N':>7}  {'impl':<15}{'kernel':>7}{'µs':>9}{'call µs':>9}{'MB':>7}"
          f"{'GB/s':>8}{'x read':>7}{'TFLOP/s':>8}{'vs bf16':>8}  note")
    for r in rows:
        print(f"{r['layer']:<17}{r['K']:>6}{r['N']:>7}  {r['impl']:<15}{r['kernel']:>7}{_fmt(r['us'], 9, 1)}"
              f"{_fmt(r['call_us'], 9, 1)}{r['weight_mb']:>7.2f}{_fmt(r['gbps'], 8, 0)}{_fmt(r['x_read'], 7, 2)}"
              f"{_fmt(r['tflops'], 8, 2)}{_fmt(r['vs_bf16'], 8, 2)}  {r['note']}")


def print_crossover(rows):
    print(f"\ncrossover  x {OPTS.dtype}  GEMV vs GEMM forced (kernel=None picks the GEMV for M <= "
          f"{quant_matmul.GEMV_MAX_M})")
    print(f"{'layer':<15}{'M':>4}  {'impl':<10}{'gemv µs':>9}{'gemm µs':>9}{'faster':>8}{'default':>9}  note")
    for r in rows:
        print(f"{r['layer']:<15}{r['M']:>4}  {r['impl']:<10}{_fmt(r['gemv_us'], 9, 1)}{_fmt(r['gemm_us'], 9, 1)}"
              f"{r['faster']:>8}{r['default']:>9}  {r['note']}")


def machine_line():
    if ON_GPU:
        where = torch.cuda.get_device_name()
    else:
        where = "CPU, Triton interpreter (TRITON_INTERPRET=1): timings are meaningless, only the checks count"
    return (f"# {where} | torch {torch.__version__} | triton {triton.__version__} | x {OPTS.dtype}, "
            f"int4 group {OPTS.group_size}")


def main():
    if OPTS.dtype not in ("bf16", "fp16", "fp32"):
        sys.exit(f"--dtype {OPTS.dtype!r} not supported; valid: bf16, fp16, fp32")
    if OPTS.group_size not in quant_matmul.GROUP_SIZES:
        sys.exit(f"--group-size {OPTS.group_size} not supported; valid: {quant_matmul.GROUP_SIZES}")
    if not ON_GPU and OPTS.dtype == "bf16":
        OPTS.dtype = "fp32"  # a CPU has no cuBLAS bf16 to compare with, and the interpreter is for the checks
    dtype = dtype_from_name(OPTS.dtype)
    print(machine_line())
    nbytes = 1 << (28 if OPTS.quick else 30)
    bandwidth = read_bandwidth(nbytes, DEVICE)
    print(f"# read bandwidth (torch.sum over {nbytes >> 20} MiB): {bandwidth / 1e9:.0f} GB/s")
    compile_in_parallel(OPTS.dtype)
    all_rows = []
    for M in (1, PREFILL_M):
        rows = bench_layers(dtype, M, bandwidth)
        print_layers(rows, bandwidth)
        all_rows += rows
    rows = bench_crossover(dtype)
    print_crossover(rows)
    all_rows += rows
    if OPTS.csv:
        names = list(dict.fromkeys(k for r in all_rows for k in r))
        with open(OPTS.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=names + ["dtype"])
            writer.writeheader()
            writer.writerows(dict(r, dtype=OPTS.dtype) for r in all_rows)
        print(f"\nwrote {len(all_rows)} rows to {OPTS.csv}")
    wrong = [r for r in all_rows if "WRONG" in r["note"]]
    if wrong:
        sys.exit(f"{len(wrong)} result(s) disagree with the fp32 reference")


if __name__ == "__main__":
    main()
