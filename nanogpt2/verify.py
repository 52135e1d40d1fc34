"""`nanogpt2 verify`: prove, point by named point, that nanogpt2 computes what transformers computes, and that
its own paths (generate's cached decode, attention backends, low precision) agree with each other.

Each check runs one batch two ways ("paths") and compares every named activation point of hooks.py, in
forward order, plus the logits (and the loss where both paths compute one):

  transformers  nanogpt2 (--attn-implementation, fp32)  vs  transformers (eager, fp32), whose intermediates
                are captured with forward hooks on its modules (HF_POINTS below)
  decode        what generate() runs: the batch's first tokens as a prompt (generation.prefill), the rest
                fed back one token a step through generation.make_step (model.decode_step over the KVCache,
                with generate's weight packing)  vs  the same batch in one forward
  backend       each attention backend in --compare  vs  the first one listed
  dtype         bf16 (or fp16)  vs  fp32, same backend

It prints one summary line per check, a table of max |difference| per point (one row per block unless
--all-points), names the FIRST point where two paths differ beyond the tolerance, and exits with 1 if any
check fails (2 for a request that cannot run here, e.g. triton without CUDA or the interpreter, or no
transformers installed). The batch has a left-padded row, so the attention-mask path is checked too; padding
positions are not compared (their values are meaningless in every implementation).

Attention probabilities (`h.{i}.attn.pattern`) exist only on the eager path: asking any backend for them
runs eager attention (hooks.py). So they are compared against transformers from nanogpt2's eager backend,
and left out of the decode, backend and dtype checks, where they would compare the eager code with itself.

transformers is needed for the transformers check and to build the default random model; with --model and
--checks from decode, backend, dtype, verify runs without it.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional

import torch

from . import generation
from .attention import check_backend, positions_from_mask, resolve_backend
from .dtypes import DTYPES
from .files import CheckpointError, resolve
from .generation import GenerationConfig
from .hooks import activation_names
from .model import GPT2LMHeadModel
from .reference import MissingReference, hf_quiet
from .tokenizer import get_tokenizer

SAMPLE = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
          "foolishness, it was the epoch of belief, it was the epoch of incredulity.")
CHECKS = ("transformers", "decode", "backend", "dtype")
BACKENDS = ("eager", "sdpa", "triton")
# what --dtype accepts: every name dtypes.py knows for a precision below fp32 ("bf16", "bfloat16", "fp16", ...)
LOW_PRECISIONS = tuple(name for name, dt in DTYPES.items() if dt != torch.float32)


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


# The decode check's prompt holds the padded row's padding and its first real token (generate() never feeds
# padding one token at a time: it is always in the prompt), and at least one token is left to feed back. With
# make_batch's rows (T tokens, the second half of them real in row 1) that takes T >= 4.
MIN_DECODE_CONTEXT = 4


def prompt_length(batch: Batch) -> int:
    """P, the decode check's prompt length: the most padded row's padding plus its first real token."""
    return int((~batch.real).sum(-1).max()) + 1


# ---- paths: each returns {point: tensor} in the layouts hooks.py documents, plus "logits" and maybe "loss"

def point_order(n_layer: int) -> list[str]:
    return activation_names(n_layer) + ["logits", "loss"]


def nanogpt2_prefill(model, batch: Batch, backend: str) -> dict[str, torch.Tensor]:
    """Every named point of one forward over the whole batch, (B, T, ...), plus logits (B, T, V) and the loss.
    Patterns only on the eager backend (they would force eager attention on the others, see the module
    docstring)."""
    names = [n for n in model.activation_names() if backend == "eager" or not n.endswith(".attn.pattern")]
    model.set_attn_implementation(backend)
    logits, acts = model.run_with_cache(batch.input_ids, names=names, attention_mask=batch.mask)
    acts["logits"] = logits
    # run_with_cache returns the logits only; the loss compared is forward's own (its shift, ignore_index and
    # fp32 softmax), so it takes a second forward rather than a copy of forward's rule here
    acts["loss"] = model(batch.input_ids, attention_mask=batch.mask, labels=batch.labels).loss
    return acts


@contextmanager
def one_thread_on_cpu(device: torch.device):
    """One intra-op thread on CPU for the one-token steps: a step is hundreds of tiny ops, and where other
    processes keep the cores busy every multi-threaded op waits for all its threads to be scheduled
    (measured, 124M on a shared 2-core machine: 0.8 s a step with 2 threads, 0.1 s with 1). An idle
    many-core machine loses ~1 s in all."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def nanogpt2_decode(model, batch: Batch, backend: str) -> tuple[dict[str, torch.Tensor], int]:
    """The batch through generate()'s own phases; returns ({point: (B, T - P + 1, ...)}, P - 1): every point and
    the logits at positions P - 1 .. T - 1 (those generate() takes a token from), and the first of them.

    The first P tokens are the prompt (prompt_length): checked by generation.prepare and run by
    generation.prefill, whose last-position logits (B, V) give generate() its first token. Then each later
    token is fed back through generation.make_step, the per-token function generate() calls (eager
    model.decode_step over the KVCache), each step giving the points and logits of its position, all under
    the weight packing generate() uses (packed.py, on CPU). The compiled step (compile=True) is left to
    tests/test_compiled_decode.py: its graph is fixed-shape and has no named points to record."""
    model.set_attn_implementation(backend)
    names = [n for n in model.activation_names() if not n.endswith(".attn.pattern")]
    B, T = batch.input_ids.shape
    P = prompt_length(batch)
    cfg = GenerationConfig(max_new_tokens=T - P)   # generate's defaults: eager step, packed weights on CPU
    prompt = generation.prepare(model, batch.input_ids[:, :P], batch.mask[:, :P], cfg)
    cache = generation.new_cache(model, B, T)      # P prompt positions + T - P tokens fed back
    positions = []                                 # one {point: (B, 1, ...)} per compared position
    # generate()'s packing rule, private to generation.py: called, not copied, so the two cannot drift
    with generation.packing(model, cfg, B):
        with model.recording(names) as acts:
            logits = generation.prefill(model, prompt.ids, prompt.mask, cache)          # (B, V) at P - 1
        positions.append({**{k: v[:, -1:] for k, v in acts.items()}, "logits": logits[:, None]})
        step = generation.make_step(model, cache, generation.padding(prompt), cfg)
        with one_thread_on_cpu(model.device):
            for t in range(P, T):
                # the mask covers cached + new positions (generate's: the prompt's padding, then ones)
                mask = None if prompt.mask is None else batch.mask[:, :t + 1]
                with model.recording(names) as acts:
                    logits = step(batch.input_ids[:, t], mask)                          # (B, V) at t
                positions.append({**acts, "logits": logits[:, None]})
    return {name: torch.cat([p[name] for p in positions], dim=1) for name in positions[0]}, P - 1


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


