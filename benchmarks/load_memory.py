"""Peak memory of `GPT2LMHeadModel.from_pretrained` versus the model's size (default: gpt2-xl, fp32).

    python benchmarks/load_memory.py [--preset gpt2-xl] [--dir /tmp/nanogpt2-xl]

Writes a random checkpoint of the preset (once; reused if present), then loads it in a fresh process that
samples its own anonymous resident memory (RssAnon: heap, not the page cache of the mmap'd file) every
5 ms. The model is built on the meta device and every tensor is materialised once, so the peak should sit
near 1x the model's bytes (plus the interpreter, torch and one tensor in flight).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

LOADER = r"""
import json, sys, threading, time
def anon_mb():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
peak = [0.0]
def sample():
    while True:
        peak[0] = max(peak[0], anon_mb()); time.sleep(0.005)
import torch, nanogpt2
base = anon_mb()
threading.Thread(target=sample, daemon=True).start()
t0 = time.perf_counter()
m = nanogpt2.GPT2LMHeadModel.from_pretrained(sys.argv[1])
dt = time.perf_counter() - t0
time.sleep(0.05)
size = sum(p.numel() * p.element_size() for p in m.parameters()) / 2**20
print(json.dumps(dict(base_mb=base, peak_mb=peak[0], model_mb=size, seconds=dt)))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="gpt2-xl")
    ap.add_argument("--dir", default=None, help="where to write the random checkpoint (default /tmp/nanogpt2-<preset>)")
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
    r = subprocess.run([sys.executable, "-c", LOADER, directory], capture_output=True, text=True, check=True)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    extra = res["peak_mb"] - res["base_mb"]
    print(f"{'preset':<10}{'model MiB':>11}{'peak anon MiB':>15}{'beyond start':>14}{'ratio':>8}{'load s':>8}")
    print(f"{args.preset:<10}{res['model_mb']:>11.0f}{res['peak_mb']:>15.0f}{extra:>14.0f}"
          f"{extra / res['model_mb']:>8.2f}{res['seconds']:>8.1f}")
    if args.quick:
        shutil.rmtree(directory)


if __name__ == "__main__":
    main()
