"""Activation patching: nanogpt2.patching.patch (many cells per forward) vs one forward per cell, and how well
attribution patching (one forward + one backward) predicts real patching.

    python benchmarks/patching.py [--quick] [--csv out.csv] [--tokens 20] [--device cuda --dtype bfloat16]

Speed: GPT-2 124M shape (random weights), one clean/corrupted prompt pair of --tokens tokens, the metric a logit
difference at the last position (logits_to_keep=1 on both sides). Two sweeps: resid_pre by position over all
layers ([layer, pos]: the goal), and attn.z per head over all positions ([layer, head]).
"one per cell" is `patch_naive`: a full forward per cell with a patching hook. The two alternate (A B A B ...),
medians reported; each sweep first checks that both give the same values (a speed for a wrong result is never
printed). Attribution patching's time is shown alongside.

Correlation: on the bundled shakespeare-tiny, --pairs prompt pairs of 16 tokens from the held-out end of
tinyshakespeare, each corrupted by swapping one token (at a random position in the second half) for a random
token of the text; metric: logit difference of the true next token and the corrupted run's favourite. For each
point, the Pearson r between attribution_patch's and patch's changes (value - corrupted metric), pooled over the
cells of every pair. The second CSV (the name of --csv with -attribution) holds that table.
"""
import os
import statistics

import torch

from common import QUICK_CONFIG, Table, base_parser, machine_line, paired
from nanogpt2 import GPT2Config, GPT2LMHeadModel, get_tokenizer
from nanogpt2.dtypes import dtype_from_name
from nanogpt2.patching import attribution_patch, logit_diff, patch, patch_naive

SWEEPS = [("resid_pre", True), ("attn.z", False)]
CORRELATION_POINTS = [("resid_pre", True), ("attn.out", True), ("mlp.out", True), ("attn.z", True),
                      ("attn.z", False), ("attn.v", False), ("attn.pattern", False)]
DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanogpt2", "assets", "data",
                    "tinyshakespeare.txt")


def speed_model(args) -> GPT2LMHeadModel:
    dtype = dtype_from_name(args.dtype)
    if args.model:
        return GPT2LMHeadModel.from_pretrained(args.model, dtype=dtype, device=args.device).eval()
    torch.manual_seed(0)
    cfg = GPT2Config(**QUICK_CONFIG) if args.quick else GPT2Config.preset(args.preset)
    return GPT2LMHeadModel(cfg).to(device=args.device, dtype=dtype).eval()


