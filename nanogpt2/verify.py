"""`nanogpt2 verify`: prove, point by named point, that nanogpt2 computes what transformers computes, and that
its own paths (cached decode, attention backends, low precision) agree with each other.

Each check runs one batch two ways ("paths") and compares every named activation point of hooks.py, in
forward order, plus the logits (and the loss where both paths compute one):

  transformers  nanogpt2 (--attn-implementation, fp32)  vs  transformers (eager, fp32), whose intermediates
                are captured with forward hooks on its modules (HF_POINTS below)
  decode        the batch fed one token at a time through a KVCache  vs  the same batch in one prefill
  backend       each attention backend in --compare  vs  the first one listed
  dtype         bf16 (or fp16)  vs  fp32, same backend

It prints one summary line per check, a table of max |difference| per point (one row per block unless
--all-points), names the FIRST point where two paths differ beyond the tolerance, and exits with 1 if any
check fails (2 for a request that cannot run here, e.g. triton without CUDA or the interpreter). The batch has a left-padded row, so the attention-mask path is checked too; padding positions
are not compared (their values are meaningless in every implementation).

Attention probabilities (`h.{i}.attn.pattern`) exist only on the eager path: asking any backend for them
runs eager attention (hooks.py). So they are compared against transformers from nanogpt2's eager backend,
and left out of the decode, backend and dtype checks, where they would compare the eager code with itself.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch

SAMPLE = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
          "foolishness, it was the epoch of belief, it was the epoch of incredulity.")
CHECKS = ("transformers", "decode", "backend", "dtype")
BACKENDS = ("eager", "sdpa", "triton")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---- tolerances ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tolerance:
    """Two paths agree at a point when max |a - b| <= atol + rtol * max |b| over that point (b: the reference).

    The relative part is scaled by the point's largest magnitude, one number per tensor: an elementwise rtol
    would forgive nothing near zero and too much on outliers. It matters for trained GPT-2s, whose residual
    stream has a few dimensions in the hundreds to thousands, where even fp32 rounding exceeds 1e-4.
    """
    atol: float
    rtol: float

    def at(self, scale: float) -> float:
        return self.atol + self.rtol * scale

    def __str__(self) -> str:
        return f"{self.atol:.0e} + {self.rtol:.0e}*max|ref|"


# Per dtype of the less precise path. fp32: correct implementations differ only in summation order
# (~1e-7 relative per op); 1e-4 absolute is three orders above that and still catches a real bug, e.g. a
# missing bias or a wrong scale. bf16 keeps 8 significant bits (relative rounding 2^-8 = 3.9e-3 per
# operation) and fp16 11 bits (4.9e-4); errors compound through the blocks, so the budget is ~10 roundings
# of the point's largest value. Measured (bf16 on CPU): a random 124M uses 40% of it at its worst point, a
# random model with 5x GPT-2's init std 75% (sharper attention amplifies rounding). Attention that is nearly
# tied between two keys can flip in low precision and exceed any such budget: a dtype failure on a
# trained model is a prompt to look (--all-points), where a transformers or decode failure is a bug.
TOLERANCES = {
    torch.float32: Tolerance(atol=1e-4, rtol=1e-5),
    torch.bfloat16: Tolerance(atol=1e-2, rtol=4e-2),
    torch.float16: Tolerance(atol=2e-3, rtol=5e-3),
}


# ---- the batch ----------------------------------------------------------------------------------

@dataclass
class Batch:
    input_ids: torch.Tensor   # (B, T)
    mask: torch.Tensor        # (B, T) 1 = real token; row 1 is left-padded
    labels: torch.Tensor      # (B, T) input_ids with -100 where no loss is taken
    real: torch.Tensor        # (B, T) bool: the positions compared

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.mask, self.labels, self.real)))


def make_batch(vocab_size: int, n_positions: int, max_len: int = 32) -> Batch:
    """Two rows of SAMPLE: the full text, and its first half left-padded to the same length."""
    from .tokenizer import get_tokenizer
    ids = get_tokenizer().encode(SAMPLE)
    ids = [i % vocab_size for i in ids][: min(max_len, n_positions)]
    short = ids[: max(1, len(ids) // 2)]
    pad = len(ids) - len(short)
    input_ids = torch.tensor([ids, [0] * pad + short])
    mask = torch.ones_like(input_ids)
    mask[1, :pad] = 0
    labels = input_ids.masked_fill(mask == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)  # no loss on logits at padding
    return Batch(input_ids, mask, labels, mask.bool())


# ---- paths: each returns {point: tensor} in the layouts hooks.py documents, plus "logits" and maybe "loss"

def point_order(n_layer: int) -> list[str]:
    from .hooks import activation_names
    return activation_names(n_layer) + ["logits", "loss"]


def nanogpt2_prefill(model, batch: Batch, backend: str) -> dict[str, torch.Tensor]:
    """Every named point of one forward over the whole batch. Patterns only on the eager backend (they
    would force eager attention on the others, see the module docstring)."""
    names = [n for n in model.activation_names() if backend == "eager" or not n.endswith(".attn.pattern")]
    model.set_attn_implementation(backend)
    acts: dict[str, torch.Tensor] = {}

    def store(x, name):
        acts[name] = x.detach()

    with model.hooks({name: store for name in names}):
        out = model(batch.input_ids, attention_mask=batch.mask, labels=batch.labels)
    acts["logits"], acts["loss"] = out.logits, out.loss
    return acts


def nanogpt2_decode(model, batch: Batch, backend: str) -> dict[str, torch.Tensor]:
    """Feed the batch one token at a time through a KVCache; each step's points are (B, 1, ...) at the new
    position, concatenated along T into the prefill's layout."""
    from .cache import KVCache
    model.set_attn_implementation(backend)
    names = [n for n in model.activation_names() if not n.endswith(".attn.pattern")]
    B, T = batch.input_ids.shape
    cache = KVCache.for_model(model.config, B, max_len=T, dtype=model.dtype, device=model.device)
    steps = []
    # One intra-op thread on CPU: a one-token step is hundreds of tiny ops, and where other processes keep the
    # cores busy every multi-threaded op waits for all its threads to be scheduled (measured, 124M on a shared
    # 2-core machine: 0.8 s a step with 2 threads, 0.1 s with 1). An idle many-core machine loses ~1 s in all.
    threads = torch.get_num_threads()
    if model.device.type == "cpu":
        torch.set_num_threads(1)
    try:
        for t in range(T):
            # the mask covers cached + new positions, so row 1's padding stays masked and positions stay right
            logits, acts = model.run_with_cache(batch.input_ids[:, t:t + 1], names=names,
                                                attention_mask=batch.mask[:, :t + 1], past_key_values=cache)
            acts["logits"] = logits
            steps.append(acts)
    finally:
        torch.set_num_threads(threads)
    return {name: torch.cat([s[name] for s in steps], dim=1) for name in steps[0]}


