"""A command line built from a config dataclass, so each option's default and help are written once.

    @dataclass
    class EvalConfig:
        stride: int = flag("tokens between window starts", default=512)

    cfg = EvalConfig(**vars(dataclass_parser(EvalConfig).parse_args()))     # --stride 512

Used by tools/train.py (TrainConfig) and tools/eval_perplexity.py (EvalConfig).
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Optional


def flag(help: str, **kw):
    """A dataclass field that carries its --help text (field(default=..., metadata={"help": ...}))."""
    return dataclasses.field(metadata={"help": help}, **kw)


def dataclass_parser(config_class, prog: Optional[str] = None, description: Optional[str] = None,
                     required: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """argparse with one flag per field of `config_class` (--max-steps for max_steps), the field's default and
    its `help` metadata; bools get --flag / --no-flag; Optional[int] parses as int. Fields named in `required`
    must be given."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        name = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=f.default, help=f.metadata["help"])
            continue
        base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # Optional[int] -> int
        parser.add_argument(name, type=base, default=f.default, help=f.metadata["help"], required=f.name in required)
    return parser
