"""``skysense`` command line: a thin layer over the library.

Each sub-command lives in the module that implements it, which exposes
``register(subparsers)`` adding its parser with ``set_defaults(run=function)``; ``run`` takes the
parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "skysense.commands.info",
    "skysense.commands.convert",
    "skysense.commands.demo",
    "skysense.commands.datasets",
    "skysense.commands.pretrain",
    "skysense.commands.shard",
    "skysense.commands.evaluate",
    "skysense.commands.finetune",
    "skysense.commands.embed",
    "skysense.commands.predict",
    "skysense.commands.zonal",
    "skysense.commands.similar",
    "skysense.commands.export",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skysense", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError) as error:
        print(f"skysense {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
