"""Prefill latency: one forward over a (B, T) prompt, nanogpt2 vs transformers (eager and sdpa), same weights.

    python benchmarks/prefill.py [--quick] [--csv out.csv] [--compile] [--device cuda --dtype bfloat16]

Reports median milliseconds and the ratio nanogpt2 / transformers-sdpa (< 1 means we are faster). Each
shape first checks that the logits agree (a speed figure for a wrong result is never printed).
"""
import torch

from common import Table, base_parser, machine_line, model_pair, paired


def main():
    p = base_parser(__doc__)
    p.add_argument("--compile", action="store_true", help="also time nanogpt2 under torch.compile")
    args = p.parse_args()
    repeats = args.repeats or (2 if args.quick else 5)
    shapes = [(1, 16), (2, 32)] if args.quick else [(1, 128), (1, 512), (1, 1024), (4, 256), (8, 128), (4, 1024)]
    print(machine_line())
    ours, hf = model_pair(args, hf_attn="sdpa")
    _, hf_eager = model_pair(args, hf_attn="eager")
    print(f"# prefill, {args.dtype}, GPT-2 {'tiny' if args.quick else args.preset} shape, logits for every position")
    fns_extra = {}
    if args.compile:
        compiled = torch.compile(ours)
        fns_extra["compiled"] = compiled
    cols = [("B", 4), ("T", 6), ("nanogpt2 ms", 13), ("hf-sdpa ms", 12), ("hf-eager ms", 13), ("ratio", 8)]
    if args.compile:
        cols += [("compiled ms", 13), ("ratio", 8)]
    table = Table(cols + [("max|dlogit|", 13)])
    tol = 1e-3 if args.dtype == "float32" else 0.15
    for B, T in shapes:
        ids = torch.randint(0, ours.config.vocab_size, (B, T), device=args.device)
        with torch.inference_mode():
            diff = (ours(ids).logits.float() - hf(ids).logits.float()).abs().max().item()
            if diff > tol:
                raise SystemExit(f"logits differ by {diff:.3g} > {tol} at B={B} T={T}: refusing to time a wrong result")
            fns = {"ours": lambda: ours(ids), "sdpa": lambda: hf(ids), "eager": lambda: hf_eager(ids)}
            if args.compile:
                fns["compiled"] = lambda: fns_extra["compiled"](ids)
            t = paired(fns, repeats, warmup=2 if args.compile else 1)
        row = [B, T, t["ours"] * 1e3, t["sdpa"] * 1e3, t["eager"] * 1e3, t["ours"] / t["sdpa"]]
        if args.compile:
            row += [t["compiled"] * 1e3, t["compiled"] / t["sdpa"]]
        table.add(*row, diff)
    table.write_csv(args.csv)


if __name__ == "__main__":
    main()