# ---- the checks ---------------------------------------------------------------------------------

class Prefills:
    """nanogpt2's forwards over the whole batch, each (backend, dtype) run once and shared by the checks."""

    def __init__(self, batch: Batch):
        self.batch = batch
        self.runs: dict[tuple[str, torch.dtype], dict[str, torch.Tensor]] = {}

    def __call__(self, model, backend: str) -> dict[str, torch.Tensor]:
        if (backend, model.dtype) not in self.runs:
            self.runs[backend, model.dtype] = nanogpt2_prefill(model, self.batch, backend)
        return self.runs[backend, model.dtype]


@dataclass
class Models:
    """What the checks run: loaded by load_models, each only when a requested check needs it."""
    ours: GPT2LMHeadModel                 # fp32
    backend: str                          # nanogpt2's backend for the transformers, decode and dtype checks
    decode: bool                          # whether the decode check runs
    backends: list[str]                   # the backend check's, the first the reference; [] when not run
    low: Optional[GPT2LMHeadModel]        # the dtype check's low-precision copy
    low_name: str                         # its dtype as the user spelled it ("bf16")
    reference: Optional[torch.nn.Module]  # transformers' GPT2LMHeadModel, fp32, eager attention
    transformers_version: Optional[str]
    notes: list[str] = field(default_factory=list)


def transformers_check(models: Models, prefills: Prefills, tol: Tolerance, order: list[str]) -> Comparison:
    batch = prefills.batch
    ref = transformers_prefill(models.reference, batch)
    ours = dict(prefills(models.ours, models.backend))
    if models.backend != "eager":  # probabilities come from the eager path whichever backend runs
        ours.update({k: v for k, v in prefills(models.ours, "eager").items() if k.endswith(".attn.pattern")})
    return Comparison("transformers", "transformers",
                      f"nanogpt2 {models.backend} fp32 vs transformers {models.transformers_version} eager fp32",
                      tol, compare(ours, ref, batch.real, tol, order))


def decode_check(models: Models, prefills: Prefills, tol: Tolerance, order: list[str]) -> Comparison:
    """generate()'s path against one forward, at the positions generate() takes tokens from (nanogpt2_decode)."""
    batch = prefills.batch
    decoded, start = nanogpt2_decode(models.ours, batch, models.backend)
    # the forward's points at the same positions: (B, T, ...) -> (B, T - start, ...); the loss and the patterns
    # (which put heads before positions) are not among the decoded points
    full = {k: v[:, start:] for k, v in prefills(models.ours, models.backend).items() if k in decoded}
    return Comparison("decode", "decode", f"KVCache, one token a step vs prefill, {models.backend} fp32", tol,
                      compare(decoded, full, batch.real[:, start:], tol, order))


