"""The GPU check (issue 13): every GPU test and benchmark in one command, each part logged, timed and summarised.

    make gpu-check                      # the whole plan: about 11 minutes on one H200
    make gpu-check ONLY=tests           # its first half (env and the test parts), ~5.5 minutes
    make gpu-check ONLY=benchmarks      # its second half (env, the benchmarks and the profile), ~5.5 minutes
    make gpu-check ONLY=bench-decode    # rerun one part (several: ONLY=kernel-tests,model-tests)
    make gpu-check DRY=1                # the same plan on CPU: tiny shapes, Triton's interpreter
    python tools/gpu_check.py --list    # the parts: budget, timeout, what each writes

On the device machine (no network; the image has torch, triton, transformers and pytest) from the repository
root, as one command of at most 10 minutes:

    python3 -m pip install -q --no-deps --no-build-isolation -e . && make gpu-check ONLY=tests OUT=gpu-out BUNDLE_TO="$OUT"
    make gpu-check ONLY=benchmarks OUT=gpu-out BUNDLE_TO="$OUT"   # the second command, at once (the machine is warm)

(OUT=gpu-out on the command line: where $OUT is set, make and --out would otherwise write every file there.)

Everything goes to --out (default $OUT, else ./gpu-out): <part>.log for each part (the command, then its
stdout and stderr), the CSVs and JUnit XML files the parts write, and summary.txt: each part's status, wall
time and budget; and all of them packed in gpu-check.tar.gz, one file to carry off the machine. Both are
rewritten after every part, so that even a killed run leaves them. Parts run in the plan's
order, with compiled kernels (TRITON_INTERPRET=0); a failing part does not stop the next; the exit status
is 1 if any part failed, timed out, or did not write what it promised.

Tests: the kernel and model test files run whole; of the other test files, the tests marked
@pytest.mark.gpu (or cuda_graphs, which implies gpu; tests/conftest.py registers both and skips them
without CUDA).

Time: the budgets come from the first run (H200, 2026-11-28: 493 s with five parts failing early, so the parts
that then stopped early have room to finish): each half fits DEADLINE_S, the whole plan does not, and issue
13's 5 minutes for all of it is not met (the kernel tests' compiles alone took 178 s). A part is stopped at its
timeout, and the run at DEADLINE_S after this process started (--deadline), so that the summary is written
before the device tool's 10-minute limit; parts left then are reported "not run (deadline)". DRY=1 has
neither: its CPU times say nothing about the GPU's.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from xml.etree import ElementTree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
DEADLINE_S = 530        # one command on the GPU, from this process's start; the device tool stops it at 600 s
                        # (the install before it, and up to 20 s to stop a part, come on top)
DRY_TIMEOUT_S = 600     # per part in DRY mode (2 CPU cores, the Triton interpreter)
START = time.monotonic()


@dataclass(frozen=True)
class Part:
    name: str
    what: str                       # one line: what it checks or measures
    command: tuple[str, ...]        # argv, run from the repository root; "{out}" becomes the output folder
    budget_s: int                   # expected wall time on a Hopper GPU (from the first run, on an H200)
    timeout_s: int                  # stopped after this
    writes: tuple[str, ...] = ()    # files under {out} besides <name>.log; a part that leaves one out failed
    dry: tuple[str, ...] | None = None      # argv for DRY=1 (on CPU), when it differs
    env: dict = field(default_factory=dict)  # extra environment for this part


PYTEST = (PY, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "--durations=10")
KERNEL_TESTS = ("tests/test_flash_attention.py", "tests/test_decode_attention.py", "tests/test_quant_matmul.py")
MODEL_TESTS = ("tests/test_triton_model.py",)


def pytest_part(name: str, what: str, targets: tuple, budget_s: int, timeout_s: int, gpu_only=()) -> Part:
    """pytest over `targets`, its results also as JUnit XML; `gpu_only` arguments (e.g. -n 4) are left out on CPU."""
    args = PYTEST + (f"--junitxml={{out}}/{name}.xml",)
    return Part(name, what, args + tuple(gpu_only) + targets, budget_s, timeout_s, writes=(f"{name}.xml",),
                dry=args + targets)


def bench_part(name: str, what: str, script: str, gpu_args: tuple, dry_args: tuple, budget_s: int,
               timeout_s: int, env: dict | None = None) -> Part:
    """benchmarks/<script> writing its table to {out}/<name>.csv; on CPU with `dry_args` (--quick and such)."""
    csv = ("--csv", f"{{out}}/{name}.csv")
    return Part(name, what, (PY, f"benchmarks/{script}") + gpu_args + csv, budget_s, timeout_s,
                writes=(f"{name}.csv",), dry=(PY, f"benchmarks/{script}") + dry_args + csv, env=env or {})


PLAN = [
    Part("env", "the machine: nvidia-smi, driver, GPU, torch/CUDA/triton/transformers versions",
         (PY, "tools/gpu_check.py", "--environment"), budget_s=5, timeout_s=60),
    pytest_part("kernel-tests", "flash, decode and int8/int4 matmul kernels vs fp64 references: fp32/fp16/bf16, "
                "GPU tile configs", KERNEL_TESTS, budget_s=200, timeout_s=240, gpu_only=("-n", "4")),
    pytest_part("model-tests", "whole model, triton vs sdpa on CUDA: logits, gradients, generation",
                MODEL_TESTS, budget_s=25, timeout_s=90),
    pytest_part("gpu-tests", "every other test marked gpu (or cuda_graphs): CUDA-graph decode and the like",
                ("-m", "gpu", "tests") + tuple(f"--ignore={t}" for t in KERNEL_TESTS + MODEL_TESTS),
                budget_s=90, timeout_s=150),
    Part("sync-check", "a decode step and a training step under torch.cuda.set_sync_debug_mode('error')",
         (PY, "tools/sync_check.py"), budget_s=20, timeout_s=60),
    bench_part("bench-attention", "attention fwd, fwd+bwd and decode kernel vs SDPA flash/mem-eff, bf16",
               "attention.py", ("--dtype", "bf16"), ("--quick", "--warmup", "0", "--repeats", "1"),
               budget_s=80, timeout_s=150),
    bench_part("bench-quant", "int8/int4 weight-only matmul vs bf16 cuBLAS at GPT-2 shapes: decode GB/s, prefill "
               "TFLOP/s, GEMV/GEMM crossover", "quant_matmul.py", ("--dtype", "bf16"),
               ("--quick", "--warmup", "0", "--repeats", "1"), budget_s=45, timeout_s=120),
    bench_part("bench-decode", "greedy decode B=1 and B=8, eager and compile=True (CUDA graphs) vs transformers",
               "decode.py", ("--dtype", "bfloat16", "--compile", "--batches", "1", "8", "--new-tokens", "128"),
               ("--quick", "--batches", "1", "8"), budget_s=150, timeout_s=240,
               env={"TORCH_LOGS": "graph_breaks,recompiles"}),
    bench_part("bench-train", "one training step, 124M, 16x1024, bf16 autocast, vs transformers; MFU",
               "train_step.py", ("--autocast", "bfloat16", "--shapes", "16x1024"), ("--quick",),
               budget_s=25, timeout_s=90),
    Part("profile", "where the time goes: torch.profiler kernel tables of a compiled decode and a training step",
         (PY, "tools/gpu_profile.py"), budget_s=45, timeout_s=90, dry=(PY, "tools/gpu_profile.py", "--quick")),
]
PARTS = {p.name: p for p in PLAN}
# the two halves, each one device command: the tests, then the benchmarks (env in both: each log stands alone)
GROUPS = {"tests": ["env", "kernel-tests", "model-tests", "gpu-tests", "sync-check"],
          "benchmarks": ["env"] + [p.name for p in PLAN if p.name.startswith("bench-")] + ["profile"]}


# ---- running the plan --------------------------------------------------------------------------------------

@dataclass
class Result:
    part: Part
    status: str         # "ok", "FAILED (exit 1)", "TIMEOUT (120 s)", "MISSING x.csv", "not run (deadline)"
    wall_s: float = 0.0
    note: str = ""      # what it produced: test counts, CSV rows

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def part_env(part: Part, dry: bool) -> dict:
    return {**os.environ, "TRITON_INTERPRET": "1" if dry else "0", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **part.env}


def stop(proc: subprocess.Popen) -> None:
    """End a part's process group (pytest's workers, spawned kernel processes): SIGTERM, then SIGKILL."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            pass


