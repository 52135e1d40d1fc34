"""Quantized weights: decode speed, bytes read per token and quality of nanogpt2's int8 / int4, against fp32, bf16,
transformers and transformers + torchao, in one process.

    python benchmarks/quantize.py [--quick] [--csv out.csv] [--group-size 64] [--new-tokens 64] [--profile]
    python benchmarks/quantize.py --preset gpt2-xl      # xl shape: nanogpt2 fp32 / int8 / int4, eager

Speed: GPT-2 124M shape (random weights, see speed_checkpoint: the embeddings at std 0.1 so logits are peaky, the
blocks at GPT-2's own init so that bf16 activations do not flip greedy choices; --model for a checkpoint), batch 1,
greedy, prompt 16 tokens. Decode time = (t_N - t_1) / (N - 1)
of `generate` with N and 1 new tokens, so prefill, setup and nanogpt2's one-off weight packing cancel;
compile=True rows are compiled before timing. Every row runs alternately with every other (common.paired). Rows:
  nanogpt2 fp32 / bf16 / int8 / int4-g<group>, each eager (the default generate) and compile=True
  hf fp32: transformers' default generate (sdpa attention)
  hf+torchao int8: transformers + torchao's Int8WeightOnlyConfig. Through transformers' TorchAoConfig, timed only
    if it quantizes something (on GPT-2 it quantizes nothing: the blocks' Conv1D layers are not nn.Linear and the
    tied lm_head is skipped; the row says so); then torchao.quantization.quantize_ on the model with its Conv1D
    layers swapped for nn.Linear (what a user has to do): eager; cache_implementation="static"; static +
    torch.compile of its forward (torchao sets its recommended inductor options); and the same with bf16
    activations (a bf16 model; torchao's int8 x bf16 path), compiled plainly and with inductor's freezing +
    max-autotune choosing between its C++ templates and torch's ops (backends "CPP,ATEN").
  A row that cannot run says "failed: <reason>" (or "torchao not installed"); none is skipped silently.
Columns:
  tok/s, ms/tok  decode only, B=1
  MB/tok   bytes one step must read (weight_read_bytes): float parameters except wpe; for a quantized matrix what
           its CPU kernel reads (nanogpt2: cpu_qweight if set, else qweight, plus cpu_scales; torchao: qdata + scale);
           an embedding tied to a quantized head, or untied from it, is read one row per token (not counted)
  x floor  ms/tok / (MB/tok / read bandwidth): 1.0 = the step streams its weights as fast as torch.sum reads
           memory; the bandwidth is the best of a measurement before and one after the timing
  vs fp32c tok/s / nanogpt2 fp32 compiled tok/s;  vs ao: tok/s / the fastest working hf+torchao row's tok/s
Correctness before speed: fp32 rows must produce nanogpt2 fp32's tokens exactly; every other row's tokens must each
be a greedy choice (to within common.NEAR_TIE of the logit spread) of a float32 model holding the same rounded
weights (bf16: the fp32 model; int8/int4: nanogpt2.dequantize() of a copy; torchao: its weights dequantized).

Quality (on by default for shapes up to 124M):
  the speed model: KL(fp32 || scheme) in nats per token and top-1 agreement with fp32 over --positions
    next-token predictions of real text (the start of shakespeare's validation split), for bf16, int8, int4 g32,
    g64, g128 (with random weights this measures how far each scheme moves the logits, not language quality)
  shakespeare-tiny (the bundled trained model): perplexity on its validation split (the last 10% of
    tinyshakespeare.txt, windows of 256 at stride 256: tools/eval_perplexity.py --val-fraction 0.1 --stride 256),
    its change versus fp32, and KL / top-1 over the split's first --positions tokens.
--profile: where a nanogpt2 row's decode step goes (torch.profiler, t_N - t_1 per op, inductor kernels by name): the
weight matmuls (and the GB/s they stream), attention, the compiled graph's wrapper and guards, the other ops, and
Python time between records. It turns on inductor's cpp.enable_kernel_profile, so the timed table is of that build.
(nanogpt2's int8 compiled step runs torch's weight-only op, not inductor's int8 template, which decoded wrong
tokens at this shape: nanogpt2.compiled.cpu_compile_options. The torchao "(frozen)" row still lets inductor choose
it, and the correctness check refuses the row when its tokens are wrong.)

Presets above 124M default to nanogpt2 fp32 / int8 / int4, eager only, no peers, no quality block (every timed
model is held in memory at once, and freezing an xl step for compile=True takes many minutes); --schemes,
--compile, --peers and --quality override that.
"""
import argparse
import copy
import gc
import math
import os
import re
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import QUICK_CONFIG, Table, base_parser, check_greedy, machine_line, paired, read_bandwidth

