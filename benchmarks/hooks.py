"""What the named activation points cost: nanogpt2 with no hook set versus nanogpt2 with the points removed, and
what run_with_cache costs against a plain forward.

    python benchmarks/hooks.py [--quick] [--seq-len 256 1024] [--csv out.csv] [--device cuda --dtype bfloat16]

Every point in the model is a call `hook(name, x)` (nanogpt2/hooks.py) that returns x at once when no hook is
set. To price that, the same model is also timed with the registry's __call__ swapped for a bare `return x`
("no points": as if the calls were not in the source), and, for scale, with one no-op hook per point. Prefill is
one forward at each --seq-len, generate 32 new tokens after 16, B=1; all the variants of a row alternate.
"none / no points" is the overhead of the points when nothing is hooked: 1.00 means none measurable.
"cache all" is run_with_cache of every point; "no pattern" leaves out the attn.pattern points, whose
probabilities the fused attention never makes: asking for them runs each layer's attention eagerly
(softmax(q k^T) v written out, the full T x T scores and no causal block skipping), a cost inherent in the
question rather than in the caching.
"""
import torch

from common import Table, base_parser, machine_line, model_pair, paired
from nanogpt2.hooks import HookRegistry


def main():
    p = base_parser(__doc__)
    p.add_argument("--seq-len", type=int, nargs="+", default=None, metavar="T",
                   help="prefill lengths (default: 256 1024; quick: 16)")
    args = p.parse_args()
    repeats = args.repeats or (2 if args.quick else 7)
    lengths = args.seq_len or ([16] if args.quick else [256, 1024])
    prompt, new = (8, 4) if args.quick else (16, 32)
    print(machine_line())
    ours, _ = model_pair(args, initializer_range=0.1)
    names = ours.activation_names()
    no_pattern = [n for n in names if not n.endswith(".attn.pattern")]
    print(f"# hook points, {args.dtype}, GPT-2 {'tiny' if args.quick else args.preset} shape, {len(names)} points "
          f"({len(names) - len(no_pattern)} of them attn.pattern); prefill B=1 T={', '.join(map(str, lengths))}, "
          f"generate B=1 {prompt} -> {new} new tokens; medians of {repeats} alternating rounds")
    real_call = HookRegistry.__call__

    def without_points(fn):
        def run():
            HookRegistry.__call__ = lambda self, name, x: x
            try:
                return fn()
            finally:
                HookRegistry.__call__ = real_call
        return run

    def with_noop_hooks(fn):
        def run():
            with ours.hooks({name: (lambda x, name: None) for name in names}):
                return fn()
        return run

    table = Table([("work", 14), ("none ms", 10), ("no points ms", 14), ("none / no points", 18),
                   ("no-op hooks ms", 16), ("cache all ms", 14), ("all / none", 12), ("no pattern ms", 15),
                   ("no pattern / none", 19)])

    def row(label, fn, ids=None):
        """One table row: fn with no hook, without the points, with no-op hooks; given ids, run_with_cache too."""
        fns = {"none": fn, "bare": without_points(fn), "noop": with_noop_hooks(fn)}
        if ids is not None:
            fns["cache"] = lambda: ours.run_with_cache(ids)
            fns["no_pattern"] = lambda: ours.run_with_cache(ids, names=no_pattern)
        t = paired(fns, repeats)
        cached = ((t["cache"] * 1e3, t["cache"] / t["none"], t["no_pattern"] * 1e3, t["no_pattern"] / t["none"])
                  if ids is not None else ("n/a",) * 4)
        table.add(label, t["none"] * 1e3, t["bare"] * 1e3, t["none"] / t["bare"], t["noop"] * 1e3, *cached)

    with torch.inference_mode():
        for T in lengths:
            ids = torch.randint(0, ours.config.vocab_size, (1, T), device=args.device)
            row(f"prefill T={T}", lambda: ours(ids), ids)
        ids = torch.randint(0, ours.config.vocab_size, (1, prompt), device=args.device)
        row("generate", lambda: ours.generate(ids, max_new_tokens=new))
    table.write_csv(args.csv)


if __name__ == "__main__":
    main()