def produced(out: str, names: list[str]) -> str:
    """A short account of files a part wrote: pytest's counts from JUnit XML, rows of a CSV."""
    notes = []
    for name in names:
        path = os.path.join(out, name)
        if name.endswith(".xml"):
            suite = ElementTree.parse(path).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
            notes.append(", ".join(f"{v} {k}" for k, v in (("passed", passed), ("failed", n["failures"]),
                                                           ("errors", n["errors"]), ("skipped", n["skipped"])) if v))
        elif name.endswith(".csv"):
            with open(path) as f:
                rows = max(sum(1 for _ in f) - 1, 0)
                notes.append(f"{rows} row{'s' * (rows != 1)} in {name}")
    return "; ".join(notes)


def run_part(part: Part, out: str, dry: bool, limit_s: float) -> Result:
    """Run one part with its output in <out>/<name>.log, stopped after limit_s seconds."""
    argv = [a.replace("{out}", out) for a in (part.dry if dry and part.dry else part.command)]
    for name in part.writes:   # a file left by an earlier run must not pass for this run's
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    t0 = time.monotonic()
    with open(os.path.join(out, f"{part.name}.log"), "w") as log:
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, cwd=ROOT, env=part_env(part, dry), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            rc = None
        except KeyboardInterrupt:
            stop(proc)
            raise
        if rc is None:
            stop(proc)
            log.write(f"\n[gpu-check] stopped after {limit_s:.0f} s\n")
    wall = time.monotonic() - t0
    missing = [n for n in part.writes if not os.path.exists(os.path.join(out, n))]
    try:
        note = produced(out, [n for n in part.writes if n not in missing])
    except (OSError, ElementTree.ParseError) as e:
        note = f"unreadable output: {e}"
    if rc is None:
        status = f"TIMEOUT ({limit_s:.0f} s)"
    elif rc != 0:
        status = f"FAILED (exit {rc})"
    elif missing:
        status = "MISSING " + ", ".join(missing)
    else:
        status = "ok"
    return Result(part, status, wall, note)


