"""Write one layer's attention heads over a text as an interactive page: one self-contained HTML file.

    python tools/attention_view.py --model shakespeare-tiny --text "To be, or not to be" --layer 1 --out view.html

Open the file in any browser (it works offline: data, CSS and script are inline). A grid of heatmaps, one per
head (rows: queries, columns: keys); click one to enlarge it; hover a cell to read its query token, key token
and weight, and to see the text coloured by where that query looks (nanogpt2/attention_view.py).
"""
from __future__ import annotations

import argparse
import os
import sys

from nanogpt2.analysis import add_model_and_text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_text(parser)
    parser.add_argument("--layer", type=int, required=True, help="block index, 0-based")
    parser.add_argument("--out", default=None, help="HTML file to write (default: attention_layer<L>.html)")
    args = parser.parse_args(argv)

    from nanogpt2 import GPT2LMHeadModel
    from nanogpt2.attention_view import attention_html

    out = args.out or f"attention_layer{args.layer}.html"
    try:
        model = GPT2LMHeadModel.from_pretrained(args.model).eval()
        cfg = model.config
        page = attention_html(model, args.text, args.layer,
                              title=f"{args.model}: layer {args.layer} of {cfg.n_layer}, {cfg.n_head} heads")
    except ValueError as e:  # bad flag values, unloadable model, text the model cannot take
        parser.error(str(e))
    with open(out, "w", encoding="utf-8") as f:
        f.write(page)
    print(f"wrote {out} (layer {args.layer}, {cfg.n_head} heads, {os.path.getsize(out) / 1e3:.0f} kB): open it in a browser")
    return 0


if __name__ == "__main__":
    sys.exit(main())
