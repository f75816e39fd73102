"""One module per `edged` sub-command.

Each module defines `register(subparsers)`, which adds its parser(s) and sets `func` to a
callable taking the parsed arguments and returning an exit code. Modules must import only the
standard library at import time, so `edged --help` stays fast; heavy imports go inside `func`.
"""