def time_limits(parts: list[Part], deadline_s: float | None, dry: bool):
    """Yield (part, seconds it may run, or None when no time is left) as the parts run. A part may use its
    timeout, but not the time the later parts' budgets need (unless that would leave it less than its own
    budget), and never runs past the deadline."""
    if dry or deadline_s is None:
        for part in parts:
            yield part, (DRY_TIMEOUT_S if dry else part.timeout_s)
        return
    end = time.monotonic() + deadline_s
    for i, part in enumerate(parts):
        left = end - time.monotonic()
        later = sum(p.budget_s for p in parts[i + 1:])
        limit = min(part.timeout_s, max(part.budget_s, left - later), left)
        yield part, (limit if limit >= 1 else None)


def run_plan(parts: list[Part], out: str, dry: bool = False, deadline_s: float | None = DEADLINE_S,
             bundle_to: str | None = None) -> list[Result]:
    """Run `parts` in order, each stopped at its time limit (time_limits); deadline_s counts from now.
    summary.txt and gpu-check.tar.gz are rewritten in `out` after every part, and copied to `bundle_to`."""
    os.makedirs(out, exist_ok=True)
    results = []
    for part, limit in time_limits(parts, deadline_s, dry):
        if limit is None:
            results.append(Result(part, "not run (deadline)"))
        else:
            print(f"[gpu-check] {part.name}: {part.what} (budget {part.budget_s} s, limit {limit:.0f} s)",
                  flush=True)
            results.append(run_part(part, out, dry, limit))
            r = results[-1]
            print(f"[gpu-check] {part.name}: {r.status} in {r.wall_s:.1f} s  {r.note}", flush=True)
        write_summary(results, out, dry, bundle_to)
    return results