import nanogpt2
from nanogpt2 import GPT2Config, GPT2LMHeadModel
from nanogpt2.compiled import cpu_compile_options
from nanogpt2.data import load_tokens, tokenize_file
from nanogpt2.files import resolve
from nanogpt2.perplexity import sliding_window_perplexity
from nanogpt2.quantization import DEFAULT_GROUP_SIZE, GROUP_SIZES, QuantizedLinear
from nanogpt2.reference import hf_quiet

PROMPT = 16
SCHEMES = ("fp32", "bf16", "int8", "int4")
QUALITY_GROUPS = (32, 64, 128)
BUNDLED = "shakespeare-tiny"
TEXT = os.path.join(os.path.dirname(nanogpt2.__file__), "assets", "data", "tinyshakespeare.txt")
STATIC = {"cache_implementation": "static"}
VAL_FRACTION, PPL_STRIDE = 0.1, 256     # tools/eval_perplexity.py --val-fraction 0.1 --stride 256
SMALL = 200e6                           # presets above this many parameters get the reduced default plan


# ---- what a step reads --------------------------------------------------------------------------

def weight_read_bytes(model) -> int:
    """Bytes of weights one B=1 decode step reads (see the module doc), nanogpt2 or transformers(+torchao)."""
    total, counted = 0, set()
    for m in model.modules():
        if isinstance(m, QuantizedLinear):     # the kernel's own layout where it has one (int4 on CPU)
            w = m.cpu_qweight if m.cpu_qweight is not None else m.qweight
            scales = [m.cpu_scales] if m.cpu_scales is not None else [t for t in (m.scales, m.zeros) if t is not None]
            total += sum(t.numel() * t.element_size() for t in [w, *scales])
            counted |= {id(t) for t in (m.qweight, m.scales, m.zeros)}
    head = getattr(model, "lm_head", None)
    head_w = getattr(head, "weight", None)
    for name, p in model.named_parameters():          # shared parameters (a float tie) come once
        if id(p) in counted or "wpe" in name:
            continue
        if name.endswith("wte.weight") and head_w is not None and head_w is not p:
            continue                                  # untied from a (quantized) head: a lookup of B rows
        if hasattr(p, "qdata"):                       # torchao's Int8Tensor
            total += sum(t.numel() * t.element_size() for t in (p.qdata, p.scale))
        else:
            total += p.numel() * p.element_size()
    return total


# ---- transformers + torchao -----------------------------------------------------------------------

def conv1d_to_linear(model):
    """transformers' GPT-2 keeps its projections as Conv1D ([in, out] weights, addmm): swap each for the
    equivalent nn.Linear, the module torchao's quantize_ knows. In place; returns the model."""
    from transformers.pytorch_utils import Conv1D
    for name, m in list(model.named_modules()):
        if isinstance(m, Conv1D):
            linear = nn.Linear(m.weight.shape[0], m.weight.shape[1], device="meta")
            linear.weight = nn.Parameter(m.weight.detach().t().contiguous(), requires_grad=False)
            linear.bias = m.bias
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


def torchao_dequantized(model):
    """A float copy of a torchao-quantized transformers model: each Int8Tensor weight replaced by its dequantized
    values (the judge of its greedy tokens)."""
    judge = copy.deepcopy(model)
    for m in judge.modules():
        w = getattr(m, "weight", None)
        if w is not None and hasattr(w, "qdata"):
            m.weight = nn.Parameter(w.dequantize(), requires_grad=False)
    return judge


def count_torchao(model) -> int:
    return sum(1 for p in model.parameters() if hasattr(p, "qdata"))


# ---- rows -----------------------------------------------------------------------------------------

class Row:
    """One timed configuration: run(ids, n) -> tokens (B, T + n); model is what weight_read_bytes reads."""

    def __init__(self, name, model=None, run=None, failed=None, group=""):
        self.name, self.model, self.run, self.failed, self.group = name, model, run, failed, group
        self.mb = weight_read_bytes(model) / 1e6 if model is not None and failed is None else None
        self.tps = self.ms = None


