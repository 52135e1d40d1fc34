"""Decode throughput: greedy generation over the KV cache, nanogpt2 vs transformers, same weights and prompts.

    python benchmarks/decode.py [--quick] [--csv out.csv] [--batches 1 8] [--new-tokens 128 512] [--compile]
                                [--device cuda --dtype bfloat16]

Decode time is separated from the prompt: each implementation runs `generate` with N new tokens and with 1, and
decode = (t_N - t_1) over N - 1 steps, so prefill, setup and nanogpt2's one-off weight packing cancel (the
end-to-end figure is benchmarks/generate.py's). Columns:
  tok/s        new tokens per second over all rows (B * steps / decode time)
  ms/step      one decode step (all B rows)
  GB/s         weight bytes read per step (every weight once; common.weight_bytes) / ms/step
  x floor      ms/step / (weight bytes / read bandwidth), the bandwidth measured in this run by streaming a
               buffer as large as the weights (common.read_bandwidth): 1.0 would be every step at memory speed
  vs sdpa      nanogpt2 tok/s / transformers-sdpa tok/s (> 1: we are faster)
On CPU, "unpacked" is nanogpt2 with pack_weights=False (plain F.linear): the effect of nanogpt2/packed.py.
On CUDA, "hf-static" is transformers with cache_implementation="static" (which it compiles itself).
--compile adds nanogpt2's generate(compile=True): the fixed-shape step through torch.compile, compiled before
timing.
Random weights use initializer_range=0.1 so logits are peaky; in float32 both sides must produce the same tokens
before any speed is printed. In bfloat16/float16 rounding flips near-ties, after which sequences part: there
every implementation's tokens must each be float32's greedy choice to within a near-tie (common.check_greedy).
"""
import torch

from common import (Table, base_parser, check_greedy, float32_judge, machine_line, model_pair, paired,
                    read_bandwidth, weight_bytes)

PROMPT = 16


def main():
    p = base_parser(__doc__)
    p.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default CPU: 1 8; GPU: 1 8 64)")
    p.add_argument("--new-tokens", type=int, nargs="+", default=None,
                   help="new tokens per row (default CPU: 128; GPU: 128 512)")
    p.add_argument("--compile", action="store_true",
                   help="also time nanogpt2's generate(compile=True) (compiled once, before timing)")
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    repeats = args.repeats or (1 if args.quick else 3)
    batches = args.batches or ([1, 2] if args.quick else [1, 8, 64] if cuda else [1, 8])
    new_tokens = args.new_tokens or ([8] if args.quick else [128, 512] if cuda else [128])

    print(machine_line())
    ours, hf = model_pair(args, attn_implementation="auto", hf_attn="sdpa", initializer_range=0.1)
    _, hf_eager = model_pair(args, hf_attn="eager", initializer_range=0.1)
    judge = float32_judge(args, initializer_range=0.1)
    wbytes = weight_bytes(ours)
    bw = read_bandwidth(wbytes, args.device)
    floor_ms = wbytes / bw * 1e3
    print(f"# greedy decode, {args.dtype}, GPT-2 {'tiny' if args.quick else args.preset} shape, prompt {PROMPT}; "
          f"weights {wbytes / 1e6:.0f} MB, read bandwidth {bw / 1e9:.1f} GB/s -> floor {floor_ms:.2f} ms/step; "
          f"nanogpt2 attention: {ours.attn_implementation}")
    V, eos = ours.config.vocab_size, ours.config.eos_token_id

    def run_ours(ids, n, **kw):
        return ours.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, **kw)

    def run_hf(model, ids, n, **kw):
        return model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                              min_new_tokens=n, pad_token_id=eos, **kw)

    impls = {"ours": run_ours, "sdpa": lambda ids, n: run_hf(hf, ids, n), "eager": lambda ids, n: run_hf(hf_eager, ids, n)}
    if cuda:
        impls["static"] = lambda ids, n: run_hf(hf, ids, n, cache_implementation="static")
    else:
        impls["unpacked"] = lambda ids, n: run_ours(ids, n, pack_weights=False)
    extra = "hf-static" if cuda else "unpacked"
    cols = [("B", 4), ("new", 5), ("nanogpt2 tok/s", 15), ("hf-sdpa tok/s", 14), ("hf-eager tok/s", 15),
            (f"{extra} tok/s", 16), ("vs sdpa", 8), ("ms/step", 9), ("GB/s", 7), ("x floor", 8)]
    if args.compile:
        impls["compiled"] = lambda ids, n: run_ours(ids, n, compile=True)
        cols += [("compiled tok/s", 15), ("vs sdpa", 8), ("x floor", 8)]
    table = Table(cols)
    for B in batches:
        for n in new_tokens:
            torch.manual_seed(B)
            ids = torch.randint(0, V, (B, PROMPT), device=args.device)
            with torch.inference_mode():
                ref = run_ours(ids, n)
                failed = []
                for name, fn in impls.items():
                    try:
                        out = fn(ids, n)
                    except Exception as e:   # e.g. transformers' static cache + compile failing on this setup
                        if name != "static":
                            raise
                        print(f"# hf-static skipped: {type(e).__name__}: {str(e)[:200]}")
                        failed.append(name)
                        continue
                    check_greedy(f"{name} at B={B} new={n}", out, ref, PROMPT, judge)
                for name in failed:
                    impls.pop(name)
                fns = {}
                for name, fn in impls.items():
                    fns[name + "_n"] = lambda fn=fn: fn(ids, n)
                    fns[name + "_1"] = lambda fn=fn: fn(ids, 1)
                t = paired(fns, repeats)
            tps = {name: B * (n - 1) / max(t[name + "_n"] - t[name + "_1"], 1e-9) for name in impls}
            step_ms = (t["ours_n"] - t["ours_1"]) / (n - 1) * 1e3
            row = [B, n, tps["ours"], tps["sdpa"], tps["eager"], tps.get("static", tps.get("unpacked", "n/a")),
                   tps["ours"] / tps["sdpa"], step_ms, wbytes / step_ms / 1e6, step_ms / floor_ms]
            if args.compile:
                c_ms = (t["compiled_n"] - t["compiled_1"]) / (n - 1) * 1e3
                row += [tps["compiled"], tps["compiled"] / tps["sdpa"], c_ms / floor_ms]
            table.add(*row)
    table.write_csv(args.csv)


if __name__ == "__main__":
    main()
