"""Activation patching, batched: which activations carry the difference between a clean and a corrupted prompt.

Run the model on a clean prompt and on a corrupted one of the same length (say "... John gave the bag to" with
the names swapped). Then, cell by cell, rerun the corrupted prompt with one activation copied from the clean run
(one layer's residual stream at one position, one head's output, ...) and read a metric off the logits (the logit
difference of the right and wrong answer). A cell whose patch restores the clean metric carries the information.
`into="clean"` runs the reverse: corrupted activations copied into the clean run (what a patch breaks).

    result = patch(model, clean, corrupted, logit_diff(right, wrong))              # [layer, pos], resid_pre
    result = patch(model, clean, corrupted, metric, "attn.z", by_position=False)   # [layer, head]
    result = attribution_patch(model, clean, corrupted, metric, "attn.z")          # [layer, pos, head], estimated
    result.values, result.axes, result.labels, result.normalized()

Points (the per-block names of hooks.py, without "h.{i}."): `resid_pre` (the residual stream entering block l:
the `embed` point for l = 0, `h.{l-1}.resid_post` after), any other block point (`attn.out`, `mlp.out`,
`resid_mid`, ...), and the per-head points `attn.q/k/v/z` (B, T, H, D) and `attn.pattern` (B, H, T, S), whose
cells are (layer, head) pairs. A pattern's position is its query position.

`patch` puts many cells into the batch dimension of one forward, and runs only what a cell can change:

  * a patch at block l changes nothing before block l: a row starts at block l from the corrupted run's cached
    resid_pre, instead of recomputing blocks 0..l-1;
  * a patch at position p changes nothing at positions before p (attention is causal): a row computes positions
    p..T-1 only, attending to the corrupted run's cached keys and values at positions 0..p-1;
  * the cells of one position p share their length, so they run as one batch: rows join it at their own block
    (the batch grows from block to block), and leave it together after the last block;
  * the final hidden states of every position's batch go through the unembedding (V x C, the largest matrix) in
    one matmul, chunked only by the memory budget.

For resid_pre by position over all layers this does about a quarter of the block work of one forward per cell
(sum over l, p of (L-l)(T-p) ≈ L²T²/4), in L·T block calls instead of L²·T. `patch_naive` is that one forward per
cell, with a hook: the definition `patch` is tested against (equal within fp32 rounding).

`attribution_patch` is the fast first pass (Nanda, "Attribution patching", 2023; Syed et al., "Attribution
Patching Outperforms Automated Circuit Discovery", 2023): one forward and one backward of the corrupted run
estimate every cell at once, to first order, as (clean - corrupted activation) · ∂metric/∂activation. It is a
linear estimate: good where a patch moves the activation a little, poor where the metric saturates (a large
residual-stream patch); BENCHMARKS.md ("Activation patching") reports its correlation with real patching.

Padded batches: one `attention_mask` (B, T) serves both prompts, so row b of clean and of corrupted must have the
same padding. Positions are columns of the padded (B, T) tensor; with left padding, "the last token" is the same
column in every row. A cell at a padding column changes nothing a real token sees (no real query attends to
padding), so its value is the unpatched metric.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from .attention import AttentionMask
from .hooks import BLOCK_POINTS
from .inputs import check_mask_shape, check_token_ids

POINTS = ("resid_pre",) + BLOCK_POINTS
# per-head points: (position dim, head dim) of the tensor a hook sees there (hooks.py has the shapes)
HEAD_DIMS = {"attn.q": (1, 2), "attn.k": (1, 2), "attn.v": (1, 2), "attn.z": (1, 2), "attn.pattern": (2, 1)}
DIRECTIONS = ("corrupted", "clean")
DEFAULT_MAX_MEMORY = 1 << 30   # bytes of activations one batched forward may hold (estimated; see _row_bytes)

Metric = Callable[[torch.Tensor], Union[torch.Tensor, float]]


def _resid_pre_name(layer: int) -> str:
    """The residual stream entering block `layer`: the embedding output, or the previous block's output."""
    return "embed" if layer == 0 else f"h.{layer - 1}.resid_post"


# ---- the result -----------------------------------------------------------------------------------------