def failed_row(name, err, group="") -> Row:
    msg = err if isinstance(err, str) else f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    print(f"# {name}: failed: {msg}", flush=True)
    return Row(name, failed=f"failed: {msg}", group=group)


def ours_run(model, **kw):
    def run(ids, n):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, **kw)
    return run


def hf_run(model, eos, **kw):
    def run(ids, n):
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                              min_new_tokens=n, pad_token_id=eos, **kw)
    return run


def first_call(row: Row, ids, n, ref=None, judge=None) -> Row:
    """Run a row once (the compile, for compiled rows), then check its tokens; a failure becomes the row's reason."""
    t0 = time.perf_counter()
    try:
        with torch.inference_mode():
            out = row.run(ids, n)
    except Exception as e:      # e.g. transformers' static cache or torch.compile failing on this setup
        return failed_row(row.name, e, row.group)
    print(f"# {row.name}: first call {time.perf_counter() - t0:.1f} s", flush=True)
    if judge is not None or ref is not None:
        check_greedy(row.name, out, ref if ref is not None else out, PROMPT, judge)
    row.out = out
    return row


def build_rows(args, path, ids, n, plan) -> list:
    """Every row of the speed table, each run once and checked (quantized rows first: their float32 judges come
    and go before the fp32 model is loaded, which keeps an xl run's peak memory down)."""
    g = args.group_size
    schemes = plan["schemes"]
    rows = {}

    def variants(scheme):
        return [("eager", {})] + ([("compiled", {"compile": True})] if scheme in plan["compile"] else [])

    def load(scheme):
        quant = dict(quantize="int8") if scheme == "int8" else dict(quantize="int4", group_size=g) \
            if scheme == "int4" else {}
        return GPT2LMHeadModel.from_pretrained(path, dtype="bfloat16" if scheme == "bf16" else "float32", **quant)

    def label(scheme):
        return f"int4-g{g}" if scheme == "int4" else scheme

    for scheme in [s for s in schemes if s in ("int8", "int4")]:
        model = load(scheme)
        judge = nanogpt2.dequantize(copy.deepcopy(model))    # the same rounded weights, in float32
        for v, kw in variants(scheme):
            name = f"nanogpt2 {label(scheme)} {v}"
            rows[name] = first_call(Row(name, model, ours_run(model, **kw), group=scheme), ids, n, judge=judge)
        del judge
        gc.collect()
    fp32 = None
    if "fp32" in schemes or "bf16" in schemes or plan["peers"]:
        fp32 = load("fp32")
        ref = fp32.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n)
    if "fp32" in schemes:
        for v, kw in variants("fp32"):
            name = f"nanogpt2 fp32 {v}"
            rows[name] = first_call(Row(name, fp32, ours_run(fp32, **kw), group="fp32"), ids, n, ref=ref)
    if "bf16" in schemes:
        bf16 = load("bf16")
        for v, kw in variants("bf16"):
            name = f"nanogpt2 bf16 {v}"
            rows[name] = first_call(Row(name, bf16, ours_run(bf16, **kw), group="bf16"), ids, n, judge=fp32)
    if plan["peers"]:
        rows.update(peer_rows(path, ids, n, ref, fp32.config.eos_token_id, plan["peer_compile"]))
    order = [f"nanogpt2 {label(s)} {v}" for s in SCHEMES if s in schemes for v, _ in variants(s)]
    return [rows[k] for k in order] + [r for k, r in rows.items() if k not in order]


