"""What every benchmark shares: the machine line, paired timing with medians, tables, CSV, model pairs.

Measurements are side by side in one process: the two implementations run alternately (A B A B ...),
so drift in clock speed or background load hits both, and we report medians and their ratio.
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import tempfile
import time

import torch

from nanogpt2.dtypes import FLAG_CHOICES, dtype_from_name

def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line() -> str:
    import transformers
    try:
        import triton
        tv = triton.__version__
    except ImportError:
        tv = "none"
    if torch.cuda.is_available():
        dev = f"GPU {torch.cuda.get_device_name()}"
    else:
        dev = f"CPU {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    return (f"# {dev} | torch {torch.__version__} | triton {tv} | transformers {transformers.__version__} | "
            f"{time.strftime('%Y-%m-%d')}")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    """Seconds for one call of fn (synchronised on GPU)."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def paired(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Median seconds of each fn, running them alternately `repeats` times after `warmup` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


class Table:
    """Fixed-width table with units in the headers; also kept as rows for --csv."""

    def __init__(self, columns: list[tuple[str, int]]):
        self.columns, self.rows = columns, []
        print("".join(f"{name:>{width}}" for name, width in columns), flush=True)

    def add(self, *values):
        self.rows.append(values)
        cells = []
        for (name, width), v in zip(self.columns, values):
            if isinstance(v, float):
                v = f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
            cells.append(f"{str(v):>{width}}")
        print("".join(cells), flush=True)

    def write_csv(self, path: str | None):
        if not path:
            return
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow([name for name, _ in self.columns])
            w.writerows(self.rows)
        print(f"wrote {path}")


def base_parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats: checks the script still runs")
    p.add_argument("--csv", default=None, help="also write the table to this CSV file")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=FLAG_CHOICES)
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per measurement (default: 5, quick: 2)")
    p.add_argument("--model", default=None,
                   help="checkpoint directory or hub id (default: random weights of the shape below)")
    p.add_argument("--preset", default="gpt2", help="GPT-2 shape for random weights (quick mode: a tiny one)")
    return p


QUICK_CONFIG = dict(vocab_size=512, n_positions=256, n_embd=64, n_layer=2, n_head=4)


def model_pair(args, attn_implementation="sdpa", hf_attn="sdpa", initializer_range=None):
    """(nanogpt2 model, transformers model) with identical weights, eval mode, on args.device/dtype.

    Random weights use `initializer_range` (default GPT-2's 0.02); generation benchmarks pass a larger one so
    the logits are peaky and greedy tokens do not hinge on rounding (both sides must produce the same tokens)."""
    from nanogpt2 import GPT2Config, GPT2LMHeadModel
    from nanogpt2.reference import hf_quiet
    transformers = hf_quiet()
    dtype = dtype_from_name(args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            cfg = GPT2Config(**QUICK_CONFIG) if args.quick else GPT2Config.preset(args.preset)
            if initializer_range is not None:
                cfg.initializer_range = initializer_range
            torch.manual_seed(0)
            GPT2LMHeadModel(cfg).save_pretrained(tmp)
            path = tmp
        ours = GPT2LMHeadModel.from_pretrained(path, dtype=dtype, device=args.device,
                                               attn_implementation=attn_implementation)
        from nanogpt2.files import resolve
        theirs = transformers.GPT2LMHeadModel.from_pretrained(resolve(path).directory, dtype=dtype,
                                                              attn_implementation=hf_attn).to(args.device).eval()
    return ours, theirs


# Low-precision greedy check: a token may trail float32's best logit by this fraction of the row's spread
# (best - mean). bfloat16 124M, 128 tokens: transformers' own tokens trail by up to 0.04-0.08 (12-17% of them are
# not float32's argmax), nanogpt2's by 0.06; a real bug (wrong position, mask, cache) trails by whole spreads.
NEAR_TIE = 0.15


def check_greedy(name: str, out: torch.Tensor, ref: torch.Tensor, prompt_len: int, judge=None) -> None:
    """Refuse (SystemExit) to time `name` unless its greedy tokens `out` (rows: prompt, then new tokens) are right.

    Without `judge` (float32): identical to `ref`, nanogpt2's tokens (themselves checked, as one of the
    implementations). With `judge`, a float32 transformers model of the same weights (for bfloat16/float16 runs,
    where rounding legitimately flips near-ties and the sequences then part): every new token must be a greedy
    choice of the judge run over `out` itself (teacher forcing), i.e. its logit within NEAR_TIE x (best - mean
    logit) of the best."""
    out, ref = out.cpu(), ref.cpu()
    if judge is None:
        if not torch.equal(out, ref):
            raise SystemExit(f"{name} produced different tokens from nanogpt2 ({out.shape[0]} rows): refusing to "
                             "time a wrong result")
        return
    dev = next(judge.parameters()).device
    with torch.inference_mode():
        logits = judge(out.to(dev)).logits[:, prompt_len - 1:-1].float().cpu()   # (B, new, V): each new token's
    chosen = logits.gather(-1, out[:, prompt_len:, None])[..., 0]
    best, mean = logits.max(-1).values, logits.mean(-1)
    worst = ((best - chosen) / (best - mean)).max().item()
    if worst > NEAR_TIE:
        raise SystemExit(f"{name} chose a token {worst:.3f} of the logit spread below float32's best (allowed "
                         f"{NEAR_TIE}): refusing to time a wrong result")


def float32_judge(args, **kw):
    """For low-precision runs: the transformers model of the same weights in float32 (check_greedy's judge)."""
    if args.dtype == "float32":
        return None
    return model_pair(argparse.Namespace(**{**vars(args), "dtype": "float32"}), **kw)[1]


def read_bandwidth(nbytes: int, device: str, repeats: int = 5) -> float:
    """Bytes/s at which this machine streams `nbytes` from memory: the best of `repeats` sums over a buffer that
    size (at least 256 MiB, so it cannot sit in a CPU cache). A decode step's floor is weight bytes / this."""
    n = max(nbytes, 256 << 20) // 4
    buf = torch.ones(n, dtype=torch.float32, device=device)
    buf.sum()
    best = min(timed(buf.sum) for _ in range(repeats))
    del buf
    return n * 4 / best


def weight_bytes(model) -> int:
    """Bytes of weights one decode step reads: every parameter once (tied lm_head/wte counted once), except
    the position table, of which a step reads one row."""
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "wpe" not in name)
