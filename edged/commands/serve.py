"""`edged serve`: run the daemon in the foreground (systemd runs exactly this)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the daemon (ZeroMQ + msgpack) in the foreground",
        description="Serve the zoo on a ZeroMQ ROUTER socket. SIGTERM drains and exits 0; "
        "SIGHUP reloads the config. Without --config and --model, serves the demo zoo.",
    )
    parser.add_argument("--config", type=Path, help="TOML config file (docs/daemon.md)")
    parser.add_argument("--endpoint", help="ipc://PATH or tcp://HOST:PORT (or $EDGED_ENDPOINT)")
    parser.add_argument("--model", dest="models", action="append", type=Path, default=[],
                        metavar="DIR", help="serve these model dirs, cheapest first (repeat)")
    parser.add_argument("--state-dir", type=Path, help="where the router state is kept")
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging

    from edged.server import Overrides, Server

    # journald adds its own timestamps
    fmt = "%(levelname)s %(message)s" if os.environ.get("JOURNAL_STREAM") else (
        "%(asctime)s %(levelname)s %(message)s")
    logging.basicConfig(level=args.log_level.upper(), format=fmt, stream=sys.stderr)
    overrides = Overrides(
        endpoint=args.endpoint or None,  # $EDGED_ENDPOINT: applied (and checked) by the config
        state_dir=args.state_dir,
        model_dirs=tuple(args.models),
    )
    return Server(args.config, overrides).run()
