"""The `edged` command line: discovers the sub-commands in `edged.commands` and runs one."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

import edged
import edged.commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edged",
        description="On-device LLM router: ONNX zoo, MESS+ routing, measured energy.",
    )
    parser.add_argument("--version", action="version", version=f"edged {edged.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(edged.commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"edged.commands.{info.name}")
        module.register(subparsers)
    return parser


def entry() -> int:
    """The console script and `python -m edged`: `main`, after re-executing with huge pages
    for the weights where that helps (`edged.hugepages`; EDGED_HUGE_PAGES=0 opts out)."""
    from edged.hugepages import reexec_if_useful

    reexec_if_useful(sys.argv[1:])
    return main()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
