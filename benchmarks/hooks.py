"""What the named activation points cost: nanogpt2 with no hook set versus nanogpt2 with the points removed.

    python benchmarks/hooks.py [--quick] [--csv out.csv] [--device cuda --dtype bfloat16]

Every point in the model is a call `hook(name, x)` (nanogpt2/hooks.py) that returns x at once when no hook is
set. To price that, the same model is also timed with the registry's __call__ swapped for a bare `return x`
("no points": as if the calls were not in the source), and, for scale, with every point read (run_with_cache)
and with one no-op hook per point. Prefill (one forward) and a 32-token greedy generate, B=1.
"none / no points" is the overhead of the points when nothing is hooked: 1.00 means none measurable.
"""
import torch

from common import Table, base_parser, machine_line, model_pair, paired
from nanogpt2.hooks import HookRegistry


def main():
    p = base_parser(__doc__)
    args = p.parse_args()
    repeats = args.repeats or (2 if args.quick else 7)
    T, new = (16, 4) if args.quick else (256, 32)
    print(machine_line())
    ours, _ = model_pair(args, initializer_range=0.1)
    names = ours.activation_names()
    print(f"# hook points, {args.dtype}, GPT-2 {'tiny' if args.quick else args.preset} shape, {len(names)} points; "
          f"prefill B=1 T={T}, generate B=1 {new} new tokens")
    ids = torch.randint(0, ours.config.vocab_size, (1, T), device=args.device)
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

    table = Table([("work", 10), ("none ms", 10), ("no points ms", 14), ("none / no points", 18),
                   ("no-op hooks ms", 16), ("cache all ms", 14)])
    work = {"prefill": lambda: ours(ids), "generate": lambda: ours.generate(ids[:, :16], max_new_tokens=new)}
    with torch.inference_mode():
        for label, fn in work.items():
            fns = {"none": fn, "bare": without_points(fn), "noop": with_noop_hooks(fn)}
            if label == "prefill":
                fns["cache"] = lambda: ours.run_with_cache(ids)
            t = paired(fns, repeats)
            table.add(label, t["none"] * 1e3, t["bare"] * 1e3, t["none"] / t["bare"], t["noop"] * 1e3,
                      t["cache"] * 1e3 if "cache" in t else "n/a")
    table.write_csv(args.csv)


if __name__ == "__main__":
    main()
