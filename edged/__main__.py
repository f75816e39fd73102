"""`python -m edged` is the same as the `edged` console script."""

from edged.cli import entry

raise SystemExit(entry())