def peer_rows(path, ids, n, ref, eos, compile_forward: bool) -> dict:
    """transformers fp32, and transformers + torchao int8 weight-only in each mode that works (module doc)."""
    transformers = hf_quiet()
    directory = resolve(path).directory
    rows = {}

    def hf_model(dtype=torch.float32):
        return transformers.GPT2LMHeadModel.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa").eval()

    hf = hf_model()
    rows["hf fp32"] = first_call(Row("hf fp32", hf, hf_run(hf, eos), group="hf"), ids, n, ref=ref)
    via_config = "hf+torchao int8 TorchAoConfig"
    # (row, activation dtype, generate's cache, torch.compile options of its forward or None for eager)
    modes = [("hf+torchao int8 eager", torch.float32, {}, None),
             ("hf+torchao int8 static", torch.float32, STATIC, None),
             ("hf+torchao int8 static+compile", torch.float32, STATIC, {}),
             ("hf+torchao int8 bf16 static+compile", torch.bfloat16, STATIC, {}),
             ("hf+torchao int8 bf16 static+compile(frozen)", torch.bfloat16, STATIC,
              dict(cpu_compile_options(), max_autotune_gemm_backends="CPP,ATEN"))]   # inductor's choice
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        return {**rows, **{k: failed_row(k, "torchao not installed", "torchao") for k in [via_config] + [m[0] for m
                                                                                                    in modes]}}
    # transformers' own route
    try:
        model = transformers.GPT2LMHeadModel.from_pretrained(
            directory, dtype=torch.float32, attn_implementation="sdpa",
            quantization_config=transformers.TorchAoConfig(Int8WeightOnlyConfig())).eval()
        if count_torchao(model) == 0:
            rows[via_config] = failed_row(via_config, f"it quantized 0 of the {len(conv_like(hf))} weight matrices "
                                          "(GPT-2's Conv1D is not nn.Linear; the tied lm_head is skipped)", "torchao")
        else:
            rows[via_config] = first_call(Row(via_config, model, hf_run(model, eos), group="torchao"), ids, n,
                                          judge=torchao_dequantized(model).float())
    except Exception as e:
        rows[via_config] = failed_row(via_config, e, "torchao")

    # quantize_ on the nn.Linear version: one model per activation dtype for the eager modes, one per compiled mode
    eager, judges = {}, {}
    for name, dtype, cache, options in modes:
        if options is not None and not compile_forward:
            rows[name] = failed_row(name, "not run in --quick (its compile takes 30+ s)", "torchao")
            continue
        try:
            model = eager.get(dtype) if options is None else None
            if model is None:
                model = conv1d_to_linear(hf_model(dtype))
                quantize_(model, Int8WeightOnlyConfig())
                if dtype not in judges:   # before compiling: a deepcopy keeps a compiled forward bound to `model`
                    judges[dtype] = torchao_dequantized(model).float()
                if options is None:
                    eager[dtype] = model
                else:
                    model.forward = torch.compile(model.forward, options=options)
        except Exception as e:
            rows[name] = failed_row(name, e, "torchao")
            continue
        rows[name] = first_call(Row(name, model, hf_run(model, eos, **cache), group="torchao"), ids, n,
                                judge=judges[dtype])
    return rows


def conv_like(model) -> list:
    """The weight matrices of a transformers GPT-2 (its Conv1D layers and lm_head)."""
    from transformers.pytorch_utils import Conv1D
    return [m for m in model.modules() if isinstance(m, (Conv1D, nn.Linear))]


# ---- quality ----------------------------------------------------------------------------------------

def val_tokens() -> torch.Tensor:
    """shakespeare's validation split as tools/eval_perplexity.py --val-fraction 0.1 takes it: (N,) int64."""
    tokens = load_tokens(tokenize_file(TEXT, None, verbose=False))
    start = len(tokens) - int(round(len(tokens) * VAL_FRACTION))
    return torch.from_numpy(tokens[start:].astype("int64"))


@torch.inference_mode()
def kl_top1(ref_logits: torch.Tensor, model, ids: torch.Tensor) -> tuple[float, float]:
    """(mean KL(fp32 || model) in nats per position, top-1 agreement) over every position of ids (1, T)."""
    logits = model(ids).logits.float()
    p_log, q_log = F.log_softmax(ref_logits.double(), -1), F.log_softmax(logits.double(), -1)
    kl = (p_log.exp() * (p_log - q_log)).sum(-1).mean().item()
    agree = (ref_logits.argmax(-1) == logits.argmax(-1)).float().mean().item()
    return kl, agree


def quality_schemes(group_sizes):
    return [("bf16", None), ("int8", None)] + [("int4", g) for g in group_sizes]


def quality_label(mode, g):
    return f"int4-g{g}" if mode == "int4" else mode


def loaded_schemes(path, table: Table):
    """(label, model) for each quality scheme of the checkpoint at `path`; a scheme that cannot load (a group size
    that does not divide n_embd) becomes a "failed" row of `table` instead."""
    for mode, g in quality_schemes(QUALITY_GROUPS):
        try:
            model = load_scheme(path, mode, g)
        except ValueError as e:
            table.add(quality_label(mode, g), f"  failed: {e}")
            continue
        yield quality_label(mode, g), model


