"""The ``pfpl`` command line: one module per command, one error handler.

Every command module imports only the standard library, :mod:`pfpl.config` and :mod:`pfpl.errors`
at the top, so ``pfpl --help`` and a config error answer without importing torch; the numerical
stack is imported inside the command once its arguments and config are valid.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pfpl.cli import audit, bench, export, flower, inspect_prompt, predict, pretrain, quality, run, sweep, zeroshot
from pfpl.errors import PfplError

COMMANDS = (run, sweep, audit, export, inspect_prompt, predict, zeroshot, quality, bench, pretrain, flower)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pfpl", description="Private, personalized federated prompt learning.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s", stream=sys.stderr
    )
    try:
        return args.func(args)
    except PfplError as exc:
        print(f"pfpl: {exc}", file=sys.stderr)
        return 2
