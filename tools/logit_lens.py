"""Print the logit lens of a text: what ln_f + lm_head read off the residual stream after the embedding and
after every block, as the top-k next tokens at each position, in a fixed-width table.

    python tools/logit_lens.py --model shakespeare-tiny --text "To be, or not to be" --top-k 3 --positions -2 -1

The last block's row is the model's own prediction; earlier rows show how it forms layer by layer
(nostalgebraist, "interpreting GPT: the logit lens", 2020). A * marks the token that actually comes next.
"""
from __future__ import annotations

import argparse
import sys

from nanogpt2.analysis import add_model_and_text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_and_text(parser)
    parser.add_argument("--top-k", type=int, default=5, help="tokens shown per layer and position")
    parser.add_argument("--positions", type=int, nargs="+", default=None, metavar="P",
                        help="token positions to show, 0-based; negative counts from the end (default: all)")
    args = parser.parse_args(argv)

    from nanogpt2 import GPT2LMHeadModel
    from nanogpt2.analysis import encode, format_logit_lens, logit_lens_top_k, resolve_positions

    try:
        model = GPT2LMHeadModel.from_pretrained(args.model).eval()
        input_ids = encode(model, args.text)  # (1, T)
        positions = resolve_positions(args.positions, input_ids.shape[1], what="--positions")
        probs, ids = logit_lens_top_k(model, input_ids, k=args.top_k)  # (n_layer + 1, 1, T, k) each
    except ValueError as e:  # bad flag values, unloadable model, text the model cannot read
        parser.error(str(e))
    n_layer, T = model.config.n_layer, input_ids.shape[1]
    print(f"logit lens: {args.model} ({n_layer} layers), {T} tokens; top {args.top_k} next tokens of ln_f + lm_head "
          f"on the embedding and on each block's output (h.{n_layer - 1} = the model's prediction); "
          "* = the actual next token\n")
    print(format_logit_lens(probs[:, 0], ids[:, 0], input_ids[0].tolist(), positions), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
