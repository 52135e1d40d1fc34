"""End-to-end `generate`: prompt in, tokens out, nanogpt2 vs transformers, same weights, prompts and settings.

    python benchmarks/generate.py [--quick] [--csv out.csv] [--device cuda --dtype bfloat16]

What a user waits for: one `generate` call, timed whole (prefill, decoding, and nanogpt2's weight packing on
CPU, which it does per call). Modes: greedy, beam search (4 beams, 2 returned), and greedy over a
left-padded batch. Each mode first checks that both implementations return the same tokens; a speed figure for
a different output is never printed. "speedup" = transformers-sdpa seconds / nanogpt2 seconds (> 1: we are
faster). Random weights use initializer_range=0.1 so the logits are peaky (greedy and beam choices do not
hinge on rounding).
"""
import torch

from common import Table, base_parser, machine_line, model_pair, paired


def main():
    p = base_parser(__doc__)
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per row (default 64; quick: 6)")
    args = p.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    n = args.new_tokens or (6 if args.quick else 64)

    print(machine_line())
    ours, hf = model_pair(args, attn_implementation="auto", hf_attn="sdpa", initializer_range=0.1)
    _, hf_eager = model_pair(args, hf_attn="eager", initializer_range=0.1)
    V = ours.config.vocab_size
    pad = ours.config.eos_token_id if ours.config.eos_token_id < V else 0   # the quick model's vocab lacks 50256
    print(f"# generate, {args.dtype}, GPT-2 {'tiny' if args.quick else args.preset} shape, {n} new tokens per "
          f"row, nanogpt2 attention: {ours.attn_implementation}")

    torch.manual_seed(0)
    padded = torch.randint(0, V, (4, 32), device=args.device)
    mask = torch.ones_like(padded)
    for row, n_pad in enumerate([0, 5, 11, 20]):   # left padding, as generation needs
        mask[row, :n_pad] = 0
        padded[row, :n_pad] = pad
    modes = [  # name, input ids, attention mask, generate() arguments
        ("greedy", torch.randint(0, V, (1, 16), device=args.device), None, {}),
        ("greedy", torch.randint(0, V, (1, 128), device=args.device), None, {}),
        ("beam 4", torch.randint(0, V, (1, 16), device=args.device), None,
         dict(num_beams=4, num_return_sequences=2, length_penalty=1.0)),
        ("padded", padded, mask, {}),
    ]
    table = Table([("mode", 8), ("B", 4), ("T", 5), ("new", 5), ("nanogpt2 s", 12), ("hf-sdpa s", 11),
                   ("hf-eager s", 12), ("speedup", 9)])
    for name, ids, am, kw in modes:
        am = torch.ones_like(ids) if am is None else am   # random prompts may contain the pad id: say "no padding"
        kw = dict(kw, max_new_tokens=n, min_new_tokens=n, pad_token_id=pad)
        hf_kw = dict(kw, do_sample=False, attention_mask=am)
        fns = {"ours": lambda: ours.generate(ids, attention_mask=am, **kw),
               "sdpa": lambda: hf.generate(ids, **hf_kw),
               "eager": lambda: hf_eager.generate(ids, **hf_kw)}
        with torch.inference_mode():
            ref = fns["ours"]()
            for impl in ("sdpa", "eager"):
                out = fns[impl]()
                if not torch.equal(out.cpu(), ref.cpu()):
                    raise SystemExit(f"transformers-{impl} returned different tokens from nanogpt2 in mode {name!r} "
                                     f"(B={ids.shape[0]}, T={ids.shape[1]}): refusing to time a wrong result")
            t = paired(fns, repeats)
        table.add(name, ids.shape[0], ids.shape[1], n, t["ours"], t["sdpa"], t["eager"], t["sdpa"] / t["ours"])
    table.write_csv(args.csv)


if __name__ == "__main__":
    main()