@dataclass
class PatchResult:
    """What `patch` and `attribution_patch` return: the metric of each patched run, with its axes named.

    `values[l, p]` (or `[l, h]`, `[l, p, h]`, `[l]`) is the metric of the target run with that one cell patched;
    for `attribution_patch` it is the estimate of it (target metric + the first-order change), so both compare
    directly. `clean` and `corrupted` are the metric of the two unpatched runs.
    """
    values: torch.Tensor              # float32, on the CPU; one size per axis
    axes: tuple[str, ...]             # ("layer", "pos"), ("layer", "head"), ("layer", "pos", "head"), ("layer",)
    labels: dict[str, list[str]]      # axis -> one label per index (set labels["pos"] to token strings to print them)
    point: str                        # "resid_pre", "attn.z", ...
    clean: float
    corrupted: float
    into: str = "corrupted"           # the run that was patched
    method: str = "activation"        # or "attribution" (the gradient estimate)

    def normalized(self) -> torch.Tensor:
        """(values - corrupted) / (clean - corrupted): 0 where a patched run scores like the corrupted run, 1 where
        it scores like the clean one (whichever run was patched)."""
        return (self.values - self.corrupted) / (self.clean - self.corrupted)

    def __str__(self) -> str:
        """A fixed-width grid for 1-D and 2-D results (rows: the first axis); the tensor for 3-D."""
        head = (f"{self.method} patching of {self.point} into the {self.into} run; metric clean {self.clean:.4g}, "
                f"corrupted {self.corrupted:.4g}; axes {self.axes}")
        if self.values.dim() > 2:
            return f"{head}\n{self.values}"
        values = self.values if self.values.dim() == 2 else self.values[:, None]
        cols = self.labels[self.axes[1]] if self.values.dim() == 2 else ["value"]
        rows = [f"{self.axes[0]:>8}" + "".join(f"{c[:9]:>10}" for c in cols)]
        for label, row in zip(self.labels[self.axes[0]], values.tolist()):
            rows.append(f"{label[:8]:>8}" + "".join(f"{v:>10.4g}" for v in row))
        return head + "\n" + "\n".join(rows)


# ---- what a caller passes, checked once -----------------------------------------------------------------

@dataclass
class _Job:
    """One patching experiment, validated: which run gives activations, which is patched, at which cells."""
    source: torch.Tensor                  # (B, T) ids whose activations are copied
    target: torch.Tensor                  # (B, T) ids of the run that is patched
    mask: Optional[torch.Tensor]          # (B, T) 0/1, shared by both runs, or None
    point: str
    by_position: bool
    into: str
    kept: int                             # logits positions the metric sees: the last `kept` of T
    n_layer: int
    n_head: int
    cells: list = field(default_factory=list)   # (layer, pos or None, head or None), in result order

    @property
    def B(self) -> int:
        return self.target.shape[0]

    @property
    def T(self) -> int:
        return self.target.shape[1]

    @property
    def per_head(self) -> bool:
        return self.point in HEAD_DIMS

    def axes(self) -> tuple[str, ...]:
        return ("layer",) + (("pos",) if self.by_position else ()) + (("head",) if self.per_head else ())

    def shape(self) -> tuple[int, ...]:
        sizes = {"layer": self.n_layer, "pos": self.T, "head": self.n_head}
        return tuple(sizes[a] for a in self.axes())

    def hook_name(self, layer: int) -> str:
        """The named point (hooks.py) that is patched for a cell at `layer`."""
        return _resid_pre_name(layer) if self.point == "resid_pre" else f"h.{layer}.{self.point}"

    def result(self, values: torch.Tensor, clean: float, corrupted: float, method: str) -> PatchResult:
        labels = {"layer": [str(i) for i in range(self.n_layer)], "pos": [str(p) for p in range(self.T)],
                  "head": [str(h) for h in range(self.n_head)]}
        return PatchResult(values.float().cpu(), self.axes(), {a: labels[a] for a in self.axes()}, self.point,
                           clean, corrupted, self.into, method)


