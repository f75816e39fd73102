"""`edged http`: the OpenAI-compatible HTTP front, /metrics and the status page (docs/http.md)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_CONFIG = 2  # as `edged serve`: the unit does not restart on a config error


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "http", help="OpenAI-compatible HTTP front, /metrics and a status page",
        description="Serve OpenAI's /v1/chat/completions, /v1/completions and /v1/models, "
        "/v1/feedback, /health, Prometheus /metrics and a live status page at /, as a client "
        "of the daemon's socket. Needs the `http` extra (pip install 'edged[http]').")
    parser.add_argument("--listen", default=os.environ.get("EDGED_HTTP_LISTEN", "127.0.0.1:8080"),
                        help="HOST:PORT (default $EDGED_HTTP_LISTEN, else 127.0.0.1:8080); "
                        "a non-loopback address needs an API key")
    parser.add_argument("--api-key-file", type=Path,
                        help="file holding the bearer API key (mode 0600); or $EDGED_HTTP_API_KEY")
    parser.add_argument("--endpoint", help="daemon endpoint (default: $EDGED_ENDPOINT, else the "
                        "ipc socket in the runtime directory)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds a generation may wait for the daemon (default 600)")
    parser.add_argument("--server-key", type=Path, help="CURVE: the daemon's public key file")
    parser.add_argument("--client-cert", type=Path, help="CURVE: our key_secret file")
    parser.add_argument("--log-level", default="warning",
                        choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from edged.http import HttpConfig, HttpConfigError, serve
        from edged.http.server import check_exposure, load_api_key, parse_listen, sd_notify
    except ImportError as exc:
        print(f"edged http: {exc.name or exc} is missing: pip install 'edged[http]'",
              file=sys.stderr)
        return EXIT_CONFIG
    from edged.commands.client_cmds import endpoint_of

    try:
        host, port = parse_listen(args.listen)
        key = os.environ.get("EDGED_HTTP_API_KEY") or None
        if args.api_key_file is not None:
            key = load_api_key(args.api_key_file)
        check_exposure(host, key)
    except HttpConfigError as exc:
        print(f"edged http: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    endpoint = endpoint_of(args)
    config = HttpConfig(endpoint=endpoint, api_key=key, timeout_s=args.timeout,
                        curve_server_key=args.server_key, curve_client_cert=args.client_cert)

    def ready(bound: str) -> None:
        print(f"edged http: listening on http://{bound} (daemon {endpoint})", file=sys.stderr,
              flush=True)
        sd_notify("READY=1", f"STATUS=serving http://{bound}", f"MAINPID={os.getpid()}")

    try:
        serve(config, host, port, log_level=args.log_level, on_ready=ready)
    except OSError as exc:  # address in use, permission denied
        print(f"edged http: cannot listen on {args.listen}: {exc.strerror or exc}",
              file=sys.stderr)
        return EXIT_CONFIG
    sd_notify("STOPPING=1", "STATUS=stopped")
    return 0