def load_scheme(path, mode, g):
    if mode == "bf16":
        return GPT2LMHeadModel.from_pretrained(path, dtype="bfloat16")
    return GPT2LMHeadModel.from_pretrained(path, dtype="float32", quantize=mode, group_size=g)


def shape_quality(args, path, tokens) -> Table:
    """KL / top-1 of each scheme against fp32 on the speed model."""
    fp32 = GPT2LMHeadModel.from_pretrained(path, dtype="float32")
    T = min(args.positions, fp32.config.n_positions)
    ids = (tokens[:T] % fp32.config.vocab_size)[None]
    with torch.inference_mode():
        ref = fp32(ids).logits.float()
    print(f"\n# quality of the speed model's weights ({'tiny' if args.quick else args.model or args.preset} shape): "
          f"{T} next-token predictions of shakespeare's validation text")
    table = Table([("scheme", 12), ("KL(fp32||q) nats", 18), ("top-1 agree %", 15)])
    for label, model in loaded_schemes(path, table):
        kl, agree = kl_top1(ref, model, ids)
        table.add(label, kl, 100 * agree)
    return table


def bundled_quality(args, tokens) -> Table:
    """Perplexity (and KL / top-1) of each scheme on the bundled model's validation split."""
    if args.quick:
        tokens = tokens[:4 * PPL_STRIDE]
    fp32 = GPT2LMHeadModel.from_pretrained(BUNDLED, dtype="float32")
    T = min(args.positions, fp32.config.n_positions)
    ids = tokens[:T][None]
    with torch.inference_mode():
        ref = fp32(ids).logits.float()
    base, _, n_scored = sliding_window_perplexity(fp32, tokens, None, PPL_STRIDE)
    print(f"\n# {BUNDLED} (n_embd {fp32.config.n_embd}, {fp32.config.n_layer} layers, trained): perplexity on its "
          f"validation split ({n_scored:,} tokens scored, windows of {fp32.config.n_positions} at stride "
          f"{PPL_STRIDE}); KL / top-1 over its first {T} positions")
    table = Table([("scheme", 12), ("perplexity", 12), ("vs fp32 %", 11), ("KL(fp32||q) nats", 18),
                   ("top-1 agree %", 15)])
    table.add("fp32", base, 0.0, 0.0, 100.0)
    for label, model in loaded_schemes(BUNDLED, table):
        ppl = sliding_window_perplexity(model, tokens, None, PPL_STRIDE)[0]
        kl, agree = kl_top1(ref, model, ids)
        table.add(label, ppl, 100 * (ppl / base - 1), kl, 100 * agree)
    return table


# ---- profile ----------------------------------------------------------------------------------------

WEIGHT_OPS = ("aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu", "aten::addmm", "aten::mm",
              "aten::linear", "mkldnn::_linear_pointwise", "aten::mkldnn_linear")
WRAPPER = ("TorchDynamo Cache Lookup", "## Call CompiledFxGraph", "Torch-Compiled Region")


def op_kind(key: str) -> str:
    """Which part of a decode step a profiler record is: the weight matmuls (aten ops, or inductor's GEMM
    templates: 'graph_<i>_gemm_...' and the int8 template's bare 'graph_<i>_kernel'), attention, the compiled
    graph's Python wrapper and guards, or the rest (norms, GELU, adds, casts, sampling)."""
    if key in WEIGHT_OPS or "gemm" in key or re.fullmatch(r"graph_\d+_kernel", key):
        return "matmul"
    if "scaled_dot_product" in key:
        return "attention"
    if key.startswith(WRAPPER):
        return "wrapper"
    return "other"


