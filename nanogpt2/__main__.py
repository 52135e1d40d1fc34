"""Command line: `python -m nanogpt2 <command>` (or the `nanogpt2` console script). `--help` lists commands."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nanogpt2", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    v = sub.add_parser("verify", help="compare nanogpt2 with transformers on one checkpoint, point by point")
    v.add_argument("--model", default=None,
                   help="local directory, bundled name or hub id (default: a random 124M GPT-2 built by transformers)")
    v.add_argument("--atol", type=float, default=1e-4, help="max |difference| allowed at every point")
    v.add_argument("--attn-implementation", default="sdpa", choices=["auto", "sdpa", "eager", "triton"],
                   help="nanogpt2's attention backend")

    args = parser.parse_args(argv)
    if args.command == "verify":
        from .verify import verify
        return verify(args.model, atol=args.atol, attn_implementation=args.attn_implementation)
    return 2


if __name__ == "__main__":
    sys.exit(main())