def speed(args, repeats: int) -> None:
    model = speed_model(args)
    T = args.tokens or (8 if args.quick else 20)
    L, H = model.config.n_layer, model.config.n_head
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, model.config.vocab_size, (1, T), generator=g).to(args.device)
    corrupted = clean.clone()
    corrupted[0, T // 4] = (clean[0, T // 4] + 1) % model.config.vocab_size
    metric = logit_diff(3, 5)
    shape = "tiny" if args.quick else args.preset
    print(f"# patching speed, {args.dtype}, GPT-2 {shape} shape ({L} layers, {H} heads), 1 prompt pair of {T} tokens, "
          f"metric at the last position (logits_to_keep=1); medians of {repeats}")
    table = Table([("point", 12), ("result", 16), ("cells", 7), ("one/cell ms", 13), ("batched ms", 12),
                   ("speedup", 9), ("attrib ms", 11), ("max|diff|", 11)])
    tol = 1e-4 if args.dtype == "float32" else 5e-2
    for point, by_position in SWEEPS:
        kw = dict(point=point, by_position=by_position, logits_to_keep=1)
        results = {}

        def run(name, fn):
            def go():
                results[name] = fn(model, clean, corrupted, metric, **kw)
            return go

        fns = {"naive": run("naive", patch_naive), "batched": run("batched", patch),
               "attribution": run("attribution", attribution_patch)}
        t = paired(fns, repeats)
        a, b = results["batched"], results["naive"]
        diff = (a.values - b.values).abs().max().item()
        if diff > tol * max(1.0, b.values.abs().max().item()):
            raise SystemExit(f"{point}: batched patching differs from one forward per cell by {diff:.3g}: "
                             "refusing to time a wrong result")
        table.add(point, "[" + ", ".join(a.axes) + "]", a.values.numel(), t["naive"] * 1e3, t["batched"] * 1e3,
                  t["naive"] / t["batched"], t["attribution"] * 1e3, diff)
    table.write_csv(args.csv)


def prompt_pairs(n: int, T: int):
    """n (clean, corrupted, true next token) triples from the held-out end of tinyshakespeare: a window of
    T tokens, and the same window with one token in its second half swapped for a random token of the text."""
    ids = torch.tensor(get_tokenizer().encode(open(DATA, encoding="utf-8").read()[-20000:]))
    g = torch.Generator().manual_seed(0)
    pairs = []
    for _ in range(n):
        start = int(torch.randint(0, len(ids) - T - 1, (1,), generator=g))
        col = int(torch.randint(T // 2, T - 1, (1,), generator=g))
        clean = ids[start:start + T][None]
        corrupted = clean.clone()
        corrupted[0, col] = ids[int(torch.randint(0, len(ids), (1,), generator=g))]
        pairs.append((clean, corrupted, int(ids[start + T])))
    return pairs


def correlation(args) -> None:
    model = GPT2LMHeadModel.from_pretrained("shakespeare-tiny").eval()
    n = args.pairs or (3 if args.quick else 32)
    T = 16
    print(f"# attribution vs activation patching, shakespeare-tiny (4 layers, 4 heads), float32, {n} prompt pairs "
          f"of {T} tokens (one token swapped), metric: logit difference at the last position; Pearson r of the "
          "changes, pooled over every cell of every pair")
    table = Table([("point", 14), ("result", 20), ("cells", 7), ("r", 8), ("patch ms", 10), ("attrib ms", 11)])
    changes = {k: ([], []) for k in CORRELATION_POINTS}
    times = {k: ([], []) for k in CORRELATION_POINTS}
    axes = {}
    for clean, corrupted, right in prompt_pairs(n, T):
        with torch.no_grad():
            favourite = model(corrupted).logits[0, -1]
        favourite[right] = -float("inf")
        metric = logit_diff(right, int(favourite.argmax()))
        for point, by_position in CORRELATION_POINTS:
            kw = dict(point=point, by_position=by_position, logits_to_keep=1)
            out = {}
            t = paired({"act": lambda: out.update(act=patch(model, clean, corrupted, metric, **kw)),
                        "est": lambda: out.update(est=attribution_patch(model, clean, corrupted, metric, **kw))},
                       repeats=1, warmup=0)
            act, est = out["act"], out["est"]
            changes[point, by_position][0].append((act.values - act.corrupted).flatten())
            changes[point, by_position][1].append((est.values - est.corrupted).flatten())
            times[point, by_position][0].append(t["act"])
            times[point, by_position][1].append(t["est"])
            axes[point, by_position] = "[" + ", ".join(act.axes) + "]"
    for key in CORRELATION_POINTS:
        x, y = torch.cat(changes[key][0]), torch.cat(changes[key][1])
        r = torch.corrcoef(torch.stack([x, y]))[0, 1].item()
        table.add(key[0], axes[key], x.numel(), r, statistics.median(times[key][0]) * 1e3,
                  statistics.median(times[key][1]) * 1e3)
    if args.csv:
        table.write_csv(args.csv.removesuffix(".csv") + "-attribution.csv")


def main():
    p = base_parser(__doc__)
    p.add_argument("--tokens", type=int, default=None, help="prompt length for the speed sweeps (default 20, quick: 8)")
    p.add_argument("--pairs", type=int, default=None, help="prompt pairs for the correlation (default 32, quick: 3)")
    args = p.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    print(machine_line())
    speed(args, repeats)
    correlation(args)


if __name__ == "__main__":
    main()