def profile_rows(rows, ids, n: int, rounds: int = 3) -> None:
    """Where a decode step's time goes, by torch.profiler, with the timing's own subtraction: per op, the self
    time of a generate of n tokens minus that of 1 token, over n - 1 steps (the pair with the least wall time of
    `rounds`). Inductor's kernels appear by name because main() turns on cpp.enable_kernel_profile."""
    from torch.profiler import ProfilerActivity, profile

    def run(row, k):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            row.run(ids, k)
            wall = time.perf_counter() - t0
        return {e.key: (e.self_cpu_time_total, e.count) for e in prof.key_averages()}, wall

    table = Table([("row", 45), ("ms/step", 9), ("matmul ms", 10), ("GB/s", 6), ("attn ms", 8), ("wrapper", 8),
                   ("other", 7), ("untimed", 8)])
    for row in rows:
        if row.failed or not row.name.startswith("nanogpt2") or row.group == "bf16":
            continue
        with torch.inference_mode():
            pairs = [(run(row, n), run(row, 1)) for _ in range(rounds)]
        (a, wa), (b, wb) = min(pairs, key=lambda ab: ab[0][1] - ab[1][1])
        steps = n - 1
        parts = {"matmul": 0.0, "attention": 0.0, "wrapper": 0.0, "other": 0.0}
        per_op = {}
        for key, (us, count) in a.items():
            d = (us - b.get(key, (0, 0))[0]) / steps / 1e3
            parts[op_kind(key)] += d
            per_op[key] = (d, (count - b.get(key, (0, 0))[1]) / steps)
        step_ms = (wa - wb) / steps * 1e3
        table.add(row.name, step_ms, parts["matmul"], row.mb / parts["matmul"] if parts["matmul"] > 0 else "n/a",
                  parts["attention"], parts["wrapper"], parts["other"], step_ms - sum(parts.values()))
        top = sorted(per_op.items(), key=lambda kv: -kv[1][0])[:6]
        print("#   top: " + "; ".join(f"{k[:48]} x{c:.0f} {d:.2f} ms" for k, (d, c) in top), flush=True)


# ---- main -------------------------------------------------------------------------------------------

