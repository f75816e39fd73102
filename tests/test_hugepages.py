"""edged serve/generate re-execute once with glibc's huge-page tunable, only where it helps."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from edged import hugepages
from edged.hugepages import TUNABLE, command_of, should_reexec, with_tunable

GOOD = {"glibc": (2, 36), "mode": "madvise"}


def test_decodes_commands_reexecute_others_do_not() -> None:
    assert should_reexec(["serve", "--config", "x.toml"], {}, **GOOD)
    assert should_reexec(["generate", "hi"], {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
                         **GOOD)
    assert not should_reexec(["health"], {}, **GOOD)
    assert not should_reexec(["--version"], {}, **GOOD)
    assert not should_reexec([], {}, **GOOD)
    assert command_of(["--version", "serve"]) == "serve"


@pytest.mark.parametrize("env", [{"GLIBC_TUNABLES": TUNABLE}, {"EDGED_HUGE_PAGES": "0"},
                                 {"EDGED_HUGE_PAGES": "off"}, {"_EDGED_HUGE_PAGES_EXEC": "1"}])
def test_set_already_opted_out_or_done_once(env: dict[str, str]) -> None:
    assert not should_reexec(["serve"], env, **GOOD)


@pytest.mark.parametrize(("glibc", "mode"), [(None, "madvise"), ((2, 34), "always"),
                                              ((2, 36), "never"), ((2, 36), None)])
def test_only_where_glibc_and_the_kernel_can(glibc: tuple[int, int] | None,
                                              mode: str | None) -> None:
    assert not should_reexec(["serve"], {}, glibc=glibc, mode=mode)


def test_tunable_is_appended_to_existing_ones() -> None:
    env = with_tunable({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "PATH": "/bin"})
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}"
    assert env["PATH"] == "/bin"
    assert with_tunable({})["GLIBC_TUNABLES"] == TUNABLE


_PROBE = ("import os; from edged.hugepages import reexec_if_useful; "
          "reexec_if_useful(['generate']); "
          "print(repr(os.environ.get('GLIBC_TUNABLES', '')), os.getpid())")


def _probe(**extra: str) -> tuple[str, int, int]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "EDGED_HUGE_PAGES", "_EDGED_HUGE_PAGES_EXEC")}
    proc = subprocess.Popen([sys.executable, "-c", _PROBE], env={**env, **extra},
                            stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    tunables, pid = out.split()
    return tunables.strip("'"), int(pid), proc.pid


@pytest.mark.skipif(not should_reexec(["serve"], {}, glibc=hugepages.glibc_version(),
                                      mode=hugepages.thp_mode()),
                    reason="no glibc >= 2.35 with transparent huge pages here")
def test_the_process_replaces_itself_with_the_tunable_same_pid() -> None:
    tunables, pid, started = _probe()
    assert tunables == TUNABLE
    assert pid == started  # exec, not a child: systemd's main PID stays the same
    tunables, _, _ = _probe(EDGED_HUGE_PAGES="0")
    assert tunables == ""
