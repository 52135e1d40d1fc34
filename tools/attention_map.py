"""Draw one layer's attention probabilities over a text as a heatmap: one head, or every head in a grid.

    python tools/attention_map.py --model shakespeare-tiny --text "To be, or not to be" --layer 2 --head 5 --out a.png
    python tools/attention_map.py --layer 2 --out heads.png          # all heads of layer 2, default text

Rows are queries (the attending token), columns keys; tokens label both axes, quoted so spaces show. The
causal upper triangle (keys after the query) is blank. Needs matplotlib: pip install 'nanogpt2[viz]'.
"""
from __future__ import annotations

import argparse
import sys

from nanogpt2.analysis import add_model_and_text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_text(parser)
    parser.add_argument("--layer", type=int, required=True, help="block index, 0-based")
    parser.add_argument("--head", type=int, default=None, help="head index, 0-based (default: every head, as a grid)")
    parser.add_argument("--out", default=None, help="image file; the format follows the suffix "
                        "(default: attention_layer<L>[_head<H>].png)")
    args = parser.parse_args(argv)

    from nanogpt2 import GPT2LMHeadModel
    from nanogpt2.analysis import attention_maps, check_index, encode, plot_attention, require_matplotlib, token_label

    out = args.out or f"attention_layer{args.layer}" + (f"_head{args.head}" if args.head is not None else "") + ".png"
    try:
        require_matplotlib()  # before the model loads: say what is missing first
        model = GPT2LMHeadModel.from_pretrained(args.model).eval()
        cfg = model.config
        check_index("--layer", args.layer, cfg.n_layer, f"{args.model} has {cfg.n_layer} layers")
        if args.head is not None:
            check_index("--head", args.head, cfg.n_head, f"{args.model} has {cfg.n_head} heads per layer")
        input_ids = encode(model, args.text)                     # (1, T)
        probs = attention_maps(model, input_ids, args.layer)[0]  # (H, T, T)
        tokens = [token_label(i) for i in input_ids[0].tolist()]
        which = f"head {args.head}" if args.head is not None else f"all {cfg.n_head} heads"
        plot_attention(probs, tokens, out, head=args.head, title=f"{args.model}: layer {args.layer}, {which}")
    except (ValueError, ImportError) as e:  # bad flag values, unloadable model, missing matplotlib
        parser.error(str(e))
    print(f"wrote {out} (layer {args.layer}, {which}, {len(tokens)} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