def _job(model, clean, corrupted, point: str, by_position: bool, into: str, attention_mask,
         logits_to_keep: int) -> _Job:
    if not hasattr(model, "lm_head"):
        raise TypeError(f"patching needs logits for the metric: pass a GPT2LMHeadModel, got {type(model).__name__}")
    if model.training:
        raise ValueError("the model is in training mode (dropout would make every run different): call model.eval()")
    if model.hooks_active():
        raise ValueError(f"hooks are already set at {sorted(model._registry().fns)}: patching sets its own and runs "
                         "blocks on sliced batches those would not expect; leave the `with model.hooks(...)` block "
                         "first")
    if point not in POINTS:
        raise ValueError(f"unknown patching point {point!r}: valid: {', '.join(POINTS)}")
    if into not in DIRECTIONS:
        raise ValueError(f"into={into!r}: patch into 'corrupted' (clean activations copied in) or 'clean' "
                         "(the reverse)")
    device = model.device
    V = model.config.vocab_size
    clean = check_token_ids(torch.as_tensor(clean), V, "clean").to(device)
    corrupted = check_token_ids(torch.as_tensor(corrupted), V, "corrupted").to(device)
    if clean.shape[1] != corrupted.shape[1]:
        raise ValueError(f"clean and corrupted prompts must have the same length (positions are patched one to one): "
                         f"clean has {clean.shape[1]} tokens, corrupted {corrupted.shape[1]}")
    if clean.shape[0] != corrupted.shape[0]:
        raise ValueError(f"clean and corrupted must hold the same number of prompts: clean has {clean.shape[0]}, "
                         f"corrupted {corrupted.shape[0]}")
    B, T = clean.shape
    if attention_mask is not None:
        attention_mask = check_mask_shape(attention_mask, (B, T), "prompts, tokens; shared by clean and "
                                          "corrupted").to(device)
    if not 0 <= logits_to_keep <= T:
        raise ValueError(f"logits_to_keep={logits_to_keep} must be in [0, {T}] (0: all {T} positions)")
    source, target = (clean, corrupted) if into == "corrupted" else (corrupted, clean)
    job = _Job(source, target, attention_mask, point, by_position, into, logits_to_keep or T,
               model.config.n_layer, model.config.n_head)
    positions = range(T) if by_position else [None]
    heads = range(job.n_head) if job.per_head else [None]
    job.cells = [(l, p, h) for l in range(job.n_layer) for p in positions for h in heads]
    return job