# ---- reporting ---------------------------------------------------------------------------------------------

def summary_table(results: list[Result], dry: bool) -> str:
    mode = "DRY=1 (CPU, Triton interpreter)" if dry else "GPU (TRITON_INTERPRET=0)"
    lines = [f"# make gpu-check, {mode}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; machine: env.log",
             f"{'part':<16}{'status':<22}{'wall s':>8}{'budget s':>10}  note"]
    for r in results:
        lines.append(f"{r.part.name:<16}{r.status:<22}{r.wall_s:>8.1f}{r.part.budget_s:>10}  {r.note}")
    failed = [r.part.name for r in results if not r.ok]
    lines.append(f"{'total':<16}{'ok' if not failed else f'{len(failed)} failed':<22}"
                 f"{sum(r.wall_s for r in results):>8.1f}{sum(r.part.budget_s for r in results):>10}  "
                 + (f"failed: {', '.join(failed)}" if failed else ""))
    return "\n".join(lines) + "\n"


BUNDLE = "gpu-check.tar.gz"


def write_summary(results: list[Result], out: str, dry: bool, bundle_to: str | None = None) -> None:
    """summary.txt, then every file in `out` (logs, CSVs, XML, the summary) packed into gpu-check.tar.gz; both
    also copied to `bundle_to` (where a machine lets only a few files out), each replaced whole."""
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(summary_table(results, dry))
    with tarfile.open(os.path.join(out, BUNDLE + ".partial"), "w:gz") as tar:
        for name in sorted(os.listdir(out)):
            if not name.startswith(BUNDLE) and os.path.isfile(os.path.join(out, name)):
                tar.add(os.path.join(out, name), arcname=os.path.join("gpu-check", name))
    os.replace(os.path.join(out, BUNDLE + ".partial"), os.path.join(out, BUNDLE))
    if bundle_to and os.path.abspath(bundle_to) != os.path.abspath(out):
        os.makedirs(bundle_to, exist_ok=True)
        for name in ("summary.txt", BUNDLE):
            shutil.copyfile(os.path.join(out, name), os.path.join(bundle_to, name + ".partial"))
            os.replace(os.path.join(bundle_to, name + ".partial"), os.path.join(bundle_to, name))