def backend_checks(models: Models, prefills: Prefills, tol: Tolerance, order: list[str]) -> list[Comparison]:
    first, *others = models.backends
    return [Comparison("backend", f"{other}/{first}", f"{other} vs {first}, fp32", tol,
                       compare(prefills(models.ours, other), prefills(models.ours, first), prefills.batch.real,
                               tol, order))
            for other in others]


def dtype_check(models: Models, prefills: Prefills, order: list[str]) -> Comparison:
    tol = TOLERANCES[models.low.dtype]
    rows = compare(prefills(models.low, models.backend), prefills(models.ours, models.backend), prefills.batch.real,
                   tol, order)
    return Comparison("dtype", models.low_name, f"{models.low_name} vs fp32, {models.backend}", tol, rows)


def run_checks(models: Models, batch: Batch, fp32: Tolerance, order: list[str]) -> list[Comparison]:
    """The requested checks in CHECKS order (the table's columns)."""
    prefills = Prefills(batch)
    comparisons = []
    with torch.no_grad():
        if models.reference is not None:
            comparisons.append(transformers_check(models, prefills, fp32, order))
            models.reference = None  # transformers' copy of the weights is not needed again: free it now
        if models.decode:
            comparisons.append(decode_check(models, prefills, fp32, order))
        if models.backends:
            comparisons.extend(backend_checks(models, prefills, fp32, order))
        if models.low is not None:
            comparisons.append(dtype_check(models, prefills, order))
    return comparisons


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


def print_header(models: Models, batch: Batch, fp32: Tolerance) -> None:
    """What ran where, and the tolerances: the lines above the table."""
    device = models.ours.device
    used = f", transformers {models.transformers_version}" if models.transformers_version else ""
    print(f"batch {tuple(batch.input_ids.shape)} with a left-padded row; {device.type} "
          f"({platform.processor() or platform.machine()}), torch {torch.__version__}{used}")
    tolerances = {"fp32": fp32, **({models.low_name: TOLERANCES[models.low.dtype]} if models.low is not None else {})}
    print("tolerance at each point: max |a - b| <= " + ", ".join(f"{t} ({d})" for d, t in tolerances.items()))
    for note in models.notes:
        print(f"note: {note}")
    print()


def print_verdict(comparisons: list[Comparison]) -> int:
    """One line per failed check naming its first divergent point, or one saying all match; the exit status."""
    failed = [c for c in comparisons if c.first_divergence is not None]
    for c in failed:
        r = c.first_divergence
        print(f"verify: {c.check} ({c.title}): first divergence at {r.point}: max |diff| {r.diff:.3e} > "
              f"tolerance {r.tol:.3e} (max |ref| {r.scale:.3g})")
    if not failed:
        print(f"verify: all points match ({len(comparisons)} comparison{'s' * (len(comparisons) != 1)})")
    return 1 if failed else 0


# ---- the command --------------------------------------------------------------------------------

class VerifyError(ValueError):
    """A request verify cannot carry out here (e.g. the triton backend without CUDA); exit status 2."""