# Where each named point of block i lives in transformers' GPT2Block: (point, submodule, what to take).
# "out": the module's output, "in": its first input (a forward pre-hook). resid_mid is the input of ln_2,
# which is the sum x + attn(ln_1(x)) that transformers itself computed.
HF_POINTS = (
    ("ln_1", "ln_1", "out"),
    ("attn.qkv", "attn.c_attn", "out"),     # (B, T, 3C) -> q, k, v, each (B, T, H, D)
    ("attn.pattern", "attn", "out"),        # the attention module returns (output, probabilities)
    ("attn.z", "attn.c_proj", "in"),        # (B, T, C) heads side by side -> (B, T, H, D)
    ("attn.out", "attn.c_proj", "out"),
    ("resid_mid", "ln_2", "in"),
    ("ln_2", "ln_2", "out"),
    ("mlp.pre", "mlp.c_fc", "out"),
    ("mlp.post", "mlp.act", "out"),
    ("mlp.out", "mlp.c_proj", "out"),
    ("resid_post", "", "out"),
)


def transformers_prefill(hf_model, batch: Batch) -> dict[str, torch.Tensor]:
    """transformers' intermediates at nanogpt2's named points, captured with hooks on its modules."""
    from .attention import positions_from_mask
    cfg = hf_model.config
    H, D = cfg.n_head, cfg.n_embd // cfg.n_head
    acts: dict[str, torch.Tensor] = {}

    def saver(name: str, kind: str):
        def save(x: torch.Tensor):
            if name.endswith("attn.qkv"):  # split as transformers does: c_attn(x).split(n_embd, dim=2)
                for part, t in zip("qkv", x.split(cfg.n_embd, dim=2)):
                    acts[name[:-3] + part] = t.reshape(*t.shape[:2], H, D)
            elif name.endswith("attn.z"):
                acts[name] = x.reshape(*x.shape[:2], H, D)
            else:
                acts[name] = x

        def from_input(module, args):
            save(args[0].detach())

        def from_output(module, args, out):
            if isinstance(out, tuple):  # the attention returns (output, probabilities); older blocks (output, ...)
                out = out[1] if name.endswith(".attn.pattern") else out[0]
            save(out.detach())

        return from_input if kind == "in" else from_output

    handles = []
    try:
        for i, block in enumerate(hf_model.transformer.h):
            for point, path, kind in HF_POINTS:
                module = block.get_submodule(path) if path else block
                hook = saver(f"h.{i}.{point}", kind)
                handles.append(module.register_forward_pre_hook(hook) if kind == "in" else
                               module.register_forward_hook(hook))
        handles.append(hf_model.transformer.ln_f.register_forward_hook(saver("ln_f", "out")))
        pos = positions_from_mask(batch.mask, 0, batch.input_ids.shape[1], batch.input_ids.device)
        out = hf_model(batch.input_ids, attention_mask=batch.mask, position_ids=pos, labels=batch.labels,
                       output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    acts["embed"] = out.hidden_states[0]  # wte + wpe (+ dropout, a no-op in eval): the first block's input
    acts["logits"], acts["loss"] = out.logits, out.loss
    return acts


# ---- comparing two paths ------------------------------------------------------------------------

@dataclass
class Row:
    point: str
    diff: float    # max |a - b| over the real positions
    scale: float   # max |b|, which the tolerance's relative part scales
    tol: float

    @property
    def ok(self) -> bool:
        return self.diff <= self.tol  # False for NaN: a NaN is never agreement

    @property
    def used(self) -> float:
        """The share of the tolerance this point used (> 1: diverged; inf for NaN)."""
        if self.diff != self.diff:
            return float("inf")
        return self.diff / self.tol if self.tol > 0 else (0.0 if self.diff == 0 else float("inf"))


@dataclass
class Comparison:
    check: str                 # "transformers", "decode", "backend", "dtype"
    column: str                # short header for the table
    title: str                 # what was compared with what
    tolerance: Tolerance
    rows: list[Row]

    @property
    def first_divergence(self) -> Optional[Row]:
        return next((r for r in self.rows if not r.ok), None)


def _real(name: str, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """The entries at real (non-padding) query positions: (N, ...) from (B, T, ...), or from (B, H, T, S)."""
    if x.dim() == 0:  # the loss
        return x
    if name.endswith(".attn.pattern"):
        return x.transpose(1, 2)[real]
    return x[real]


def compare(a: dict, b: dict, real: torch.Tensor, tolerance: Tolerance, order: list[str]) -> list[Row]:
    """One Row per point both paths have, in forward order. b is the reference."""
    rows = []
    for name in order:
        if name not in a or name not in b or a[name] is None or b[name] is None:
            continue
        x, y = _real(name, a[name], real).float(), _real(name, b[name], real).float()
        if x.shape != y.shape:
            raise RuntimeError(f"verify: {name} has shape {tuple(x.shape)} on one path and {tuple(y.shape)} "
                               "on the other")
        diff = (x - y).abs().max().item()
        scale = y.abs().max().item()
        rows.append(Row(name, diff, scale, tolerance.at(scale)))
    return rows


# ---- the report ---------------------------------------------------------------------------------

def _group(point: str, all_points: bool) -> str:
    """The table row a point is reported in: itself, or its block ("h.3") when rows are per layer."""
    if all_points or not point.startswith("h."):
        return point
    return ".".join(point.split(".")[:2])


def print_report(comparisons: list[Comparison], order: list[str], all_points: bool) -> None:
    if not comparisons:
        return
    title_w = max(len(c.title) for c in comparisons) + 2
    print(f"{'check':<14}{'paths':<{title_w}}{'points':>6}  {'worst point':<20}{'|diff|':>9}{'tol':>9}  result")
    for c in comparisons:
        # the point that used the largest share of its tolerance (tolerances differ from point to point)
        worst = max(c.rows, key=lambda r: r.used)
        bad = c.first_divergence
        result = "ok" if bad is None else f"DIVERGES at {bad.point}"
        print(f"{c.check:<14}{c.title:<{title_w}}{len(c.rows):>6}  {worst.point:<20}{worst.diff:>9.1e}"
              f"{worst.tol:>9.1e}  {result}")

    # one row per point (or block), one column per comparison; a cell holds the max |diff| of its points,
    # and FAIL when any of them is beyond its tolerance
    widths = [max(9, len(c.column)) + 2 for c in comparisons]
    print()
    print(f"{'point':<20}" + "".join(f"{c.column:>{w}}     " for c, w in zip(comparisons, widths)).rstrip())
    for group in dict.fromkeys(_group(p, all_points) for p in order):
        cells = []
        for c, w in zip(comparisons, widths):
            rows = [r for r in c.rows if _group(r.point, all_points) == group]
            if not rows:
                cells.append(f"{'-':>{w}}     ")
                continue
            diffs = [r.diff for r in rows]
            diff = float("nan") if any(d != d for d in diffs) else max(diffs)
            cells.append(f"{diff:>{w}.1e}" + ("     " if all(r.ok for r in rows) else " FAIL"))
        if any(cell.strip() != "-" for cell in cells):
            print(f"{group:<20}" + "".join(cells).rstrip())


# ---- the command --------------------------------------------------------------------------------

class VerifyError(ValueError):
    """A request verify cannot carry out here (e.g. the triton backend without CUDA); exit status 2."""


def random_hf_checkpoint(directory: str, seed: int = 0) -> str:
    """A randomly initialised 124M GPT-2, built and saved by transformers (what `verify` loads by default)."""
    import transformers
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    model.save_pretrained(directory)
    return directory


def quiet_transformers():
    """transformers' progress bars and advisory logs would interleave with our table."""
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def triton_unavailable(head_dim: int, device) -> Optional[str]:
    """Why the triton backend cannot run on this device and head dim, or None when it can."""
    from .attention import resolve_backend
    try:
        resolve_backend("triton", torch.empty(1, 1, 1, head_dim, device=device))
    except ValueError as e:
        return str(e)
    return None


def _check_request(checks, compare_backends, dtype) -> None:
    """Refuse bad names before minutes go into building and loading models."""
    unknown = [c for c in checks if c not in CHECKS]
    if unknown or not checks:
        raise VerifyError(f"unknown check(s) {unknown or 'none given'}: choose from {', '.join(CHECKS)}")
    for b in compare_backends or ():
        if b not in BACKENDS:
            raise VerifyError(f"--compare: unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    if compare_backends is not None and "backend" in checks and len(compare_backends) < 2:
        raise VerifyError(f"--compare needs at least two backends, got {list(compare_backends)}")
    if dtype not in DTYPES or dtype == "fp32":
        raise VerifyError(f"dtype {dtype!r} is not a low precision to compare with fp32: choose bf16 or fp16")


def _backends_to_compare(compare_backends, head_dim: int, device, notes: list[str]) -> list[str]:
    if compare_backends is not None:
        why = triton_unavailable(head_dim, device) if "triton" in compare_backends else None
        if why:
            raise VerifyError(f"--compare lists triton, which cannot run here: {why}")
        return list(compare_backends)
    if triton_unavailable(head_dim, device):
        notes.append("backend check without triton: it runs on CUDA, or on CPU under TRITON_INTERPRET=1, "
                     "for head dim 16/32/64/128")
        return ["eager", "sdpa"]
    return ["eager", "sdpa", "triton"]


def verify(model_name: Optional[str] = None, atol: float = TOLERANCES[torch.float32].atol,
           attn_implementation: str = "sdpa", checks=CHECKS, compare_backends=None, dtype: str = "bf16",
           device=None, all_points: bool = False) -> int:
    """Run the checks (see the module docstring), print the report; 0 when every point agrees, 1 when not.

    compare_backends: backends for the backend check, the first the reference; None means eager and sdpa,
    plus triton where it can run. Raises VerifyError for a request that cannot run here, naming why.
    """
    _check_request(checks, compare_backends, dtype)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    transformers = quiet_transformers()
    from .attention import check_backend, resolve_backend
    from .model import GPT2LMHeadModel
    from .files import resolve
    check_backend(attn_implementation)
    fp32 = Tolerance(atol, TOLERANCES[torch.float32].rtol)
    low_dtype = DTYPES[dtype]
    notes: list[str] = []

    # ---- load: nanogpt2 in fp32 (and the low precision), transformers in fp32 with eager attention
    with tempfile.TemporaryDirectory() as tmp:  # the random checkpoint lives until every model is loaded
        if model_name is None:
            print("model: randomly initialised GPT-2 124M (built by transformers, saved as safetensors)")
            model_name = random_hf_checkpoint(os.path.join(tmp, "gpt2-random"))
        else:
            print(f"model: {model_name}")
        ours = GPT2LMHeadModel.from_pretrained(model_name, device=device).eval()
        cfg = ours.config
        try:  # the backend "auto" picks for these tensors, so the report names what actually ran
            main_backend = resolve_backend(attn_implementation, torch.empty(1, 1, 1, cfg.head_dim, device=device))
        except ValueError as e:
            raise VerifyError(str(e)) from None
        backends = _backends_to_compare(compare_backends, cfg.head_dim, device, notes) if "backend" in checks else []
        low = (GPT2LMHeadModel.from_pretrained(model_name, dtype=low_dtype, device=device).eval()
               if "dtype" in checks else None)
        hf_model = (transformers.GPT2LMHeadModel.from_pretrained(resolve(model_name).directory, dtype=torch.float32,
                                                                 attn_implementation="eager").to(device).eval()
                    if "transformers" in checks else None)

    batch = make_batch(cfg.vocab_size, cfg.n_positions).to(device)
    order = point_order(cfg.n_layer)
    print(f"batch {tuple(batch.input_ids.shape)} with a left-padded row; {device.type} "
          f"({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    tolerances = {"fp32": fp32, **({dtype: TOLERANCES[low_dtype]} if low is not None else {})}
    print("tolerance at each point: max |a - b| <= " + ", ".join(f"{t} ({d})" for d, t in tolerances.items()))
    for note in notes:
        print(f"note: {note}")
    print()

    # ---- run: the checks share nanogpt2's prefills, so each (backend, dtype) runs once
    prefills: dict[tuple[str, torch.dtype], dict] = {}

    def prefill(backend: str, model=ours) -> dict:
        if (backend, model.dtype) not in prefills:
            prefills[backend, model.dtype] = nanogpt2_prefill(model, batch, backend)
        return prefills[backend, model.dtype]

    comparisons = []
    with torch.no_grad():
        if "transformers" in checks:
            ref = transformers_prefill(hf_model, batch)
            ours_acts = dict(prefill(main_backend))
            if main_backend != "eager":  # probabilities come from the eager path whichever backend runs
                ours_acts.update({k: v for k, v in prefill("eager").items() if k.endswith(".attn.pattern")})
            comparisons.append(Comparison(
                "transformers", "transformers",
                f"nanogpt2 {main_backend} fp32 vs transformers {transformers.__version__} eager fp32",
                fp32, compare(ours_acts, ref, batch.real, fp32, order)))
            del hf_model, ref
        if "decode" in checks:
            rows = compare(nanogpt2_decode(ours, batch, main_backend), prefill(main_backend), batch.real, fp32, order)
            comparisons.append(Comparison("decode", "decode",
                                          f"KVCache, one token a step vs prefill, {main_backend} fp32", fp32, rows))
        for other in backends[1:]:
            rows = compare(prefill(other), prefill(backends[0]), batch.real, fp32, order)
            comparisons.append(Comparison("backend", f"{other}/{backends[0]}", f"{other} vs {backends[0]}, fp32",
                                          fp32, rows))
        if low is not None:
            tol = TOLERANCES[low_dtype]
            rows = compare(prefill(main_backend, low), prefill(main_backend), batch.real, tol, order)
            comparisons.append(Comparison("dtype", dtype, f"{dtype} vs fp32, {main_backend}", tol, rows))

    # ---- report
    print_report(comparisons, order, all_points)
    print()
    failed = [c for c in comparisons if c.first_divergence is not None]
    for c in failed:
        r = c.first_divergence
        print(f"verify: {c.check} ({c.title}): first divergence at {r.point}: max |diff| {r.diff:.3e} > "
              f"tolerance {r.tol:.3e} (max |ref| {r.scale:.3g})")
    if not failed:
        print(f"verify: all points match ({len(comparisons)} comparison{'s' * (len(comparisons) != 1)})")
    return 1 if failed else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `nanogpt2 verify` flags; defaults are verify()'s."""
    parser.add_argument("--model", default=None,
                        help="local directory, bundled name or hub id (default: a random 124M GPT-2 built by "
                             "transformers)")
    parser.add_argument("--checks", default=",".join(CHECKS),
                        help=f"comma-separated checks to run, from {','.join(CHECKS)} (default: all)")
    parser.add_argument("--attn-implementation", default="sdpa", choices=["auto", "sdpa", "eager", "triton"],
                        help="nanogpt2's attention backend for the transformers, decode and dtype checks")
    parser.add_argument("--compare", default=None, metavar="B1,B2[,...]",
                        help="backends for the backend check, each against the first (default: eager,sdpa, "
                             "plus triton where it can run: CUDA, or TRITON_INTERPRET=1 on CPU)")
    parser.add_argument("--dtype", default="bf16", choices=[d for d in DTYPES if d != "fp32"],
                        help="the low precision the dtype check compares with fp32")
    parser.add_argument("--atol", type=float, default=TOLERANCES[torch.float32].atol,
                        help="absolute part of the fp32 tolerance (plus %g * the point's max |value|)"
                             % TOLERANCES[torch.float32].rtol)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available, else cpu)")
    parser.add_argument("--all-points", action="store_true",
                        help="one table row per named point (default: one row per block)")


def main(args: argparse.Namespace) -> int:
    from .files import CheckpointError

    def split(s):
        return [x.strip() for x in s.split(",") if x.strip()]

    try:
        return verify(args.model, atol=args.atol, attn_implementation=args.attn_implementation,
                      checks=split(args.checks), compare_backends=split(args.compare) if args.compare else None,
                      dtype=args.dtype, device=args.device, all_points=args.all_points)
    except (VerifyError, CheckpointError) as e:  # a request that cannot run here, or a model that cannot load
        print(f"nanogpt2 verify: error: {e}", file=sys.stderr)
        return 2
