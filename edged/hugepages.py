"""Transparent huge pages for the weights: `edged serve` and `edged generate` re-execute
themselves once with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 when it is unset.

CPU decoding streams every weight once per token. onnxruntime keeps them in malloc'd memory,
and with 4 KiB pages the TLB misses cost SmolLM2-135M int4 a tenth to a fifth of its decode
speed on this project's development box (docs/zoo.md, "Speed"). glibc (>= 2.35) backs malloc
with transparent huge pages when the tunable says so, but reads GLIBC_TUNABLES only when the
process starts: there is no call to switch it on later, so a process that wants it and lacks it
has to exec itself again. That is an `execv` of the same interpreter with the same arguments
before anything else happened (same PID, so systemd's Type=notify and NotifyAccess=main still
hold), done only when it can help: Linux with glibc >= 2.35 and transparent huge pages in
`madvise` or `always` mode. The systemd unit sets the variable itself, so the daemon it starts
never re-executes.

Opt out with EDGED_HUGE_PAGES=0 (the process then runs as started). `edged.cli.main` never
re-executes (tests and embedders call it in-process); the console script and `python -m edged`
go through `entry`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "EDGED_HUGE_PAGES"  # "0" / "no" / "off" / "false": never re-execute
_DONE = "_EDGED_HUGE_PAGES_EXEC"  # set on the re-executed process: never twice
COMMANDS = frozenset({"serve", "generate"})  # the ones that load models and decode
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the running glibc, None elsewhere (musl, macOS, Windows)."""
    try:
        name, _, version = os.confstr("CS_GNU_LIBC_VERSION").partition(" ")
    except (AttributeError, ValueError, OSError):
        return None
    if name != "glibc":
        return None
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return None
    return major, minor


def thp_mode() -> str | None:
    """The kernel's transparent huge page mode (always / madvise / never), None if unknown."""
    try:
        text = _THP.read_text()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def command_of(argv: Sequence[str]) -> str | None:
    """The sub-command in edged's arguments: the first one that is not an option."""
    return next((a for a in argv if not a.startswith("-")), None)


def should_reexec(argv: Sequence[str], env: Mapping[str, str], *,
                  glibc: tuple[int, int] | None, mode: str | None) -> bool:
    """Whether a process started with these arguments and environment gains by re-executing."""
    if env.get(OPT_OUT, "").strip().lower() in ("0", "no", "off", "false") or env.get(_DONE):
        return False
    if "hugetlb" in env.get("GLIBC_TUNABLES", ""):
        return False
    if command_of(argv) not in COMMANDS:
        return False
    return glibc is not None and glibc >= (2, 35) and mode in ("always", "madvise")


def with_tunable(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with the huge-page tunable added to whatever GLIBC_TUNABLES already holds."""
    out = dict(env)
    out["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), TUNABLE]))
    out[_DONE] = "1"
    return out


def reexec_if_useful(argv: Sequence[str]) -> None:
    """Replace this process with itself plus the tunable, when that helps; else return."""
    if not should_reexec(argv, os.environ, glibc=glibc_version(), mode=thp_mode()):
        return
    orig = getattr(sys, "orig_argv", None)  # the interpreter's own flags too (-m edged, -X ...)
    if not orig or not sys.executable:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *orig[1:]], with_tunable(os.environ))
    except OSError:  # cannot exec (seccomp, odd interpreter): run as started
        return
