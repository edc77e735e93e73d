"""`k2rl` command line: each subcommand lives in its own module under `k2rl.commands`.

A command module defines `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int`; this file
only discovers and dispatches, so adding a command never touches it.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import k2rl.commands
from k2rl.validation import ValidationFailed


def _commands():
    for info in sorted(pkgutil.iter_modules(k2rl.commands.__path__), key=lambda i: i.name):
        yield importlib.import_module(f"k2rl.commands.{info.name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="k2rl", description="Agentic RL for the Kimi K2 model family.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _commands():
        cmd = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(cmd)
        cmd.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args) or 0
    except ValidationFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
