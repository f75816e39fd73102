"""`edged keys generate DIR`: CURVE key pairs for the daemon and its clients."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("keys", help="manage CURVE keys for tcp endpoints")
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION")
    gen = sub.add_parser(
        "generate",
        help="write NAME.key (public) and NAME.key_secret (secret, mode 0600) into DIR",
        description="Generate a CURVE key pair. Give the server its NAME.key_secret "
        "([server] curve_secret_key) and copy each client's NAME.key into the directory named "
        "by [server] curve_client_keys.",
    )
    gen.add_argument("dir", type=Path, metavar="DIR")
    gen.add_argument("--name", default="server", help="file name stem (default: server)")
    gen.add_argument("--force", action="store_true", help="overwrite an existing pair")
    gen.set_defaults(func=generate)
    parser.set_defaults(func=lambda args: parser.print_help(sys.stderr) or 2)


def generate(args: argparse.Namespace) -> int:
    import os

    import zmq.auth

    directory: Path = args.dir
    public, secret = directory / f"{args.name}.key", directory / f"{args.name}.key_secret"
    if not args.force and (public.exists() or secret.exists()):
        print(f"edged keys: {public} or {secret} exists; use --force to overwrite",
              file=sys.stderr)
        return 1
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    old = os.umask(0o077)
    try:
        public_file, secret_file = zmq.auth.create_certificates(directory, args.name)
    finally:
        os.umask(old)
    os.chmod(secret_file, 0o600)
    os.chmod(public_file, 0o644)
    print(f"public key: {public_file}\nsecret key: {secret_file}")
    return 0