def speed_checkpoint(cfg: GPT2Config, directory: str) -> None:
    """Random weights for the speed rows, saved to `directory`: GPT-2's init (model.py: std initializer_range,
    the residual projections scaled by 1/sqrt(2 n_layer)) with the embeddings, and so the tied head, redrawn at
    std 0.1, as decode.py's, so logits are peaky. With every matrix at 0.1 (decode.py's initializer_range) a
    12-layer random GPT-2 is chaotic: bf16 activations alone change 13-20% of its greedy choices (measured), so
    the correctness check of the quantized rows, whose CPU kernels take bf16 activations, passed or failed by luck."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        model.transformer.wte.weight.normal_(0.0, 0.1)
        model.transformer.wpe.weight.normal_(0.0, 0.1)
    model.save_pretrained(directory)


def make_plan(args, n_params: int) -> dict:
    """What to run: the flags, or the defaults for the shape (module doc: presets above 124M get a reduced plan;
    --quick compiles only the quantized rows, whose compiled path no other quick check covers, to stay ~1 minute)."""
    small = n_params <= SMALL
    schemes = args.schemes or (list(SCHEMES) if small else ["fp32", "int8", "int4"])
    compile_ = small if args.compile is None else args.compile
    compiled = [s for s in schemes if compile_ and (s in ("int8", "int4") or not args.quick)]
    return dict(schemes=schemes, compile=compiled, peer_compile=compile_ and not args.quick,
                peers=small if args.peers is None else args.peers,
                quality=small if args.quality is None else args.quality)


def main():
    p = base_parser(__doc__)
    p.add_argument("--new-tokens", type=int, default=None, help="N, new tokens per timed generate (default 64; "
                   "quick: 16)")
    p.add_argument("--group-size", type=int, default=DEFAULT_GROUP_SIZE, choices=GROUP_SIZES,
                   help="int4 group size of the timed int4 rows")
    p.add_argument("--schemes", nargs="+", choices=SCHEMES, default=None,
                   help="nanogpt2 weight schemes to time (default: all; presets above 124M: fp32 int8 int4)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also time generate(compile=True) (default: on up to 124M)")
    p.add_argument("--peers", action=argparse.BooleanOptionalAction, default=None,
                   help="transformers and transformers+torchao rows (default: on up to 124M)")
    p.add_argument("--quality", action=argparse.BooleanOptionalAction, default=None,
                   help="the KL / top-1 / perplexity block (default: on up to 124M)")
    p.add_argument("--positions", type=int, default=None, help="positions for KL / top-1 (default 512; quick 64)")
    p.add_argument("--profile", action="store_true", help="after the table, where each nanogpt2 row's step goes")
    args = p.parse_args()
    if args.device != "cpu" or args.dtype != "float32":
        raise SystemExit("quantize.py compares weight formats on CPU: it takes no --device/--dtype (got "
                         f"--device {args.device} --dtype {args.dtype}); the bf16 rows are its own")
    repeats = args.repeats or (1 if args.quick else 3)
    n = args.new_tokens or (16 if args.quick else 64)
    args.positions = args.positions or (64 if args.quick else 512)
    if args.profile:
        from torch._inductor import config as inductor_config
        inductor_config.cpp.enable_kernel_profile = True      # inductor's C++ kernels as profiler records
    print(machine_line())
    print(f"# load average {os.getloadavg()[0]:.1f} at start ({os.cpu_count()} cores; the machine may be shared)")

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            speed_checkpoint(GPT2Config(**QUICK_CONFIG) if args.quick else GPT2Config.preset(args.preset), tmp)
            path = tmp
        config = GPT2Config.from_pretrained(path)
        C = config.n_embd
        n_params = config.n_layer * 12 * C * C + (config.vocab_size + config.n_positions) * C   # ~ the count
        plan = make_plan(args, n_params)
        torch.manual_seed(1)
        ids = torch.randint(0, config.vocab_size, (1, PROMPT))
        print(f"# plan: {plan} | {n - 1} decode steps timed per row, {repeats} rounds")
        rows = build_rows(args, path, ids, n, plan)
        live = [r for r in rows if r.failed is None]
        fp32_bytes = max(weight_read_bytes(r.model) for r in live)
        bw_before = read_bandwidth(min(fp32_bytes, 1 << 30), "cpu")
        fns = {}
        for r in live:
            fns[r.name + "|n"] = lambda r=r: r.run(ids, n)
            fns[r.name + "|1"] = lambda r=r: r.run(ids, 1)
        load = os.getloadavg()[0]
        with torch.inference_mode():
            t = paired(fns, repeats)
        bw = max(bw_before, read_bandwidth(min(fp32_bytes, 1 << 30), "cpu"))
        for r in live:
            dt = (t[r.name + "|n"] - t[r.name + "|1"]) / (n - 1)
            if dt <= 0:    # tiny --quick shapes: the N-token run no slower than the 1-token one, within noise
                r.failed = f"unmeasured: t_N {t[r.name + '|n'] * 1e3:.2f} ms <= t_1 {t[r.name + '|1'] * 1e3:.2f} ms"
                continue
            r.tps, r.ms = 1 / dt, dt * 1e3
        live = [r for r in live if r.failed is None]
        base = next((r for r in live if r.name == "nanogpt2 fp32 compiled"), None) \
            or next((r for r in live if r.name == "nanogpt2 fp32 eager"), None)
        ao = max((r for r in live if r.group == "torchao"), key=lambda r: r.tps, default=None)
        print(f"\n# greedy decode, B=1, prompt {PROMPT}, {n - 1} steps; read bandwidth {bw / 1e9:.1f} GB/s "
              f"(before {bw_before / 1e9:.1f}); load average {load:.1f} before timing, {os.getloadavg()[0]:.1f} after"
              f"; vs fp32c = vs {base.name if base else 'n/a'}; vs ao = vs {ao.name if ao else 'n/a (no torchao row)'}")
        table = Table([("row", 45), ("tok/s", 9), ("ms/tok", 9), ("MB/tok", 9), ("x floor", 9), ("vs fp32c", 10),
                       ("vs ao", 8)])
        for r in rows:
            if r.failed:
                table.add(r.name, "  " + r.failed)
                continue
            floor_ms = r.mb * 1e6 / bw * 1e3
            table.add(r.name, r.tps, r.ms, r.mb, r.ms / floor_ms, r.tps / base.tps if base else "n/a",
                      r.tps / ao.tps if ao else "n/a")
        table.write_csv(args.csv)
        if args.profile:
            print("\n# profile: per decode step, self time by kind (profile_rows); matmul GB/s = MB/tok / matmul ms;"
                  " untimed = wall - the records (Python between ops)")
            profile_rows(rows, ids, n)
        if plan["quality"]:
            for r in rows:
                r.model = r.run = None
            gc.collect()
            tokens = val_tokens()
            shape = shape_quality(args, path, tokens)
            bundled = bundled_quality(args, tokens)
            if args.csv:
                stem = os.path.splitext(args.csv)[0]
                shape.write_csv(stem + "-kl.csv")
                bundled.write_csv(stem + "-perplexity.csv")


if __name__ == "__main__":
    main()
