"""Training step throughput: forward + backward + AdamW step, nanogpt2 vs transformers, same weights and data.

    python benchmarks/train_step.py [--quick] [--csv out.csv] [--device cuda --dtype bfloat16]
    python benchmarks/train_step.py --autocast bfloat16 --shapes 16x1024   # fp32 weights, bf16 autocast

Reports median ms per step, tokens/s, the ratio of tokens/s (nanogpt2 / transformers, > 1 means we are
faster) and, on a GPU, model FLOPs utilisation: 6 * params * tokens + attention (12 * L * T * C per token,
PaLM appendix B) against the device's peak dense bf16 FLOP/s. The first step's losses are compared
(a speed figure for a wrong model is never printed). --dtype is the weights' dtype (AdamW updates them in it);
--autocast runs both models' forward under torch.autocast, as training does (tools/train.py's bf16 default on
a GPU), with the weights in --dtype.
"""
import argparse
from contextlib import nullcontext

import torch

from common import Table, base_parser, machine_line, model_pair, paired
from nanogpt2.dtypes import FLAG_CHOICES, dtype_from_name

# dense bf16 peak by device-name substring, first match wins (so "H100 PCIe" before "H100", the SXM part)
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "A10": 125.0,
                    "4090": 165.0}
# (B, T) rows when --shapes is not given
DEFAULT_SHAPES = {"quick": [(2, 32)], "cpu": [(4, 256), (1, 1024)], "gpu": [(12, 1024), (8, 1024)]}


def peak_flops():
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tf in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tf * 1e12
    return None


def shape(text: str) -> tuple[int, int]:
    """'16x1024' -> (16, 1024): batch size x sequence length."""
    try:
        B, T = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {text!r} is not BxT, e.g. 16x1024") from None
    return B, T


def main():
    p = base_parser(__doc__)
    p.add_argument("--shapes", type=shape, nargs="+", default=None,
                   help="BxT per row (default " + "; ".join(f"{k}: " + " ".join(f"{b}x{t}" for b, t in v)
                                                           for k, v in DEFAULT_SHAPES.items()) + ")")
    p.add_argument("--autocast", default=None, choices=FLAG_CHOICES,
                   help="run the forward under torch.autocast to this dtype (default: none)")
    args = p.parse_args()
    repeats = args.repeats or (2 if args.quick else 4)
    shapes = args.shapes or DEFAULT_SHAPES["quick" if args.quick else "cpu" if args.device == "cpu" else "gpu"]
    autocast = (lambda: torch.autocast(torch.device(args.device).type, dtype=dtype_from_name(args.autocast))) \
        if args.autocast else nullcontext
    print(machine_line())
    ours, hf = model_pair(args, hf_attn="sdpa")
    for m in (ours, hf):
        m.train()
        for mod in m.modules():  # dropout off: identical computations to compare losses
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
    ours.transformer.h[0].attn.attn_pdrop = 0.0
    for blk in ours.transformer.h:
        blk.attn.attn_pdrop = 0.0
    opt = {"ours": torch.optim.AdamW(ours.parameters(), lr=1e-4), "hf": torch.optim.AdamW(hf.parameters(), lr=1e-4)}
    n_params = ours.num_parameters()
    cfg = ours.config
    peak = peak_flops()
    print(f"# training step (fwd + bwd + AdamW), {args.dtype} weights"
          + (f", {args.autocast} autocast" if args.autocast else "") + f", {n_params / 1e6:.1f}M parameters")
    table = Table([("B", 4), ("T", 6), ("nanogpt2 ms", 13), ("hf ms", 10), ("ours tok/s", 12), ("hf tok/s", 10),
                   ("ratio", 8), ("MFU", 7), ("|dloss|", 10)])
    for B, T in shapes:
        ids = torch.randint(0, cfg.vocab_size, (B, T), device=args.device)

        def step(name, model):
            def run():
                with autocast():
                    loss = model(ids, labels=ids).loss
                loss.backward()
                opt[name].step()
                opt[name].zero_grad(set_to_none=True)
                return loss
            return run

        la, lb = step("ours", ours)(), step("hf", hf)()
        dloss = abs(la.item() - lb.item())
        if dloss > (1e-3 if args.dtype == "float32" and not args.autocast else 5e-2):
            raise SystemExit(f"losses differ by {dloss:.3g} at B={B} T={T}: refusing to time a wrong result")
        t = paired({"ours": step("ours", ours), "hf": step("hf", hf)}, repeats)
        tokens = B * T
        flops = 6 * n_params * tokens + 12 * cfg.n_layer * T * cfg.n_embd * tokens
        mfu = f"{flops / t['ours'] / peak:.1%}" if peak else "-"
        table.add(B, T, t["ours"] * 1e3, t["hf"] * 1e3, tokens / t["ours"], tokens / t["hf"], t["hf"] / t["ours"],
                  mfu, dloss)
    table.write_csv(args.csv)


if __name__ == "__main__":
    main()
