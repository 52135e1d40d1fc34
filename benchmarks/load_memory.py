"""Peak memory of `GPT2LMHeadModel.from_pretrained` versus the model's size (default: gpt2-xl, fp32), and the same
while quantizing as it loads (--quantize int8 | int4), each in a fresh process.

    python benchmarks/load_memory.py [--preset gpt2-xl] [--dir /tmp/nanogpt2-xl] [--quantize int8] [--group-size 64]

Writes a random fp32 checkpoint of the preset (once; reused if present), then loads it in a fresh process that
samples its own resident memory every 5 ms:
  anon     RssAnon: memory the process owns (heap, tensors it allocated). This is what loading costs.
  total    VmHWM, the kernel's exact peak of the whole resident set: anon + RssFile, the file-backed pages mapped
           (shared-library code, and the safetensors file's pages while a tensor still points into the mapping).
           File pages are the page cache: clean, shared, dropped by the kernel under pressure without any write.
  trimmed  anon after loading and glibc's malloc_trim(0) (glibc only): memory the model really holds. The gap to
           anon at the end is freed heap that glibc kept (tensors of a few MB come from the heap once its dynamic
           mmap threshold has risen, and a heap fragmented by long-lived tensors cannot shrink).
fp32: the model is built on the meta device and every tensor is materialised once, so anon should peak near 1x the
model's bytes (plus one tensor in flight); quantize="int8" quantizes tensor by tensor as it loads, so anon should
peak at the integer model plus a few fp32 tensors in flight, <= 0.5x the fp32 checkpoint's bytes (issue 14).
"model" counts every parameter and buffer of the loaded model (a quantized layer's integers and scales, and the CPU
op's derived layouts: int4's cpu_qweight is a second copy of its 4-bit weights).
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

from nanogpt2.quantization import DEFAULT_GROUP_SIZE, GROUP_SIZES, MODES

LOADER = r"""
import ctypes, json, sys, threading, time
def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out
peak = {"RssAnon": 0.0, "RssFile": 0.0}
def sample():
    while True:
        s = status()
        for k in peak:
            peak[k] = max(peak[k], s[k])
        time.sleep(0.005)
import torch, nanogpt2
base = status()
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
m = nanogpt2.GPT2LMHeadModel.from_pretrained(sys.argv[1], quantize=json.loads(sys.argv[2]),
                                             group_size=json.loads(sys.argv[3]))
dt = time.perf_counter() - t0
time.sleep(0.05)
end = status()
try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    trimmed = status()["RssAnon"]
except (OSError, AttributeError):   # not glibc
    trimmed = None
storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in [*m.parameters(), *m.buffers()]}
print(json.dumps(dict(base=base, peak=peak, end=end, trimmed=trimmed, model_mb=sum(storages.values()) / 2**20, seconds=dt)))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2-xl")
    ap.add_argument("--dir", default=None, help="where to write the random checkpoint (default /tmp/nanogpt2-<preset>)")
    ap.add_argument("--quantize", choices=MODES, default=None, help="quantize while loading (default: plain fp32)")
    ap.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=None,
                    help=f"int4 group size (default {DEFAULT_GROUP_SIZE})")
    ap.add_argument("--quick", action="store_true", help="a tiny model in a temporary directory: checks the script runs")
    args = ap.parse_args()
    from common import QUICK_CONFIG, machine_line
    print(machine_line())
    if args.quick:
        args.preset, args.dir = "tiny", tempfile.mkdtemp(prefix="nanogpt2-load-")
    directory = args.dir or f"/tmp/nanogpt2-{args.preset}"
    if not os.path.isfile(os.path.join(directory, "config.json")):
        import torch
        from nanogpt2 import GPT2Config, GPT2LMHeadModel
        print(f"writing a random {args.preset} checkpoint to {directory} ...", flush=True)
        torch.manual_seed(0)
        config = GPT2Config(**QUICK_CONFIG) if args.quick else GPT2Config.preset(args.preset)
        GPT2LMHeadModel(config).save_pretrained(directory)
    ckpt_mb = sum(os.path.getsize(f) for f in glob.glob(os.path.join(directory, "*.safetensors"))) / 2**20
    loads = [(None, None)] + ([(args.quantize, args.group_size)] if args.quantize else [])
    print(f"# {directory}: {ckpt_mb:.0f} MiB of fp32 safetensors; anon = RssAnon (owned), total = VmHWM (anon + "
          "the mapped file's pages); 'beyond' = peak minus the same figure before from_pretrained")
    head = (f"{'preset':<9}{'weights':<10}{'model MiB':>10}{'peak anon':>10}{'beyond':>8}{'/model':>8}{'/ckpt':>7}"
            f"{'peak total':>11}{'beyond':>8}{'/ckpt':>7}{'load s':>8}")
    print(head)
    for mode, g in loads:
        r = subprocess.run([sys.executable, "-c", LOADER, directory, json.dumps(mode), json.dumps(g)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"loading {directory} (quantize={mode}) failed:\n{r.stderr[-3000:]}")
        res = json.loads(r.stdout.strip().splitlines()[-1])
        base, peak, end = res["base"], res["peak"], res["end"]
        anon = peak["RssAnon"] - base["RssAnon"]
        total = end["VmHWM"] - base["VmRSS"]
        weights = "fp32" if mode is None else mode if mode == "int8" else f"int4-g{g or DEFAULT_GROUP_SIZE}"
        print(f"{args.preset:<9}{weights:<10}{res['model_mb']:>10.0f}{peak['RssAnon']:>10.0f}{anon:>8.0f}"
              f"{anon / res['model_mb']:>8.2f}{anon / ckpt_mb:>7.2f}{end['VmHWM']:>11.0f}{total:>8.0f}"
              f"{total / ckpt_mb:>7.2f}{res['seconds']:>8.1f}", flush=True)
        trimmed = "n/a (not glibc)" if res["trimmed"] is None else f"{res['trimmed'] - base['RssAnon']:.0f}"
        print(f"#   beyond start at the end: anon {end['RssAnon'] - base['RssAnon']:.0f} MiB, after malloc_trim "
              f"{trimmed} MiB; peak RssFile {peak['RssFile']:.0f} MiB")
    if args.quick:
        shutil.rmtree(directory)


if __name__ == "__main__":
    main()