def check_request(checks, compare_backends, dtype: str) -> torch.dtype:
    """Refuse bad names before minutes go into building and loading models; returns the low precision."""
    unknown = [c for c in checks if c not in CHECKS]
    if unknown or not checks:
        raise VerifyError(f"unknown check(s) {unknown or 'none given'}: choose from {', '.join(CHECKS)}")
    for b in compare_backends or ():
        if b not in BACKENDS:
            raise VerifyError(f"--compare: unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    if compare_backends is not None and "backend" in checks and len(compare_backends) < 2:
        raise VerifyError(f"--compare needs at least two backends, got {list(compare_backends)}")
    if dtype not in LOW_PRECISIONS:
        raise VerifyError(f"dtype {dtype!r} is not a low precision to compare with fp32: choose from "
                          f"{', '.join(LOW_PRECISIONS)}")
    return DTYPES[dtype]


def load_transformers(checks, model_name: Optional[str]):
    """The transformers module where this run needs it (the transformers check; building the default model),
    else None. Missing: MissingReference naming the install command, and what runs without it."""
    if "transformers" not in checks and model_name is not None:
        return None
    try:
        return hf_quiet()
    except MissingReference as e:
        raise MissingReference(f"{e} (or run without it: --model NAME --checks decode,backend,dtype)") from None


def random_hf_checkpoint(directory: str, seed: int = 0) -> str:
    """A randomly initialised 124M GPT-2, built and saved by transformers (what `verify` loads by default)."""
    transformers = hf_quiet()
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    model.save_pretrained(directory)
    return directory


def triton_unavailable(head_dim: int, device) -> Optional[str]:
    """Why the triton backend cannot run on this device and head dim, or None when it can."""
    try:
        resolve_backend("triton", torch.empty(1, 1, 1, head_dim, device=device))
    except ValueError as e:
        return str(e)
    return None


def backends_to_compare(compare_backends, head_dim: int, device, notes: list[str]) -> list[str]:
    """The backend check's backends: as asked (triton refused where it cannot run), else eager, sdpa and
    triton where it can run (a note says when it cannot)."""
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


def load_models(model_name: Optional[str], checks, attn_implementation: str, compare_backends,
                low_dtype: torch.dtype, low_name: str, device: torch.device) -> Models:
    """nanogpt2 in fp32 (and in the low precision for the dtype check), transformers in fp32 with eager
    attention for the transformers check; model_name None: a random 124M that transformers builds."""
    check_backend(attn_implementation)
    transformers = load_transformers(checks, model_name)
    with tempfile.TemporaryDirectory() as tmp:  # the random checkpoint lives until every model is loaded
        if model_name is None:
            print("model: randomly initialised GPT-2 124M (built by transformers, saved as safetensors)")
            model_name = random_hf_checkpoint(os.path.join(tmp, "gpt2-random"))
        else:
            print(f"model: {model_name}")
        ours = GPT2LMHeadModel.from_pretrained(model_name, device=device).eval()
        cfg = ours.config
        if "decode" in checks and cfg.n_positions < MIN_DECODE_CONTEXT:
            raise VerifyError(f"the decode check needs a context of at least {MIN_DECODE_CONTEXT} positions (a "
                              f"padded prompt, then tokens fed back); this model has n_positions="
                              f"{cfg.n_positions}: leave decode out of --checks")
        try:  # the backend "auto" picks for these tensors, so the report names what actually ran
            backend = resolve_backend(attn_implementation, torch.empty(1, 1, 1, cfg.head_dim, device=device))
        except ValueError as e:
            raise VerifyError(str(e)) from None
        notes: list[str] = []
        backends = backends_to_compare(compare_backends, cfg.head_dim, device, notes) if "backend" in checks else []
        low = (GPT2LMHeadModel.from_pretrained(model_name, dtype=low_dtype, device=device).eval()
               if "dtype" in checks else None)
        reference = None
        if "transformers" in checks:
            reference = transformers.GPT2LMHeadModel.from_pretrained(
                resolve(model_name).directory, dtype=torch.float32, attn_implementation="eager").to(device).eval()
    return Models(ours, backend, "decode" in checks, backends, low, low_name, reference,
                  transformers.__version__ if transformers else None, notes)


def verify(model_name: Optional[str] = None, atol: float = TOLERANCES[torch.float32].atol,
           attn_implementation: str = "sdpa", checks=CHECKS, compare_backends=None, dtype: str = "bf16",
           device=None, all_points: bool = False) -> int:
    """Run the checks (see the module docstring), print the report; 0 when every point agrees, 1 when not.

    compare_backends: backends for the backend check, the first the reference; None means eager and sdpa,
    plus triton where it can run. Raises VerifyError for a request that cannot run here, naming why, and
    MissingReference when the run needs transformers and it is not installed.
    """
    low_dtype = check_request(checks, compare_backends, dtype)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    fp32 = Tolerance(atol, TOLERANCES[torch.float32].rtol)
    models = load_models(model_name, checks, attn_implementation, compare_backends, low_dtype, dtype, device)
    cfg = models.ours.config
    batch = make_batch(cfg.vocab_size, cfg.n_positions).to(device)
    order = point_order(cfg.n_layer)
    print_header(models, batch, fp32)
    comparisons = run_checks(models, batch, fp32, order)
    print_report(comparisons, order, all_points)
    print()
    return print_verdict(comparisons)


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
    parser.add_argument("--dtype", default="bf16", choices=LOW_PRECISIONS,
                        help="the low precision the dtype check compares with fp32")
    parser.add_argument("--atol", type=float, default=TOLERANCES[torch.float32].atol,
                        help="absolute part of the fp32 tolerance (plus %g * the point's max |value|)"
                             % TOLERANCES[torch.float32].rtol)
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available, else cpu)")
    parser.add_argument("--all-points", action="store_true",
                        help="one table row per named point (default: one row per block)")


def main(args: argparse.Namespace) -> int:
    def split(s):
        return [x.strip() for x in s.split(",") if x.strip()]

    try:
        return verify(args.model, atol=args.atol, attn_implementation=args.attn_implementation,
                      checks=split(args.checks), compare_backends=split(args.compare) if args.compare else None,
                      dtype=args.dtype, device=args.device, all_points=args.all_points)
    # a request that cannot run here, a model that cannot load, or no transformers where the run needs it:
    # one line saying what to change, not a traceback
    except (VerifyError, CheckpointError, MissingReference) as e:
        print(f"nanogpt2 verify: error: {e}", file=sys.stderr)
        return 2