def log_tail(out: str, name: str, lines: int = 25) -> str:
    with open(os.path.join(out, f"{name}.log"), errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def plan_listing(parts: list[Part]) -> str:
    lines = [f"{'part':<16}{'budget s':>9}{'timeout s':>10}  {'writes (and <part>.log)':<25}what"]
    for p in parts:
        lines.append(f"{p.name:<16}{p.budget_s:>9}{p.timeout_s:>10}  {', '.join(p.writes) or '-':<25}{p.what}")
    lines.append(f"{'total':<16}{sum(p.budget_s for p in parts):>9}{'':>10}  (deadline {DEADLINE_S} s per command)")
    for group, names in GROUPS.items():
        lines.append(f"{'ONLY=' + group:<16}{sum(PARTS[n].budget_s for n in names):>9}{'':>10}  {', '.join(names)}")
    return "\n".join(lines)


# ---- the env part ------------------------------------------------------------------------------------------

def describe_environment() -> None:
    """Print what the numbers depend on: GPU, driver, CUDA, library versions, this checkout."""
    import platform
    from importlib import metadata
    import torch   # here, not at the top: the runner itself never imports torch (no CUDA context of its own)

    print(f"# nanogpt2 gpu-check environment, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"python {platform.python_version()} ({sys.executable}); {platform.platform()}; {os.cpu_count()} CPUs")
    versions = []
    for package in ("torch", "triton", "transformers", "peft", "safetensors", "tiktoken", "numpy", "pytest",
                    "pytest-xdist", "hypothesis", "nanogpt2"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package} (not installed)")
    print("; ".join(versions))
    print(f"torch CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    import nanogpt2
    print(f"nanogpt2 imported from {os.path.dirname(nanogpt2.__file__)}")
    print("environment: " + ", ".join(f"{k}={os.environ.get(k, '')}" for k in
                                       ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES", "TRITON_CACHE_DIR", "OUT")))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i} {p.name}, compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
                  f"{p.total_memory / 2**30:.1f} GiB, bf16 {torch.cuda.is_bf16_supported()}")
    else:
        print("torch.cuda.is_available(): False (no GPU: a DRY run)")
    for argv in (["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,"
                  "power.limit,pstate,temperature.gpu", "--format=csv"], ["nvidia-smi"],
                 ["git", "-C", ROOT, "log", "-1", "--format=commit %H %cd"], ["git", "-C", ROOT, "status", "--short"]):
        print(f"\n$ {shlex.join(argv)}", flush=True)
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            print((r.stdout + r.stderr).rstrip() or f"(no output, exit {r.returncode})")
        except (OSError, subprocess.TimeoutExpired) as e:
            print(f"(not available: {e})")


# ---- command line ------------------------------------------------------------------------------------------

def parse_only(text: str) -> list[Part]:
    names = [n.strip() for n in text.replace(",", " ").split() if n.strip()]
    names = [part for n in names for part in GROUPS.get(n, [n])]   # a group stands for its parts
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown part {', '.join(map(repr, unknown)) or repr(text)}; "
                                         f"the parts: {', '.join(PARTS)}; the groups: {', '.join(GROUPS)}")
    return [p for p in PLAN if p.name in names]   # plan order, whatever order they were named in


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="The parts:\n" + plan_listing(PLAN),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="print the parts and exit")
    ap.add_argument("--only", type=parse_only, default=None, metavar="PART[,PART]",
                    help="run only these parts (in the plan's order)")
    ap.add_argument("--dry", action="store_true", help="the same plan on CPU: tiny shapes, Triton's interpreter")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-out",
                    help="folder for logs, CSVs and summary.txt (default: $OUT, else ./gpu-out)")
    ap.add_argument("--environment", action="store_true", help="print the machine's description (the env part)")
    ap.add_argument("--deadline", type=float, default=DEADLINE_S,
                    help=f"stop the run this many seconds after it started (default {DEADLINE_S}; 0: no deadline)")
    ap.add_argument("--bundle-to", default=None, metavar="DIR",
                    help="also copy summary.txt and gpu-check.tar.gz here after every part")
    args = ap.parse_args(argv)
    if args.list:
        print(plan_listing(PLAN))
        return 0
    if args.environment:
        describe_environment()
        return 0
    out = os.path.abspath(args.out)
    if not args.dry and shutil.which("nvidia-smi") is None:
        print("[gpu-check] no nvidia-smi on PATH: if this machine has no GPU, DRY=1 (--dry) is the CPU plan",
              flush=True)
    parts = args.only or PLAN
    if not args.dry:
        try:
            r = subprocess.run([PY, "-c", "import nanogpt2.kernels"], cwd="/", capture_output=True, text=True,
                               timeout=120)
        except subprocess.TimeoutExpired:
            r = subprocess.CompletedProcess([], 1, "", "the import did not finish in 120 s")
        if r.returncode != 0:   # every part would fail the same way: say so once, before spending device time
            print(f"[gpu-check] {PY} cannot import nanogpt2.kernels:\n{r.stderr.strip()[-1500:]}\n"
                  f"if nanogpt2 is not installed: {PY} -m pip install --no-deps --no-build-isolation -e .",
                  flush=True)
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "preflight.log"), "w") as f:
                f.write(r.stderr)
            write_summary([Result(p, "not run (import)") for p in parts], out, args.dry, args.bundle_to)
            return 2
    deadline = None if args.dry or not args.deadline else args.deadline - (time.monotonic() - START)
    results = run_plan(parts, out, dry=args.dry, deadline_s=deadline, bundle_to=args.bundle_to)
    for r in results:
        if not r.ok and os.path.exists(os.path.join(out, f"{r.part.name}.log")):
            print(f"\n---- {r.part.name}: {r.status}; the end of {r.part.name}.log ----\n"
                  f"{log_tail(out, r.part.name)}", end="")
    print(f"\n{summary_table(results, args.dry)}(logs, CSVs and summary.txt in {out})")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
