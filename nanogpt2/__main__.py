"""Command line: `python -m nanogpt2 <command>` (or the `nanogpt2` console script). `--help` lists commands."""
from __future__ import annotations

import argparse
import sys

# both commands' modules, for their flags; neither imports transformers (an optional extra) at import time:
# verify asks for it when a run needs it and says how to install it when it is missing, and generate never does
from . import cli_generate, verify


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nanogpt2", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    v = sub.add_parser("verify", help="compare nanogpt2 with transformers, and its own paths with each other, at "
                       "every named point", description=verify.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_arguments(v)

    g = sub.add_parser("generate", help="continue a prompt, streaming the text (greedy, sampling or beam search)",
                       description=cli_generate.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli_generate.add_arguments(g)

    args = parser.parse_args(argv)
    if args.command == "verify":
        return verify.main(args)
    if args.command == "generate":
        return cli_generate.main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