def _record(model, ids, mask, names, kept: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(logits of the last `kept` positions, {name: activation}) of one plain forward."""
    acts = {}

    def store(x, name):
        acts[name] = x

    with model.hooks({name: store for name in names}):
        logits = model(ids, attention_mask=mask, logits_to_keep=kept).logits
    return logits, acts


def _scalar(value) -> torch.Tensor:
    """A metric's value as a 0-d float tensor; it must be one number for the whole batch of prompts."""
    value = torch.as_tensor(value)
    if value.numel() != 1:
        raise ValueError(f"metric must return one number for the batch of prompts (reduce over them, e.g. .mean()), "
                         f"got shape {tuple(value.shape)}")
    return value.reshape(()).float()


def _write_patch(x: torch.Tensor, src: torch.Tensor, point: str, at: Optional[int], p: Optional[int],
                 head: Optional[int]) -> None:
    """x[..] = src[..] in place, for one cell: rows of x hold the cell's B prompts, like src.

    `p` is the patched position in src's positions and `at` the same position in x's (x may start later: a sliced
    run). For per-head points the head index too; the pattern's query position is its third dim."""
    pos_dim, head_dim = HEAD_DIMS.get(point, (1, None))
    dst_idx, src_idx = [slice(None)] * x.dim(), [slice(None)] * x.dim()
    if p is not None:
        dst_idx[pos_dim], src_idx[pos_dim] = at, p
    if head is not None:
        dst_idx[head_dim] = src_idx[head_dim] = head
    x[tuple(dst_idx)] = src[tuple(src_idx)]


# ---- the definition: one forward per cell ---------------------------------------------------------------

@torch.no_grad()
def patch_naive(model, clean, corrupted, metric: Metric, point: str = "resid_pre", *, by_position: bool = True,
                into: str = "corrupted", attention_mask=None, logits_to_keep: int = 0) -> PatchResult:
    """What `patch` computes, written the slow and obvious way: a full forward of the target prompt per cell, with a
    hook copying that cell's activation from the source run. The reference the tests compare `patch` to."""
    job = _job(model, clean, corrupted, point, by_position, into, attention_mask, logits_to_keep)
    names = [job.hook_name(l) for l in range(job.n_layer)]
    source_logits, source = _record(model, job.source, job.mask, names, job.kept)
    target_logits = model(job.target, attention_mask=job.mask, logits_to_keep=job.kept).logits
    values = torch.empty(len(job.cells))
    for i, (layer, p, head) in enumerate(job.cells):
        def patch_one(x, name, p=p, head=head):
            x = x.clone()
            _write_patch(x, source[name], point, p, p, head)
            return x
        with model.hooks({job.hook_name(layer): patch_one}):
            values[i] = _scalar(metric(model(job.target, attention_mask=job.mask, logits_to_keep=job.kept).logits))
    return _baselines(job, values.reshape(job.shape()), source_logits, target_logits, metric, "activation")


def _baselines(job, values, source_logits, target_logits, metric, method) -> PatchResult:
    clean_logits, corrupted_logits = ((source_logits, target_logits) if job.into == "corrupted"
                                      else (target_logits, source_logits))
    return job.result(values, _scalar(metric(clean_logits)).item(), _scalar(metric(corrupted_logits)).item(), method)


# ---- batched: many cells per forward, each starting where its patch does ---------------------------------

class _TargetPrefix:
    """Stands in for a KVCache in GPT2Attention.forward: every row attends to the target run's own keys and values
    at positions 0..p-1 (exact: a patch at position >= p cannot change them), followed by its new ones. Rows are
    cell-major (row = cell * B + prompt), so the prefix (B, H, p, D) repeats once per cell. Nothing is written."""

    def __init__(self, keys: dict[int, torch.Tensor], values: dict[int, torch.Tensor]):
        self.keys, self.values = keys, values

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._join(self.keys[layer], k), self._join(self.values[layer], v)

    @staticmethod
    def _join(prefix: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """(B, H, p, D) prefix, the same for every cell, then (n * B, H, T', D) new -> (n * B, H, p + T', D)."""
        (B, H, p, D), N = prefix.shape, new.shape[0]
        out = new.new_empty(N, H, p + new.shape[2], D)
        out.view(N // B, B, H, -1, D)[:, :, :, :p] = prefix     # broadcast over the cells: no repeat, one copy
        out[:, :, p:] = new
        return out


def _row_bytes(config, T_new: int, S: int, kept: int, element_size: int) -> int:
    """Estimated bytes one row (one prompt of one cell) holds at once in a batched forward over T_new positions that
    attend to S keys: the block's largest temporaries (qkv 3C, the MLP's two 4C, the residual and its updates:
    ~16C per position, plus an H x S row of scores per position and, at most, an S row of attention mask:
    attention.AttentionMask's dense masks are (B, 1, T, S) with padding (bools, and the eager path's additive
    float bias), (1, 1, T, S) without; counted as one float row, which over-counts the unpadded case), the keys
    and values with the prefix (2C per key), and the logits (the new ones and the assembled ones: 2 V per kept
    position). An estimate, not a bound."""
    C, H, V = config.n_embd, config.n_head, config.vocab_size
    return element_size * (T_new * (16 * C + (H + 1) * S) + 2 * C * S + 2 * kept * V)


def _batches(job: _Job, config, element_size: int, max_memory: int) -> list[list[tuple[int, list]]]:
    """The cells as batches of (start position, cells) groups, each batch within max_memory (estimated).

    A group holds cells of one position (all cells when not by position), sorted by layer: one batched pass
    through the blocks. A position's cells are split into several groups when they alone exceed the budget (at
    least one cell each); consecutive groups share a batch, and with it one unembedding matmul, while they fit."""
    batches, batch, used = [], [], 0
    for p in (range(job.T) if job.by_position else [None]):
        cells = [c for c in job.cells if c[1] == p]
        start = p or 0
        cell_bytes = job.B * _row_bytes(config, job.T - start, job.T, job.kept, element_size)
        per_group = max(1, max_memory // cell_bytes)
        for i in range(0, len(cells), per_group):
            group = cells[i:i + per_group]
            if batch and used + len(group) * cell_bytes > max_memory:
                batches.append(batch)
                batch, used = [], 0
            batch.append((start, group))
            used += len(group) * cell_bytes
    return batches + [batch]


def _patched_hidden(model, job: _Job, cells: list, p: int, source: dict, target: dict) -> torch.Tensor:
    """Final hidden states (after ln_f) (len(cells) * B, T', C) of the target run with each cell's patch, at the
    positions the metric reads from p on (T' = min(kept, T - p)), for cells that all sit at position p (p = 0 for
    all-position cells) and are sorted by layer. Row r = cell r // B, prompt r % B.

    Exact, not approximate: rows start at their patch's block from the target's resid_pre there (blocks before it
    are unchanged), compute positions p..T-1 only (positions before p are unchanged in every layer, causal
    attention), with the target's keys and values at 0..p-1 in front (_TargetPrefix)."""
    t, B, T = model.transformer, job.B, job.T
    slice_at = 0 if job.by_position else None       # where position p sits in the sliced run
    prefix = None
    if p > 0:
        prefix = _TargetPrefix({i: target[f"h.{i}.attn.k"][:, :p].transpose(1, 2) for i in range(job.n_layer)},
                               {i: target[f"h.{i}.attn.v"][:, :p].transpose(1, 2) for i in range(job.n_layer)})
    x, masks = None, {}
    for layer in range(cells[0][0], job.n_layer):
        joining = [c for c in cells if c[0] == layer]
        hooks = {}
        if joining:   # these cells' rows enter here, as copies of the target's residual stream entering this block
            first = 0 if x is None else x.shape[0]
            new = target[_resid_pre_name(layer)][:, p:].repeat(len(joining), 1, 1)
            if job.point == "resid_pre":
                for j, (_, cp, head) in enumerate(joining):
                    _write_patch(new[j * B:(j + 1) * B], source[job.hook_name(layer)], job.point, slice_at, cp, head)
            else:
                hooks[job.hook_name(layer)] = _batch_patcher(job, joining, first, source, slice_at)
            x = new if x is None else torch.cat([x, new])
        if x.shape[0] not in masks:   # one per batch size: its dense form is made once, inside
            masks[x.shape[0]] = AttentionMask.build(None if job.mask is None else job.mask.repeat(x.shape[0] // B, 1),
                                                    p, T - p)
        mask = masks[x.shape[0]]
        with model.hooks(hooks):
            x, _ = t.h[layer](x, mask, prefix)
    return t.ln_f(x[:, max(T - job.kept - p, 0):])


def _unembed(model, job: _Job, batch: list, hidden: list, target_logits: torch.Tensor) -> list[torch.Tensor]:
    """Logits (len(cells) * B, kept, V) per group of the batch, from one lm_head matmul over all of their final
    hidden states (one per group would re-read the V x C matrix each time, for a handful of rows). The metric's
    positions before a group's start are the target run's own logits (a patch there changes nothing)."""
    sizes = [h.shape[0] * h.shape[1] for h in hidden]
    flat = model.lm_head(torch.cat([h.flatten(0, 1) for h in hidden]))
    logits = []
    for (start, cells), h, lg in zip(batch, hidden, flat.split(sizes)):
        lg = lg.view(h.shape[0], h.shape[1], -1)
        if h.shape[1] < job.kept:   # positions T-kept .. start-1 come before this run's
            lg = torch.cat([target_logits[:, :job.kept - h.shape[1]].repeat(len(cells), 1, 1), lg], dim=1)
        logits.append(lg)
    return logits


def _batch_patcher(job: _Job, joining: list, first: int, source: dict, slice_at: Optional[int]):
    """A hook patching the rows from `first` on (the cells joining at this block, B rows each), cell by cell."""
    def patch_rows(x, name):
        x = x.clone()
        for j, (_, p, head) in enumerate(joining):
            rows = slice(first + j * job.B, first + (j + 1) * job.B)
            _write_patch(x[rows], source[name], job.point, slice_at, p, head)
        return x
    return patch_rows


@torch.no_grad()
def patch(model, clean, corrupted, metric: Metric, point: str = "resid_pre", *, by_position: bool = True,
          into: str = "corrupted", attention_mask=None, logits_to_keep: int = 0,
          max_memory: int = DEFAULT_MAX_MEMORY) -> PatchResult:
    """Activation patching at `point` for every layer (and position, and head), batched.

    clean, corrupted: (B, T) or (T,) token ids of the same length T. metric(logits) -> one number, from the logits
    (B, kept, V) of one run (kept = logits_to_keep, or T when 0), e.g. `logit_diff(right, wrong)`; it runs on every
    patched run and on the two unpatched ones (`result.clean`, `result.corrupted`). `logits_to_keep=1` lets the
    metric see the last position only and skips the unembedding elsewhere (the usual case, and much faster).
    by_position: one cell per position (axis "pos"), or patch all positions at once. into: the run that is patched.
    attention_mask: (B, T), shared by both prompts (see the module docstring on padding). max_memory: bytes a
    batched forward may hold (estimated); cells are split into several forwards to fit it.

    Returns a PatchResult with axes ("layer", "pos"), ("layer",), or for per-head points ("layer", "pos", "head") /
    ("layer", "head"). Equal to `patch_naive` (one forward per cell) within rounding.
    """
    job = _job(model, clean, corrupted, point, by_position, into, attention_mask, logits_to_keep)
    if max_memory <= 0:
        raise ValueError(f"max_memory={max_memory} must be a positive number of bytes")
    L = job.n_layer
    source_names = [job.hook_name(l) for l in range(L)]
    target_names = [_resid_pre_name(l) for l in range(L)]
    if by_position:
        target_names += [f"h.{l}.attn.{kv}" for l in range(L) for kv in "kv"]
    source_logits, source = _record(model, job.source, job.mask, source_names, job.kept)
    target_logits, target = _record(model, job.target, job.mask, target_names, job.kept)

    index = {cell: i for i, cell in enumerate(job.cells)}
    values = torch.empty(len(job.cells))
    for batch in _batches(job, model.config, model.dtype.itemsize, max_memory):
        hidden = [_patched_hidden(model, job, cells, start, source, target) for start, cells in batch]
        for (_, cells), logits in zip(batch, _unembed(model, job, batch, hidden, target_logits)):
            scores = [_scalar(metric(logits[j * job.B:(j + 1) * job.B])) for j in range(len(cells))]
            values[[index[c] for c in cells]] = torch.stack(scores).cpu()
    return _baselines(job, values.reshape(job.shape()), source_logits, target_logits, metric, "activation")


# ---- attribution patching: every cell from one forward and one backward ----------------------------------

def attribution_patch(model, clean, corrupted, metric: Metric, point: str = "resid_pre", *, by_position: bool = True,
                      into: str = "corrupted", attention_mask=None, logits_to_keep: int = 0) -> PatchResult:
    """The first-order estimate of `patch`'s result: for each cell, the target metric plus
    sum over the cell's elements of (source - target activation) * d metric / d activation, the gradient taken at
    the target run. Same arguments and axes as `patch`; one forward of the source, one forward and backward of the
    target, whatever the number of cells. Needs autograd (not inside torch.inference_mode())."""
    job = _job(model, clean, corrupted, point, by_position, into, attention_mask, logits_to_keep)
    if torch.is_inference_mode_enabled():
        raise RuntimeError("attribution_patch takes a gradient: call it outside torch.inference_mode()")
    names = [job.hook_name(l) for l in range(job.n_layer)]
    with torch.no_grad():
        source_logits, source = _record(model, job.source, job.mask, names, job.kept)
    # d metric / d activation without cutting the graph: add a zero leaf at each point and differentiate by it
    target, zeros = {}, {}

    def add_zero(x, name):
        target[name] = x.detach()
        zeros[name] = torch.zeros_like(x, requires_grad=True)
        return x + zeros[name]

    with torch.enable_grad(), model.hooks({name: add_zero for name in names}):
        target_logits = model(job.target, attention_mask=job.mask, logits_to_keep=job.kept).logits
        target_metric = _scalar(metric(target_logits))
        grads = torch.autograd.grad(target_metric, [zeros[n] for n in names], allow_unused=True)
    pos_dim, head_dim = HEAD_DIMS.get(point, (1, None))
    rows = []
    for name, grad in zip(names, grads):
        if grad is None:   # the metric does not depend on this point (e.g. logits of early positions only)
            grad = torch.zeros_like(target[name])
        change = (source[name] - target[name]) * grad
        keep = (pos_dim,) if head_dim is None else (pos_dim, head_dim)
        change = change.movedim(keep, tuple(range(len(keep)))).flatten(len(keep)).sum(-1)   # (T,) or (T, H)
        rows.append(change if by_position else change.sum(0))
    values = target_metric.detach() + torch.stack(rows).detach()
    return _baselines(job, values, source_logits.detach(), target_logits.detach(), metric, "attribution")


# ---- metrics --------------------------------------------------------------------------------------------

def logit_diff(right, wrong, pos: int = -1) -> Metric:
    """metric(logits) = mean over prompts of logits[b, pos, right[b]] - logits[b, pos, wrong[b]]: how much more the
    model prefers the right answer. `right`/`wrong`: a token id, or one per prompt ((B,) ids)."""
    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, pos]                                               # (B, V)
        r = torch.as_tensor(right, device=last.device).reshape(-1, 1).expand(last.shape[0], 1)
        w = torch.as_tensor(wrong, device=last.device).reshape(-1, 1).expand(last.shape[0], 1)
        return (last.gather(1, r) - last.gather(1, w)).mean()
    return metric
