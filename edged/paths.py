"""Where edged finds its shipped files and keeps its state."""

from __future__ import annotations

import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent


def demo_zoo_dir() -> Path:
    """The shipped demo zoo: `$EDGED_DEMO_ZOO`, else `models/demo` beside the package source.

    The demo zoo lives in the repository (not inside the wheel), so the quick start installs edged
    in editable mode; packagers point `EDGED_DEMO_ZOO` at wherever they put it.
    """
    env = os.environ.get("EDGED_DEMO_ZOO")
    return Path(env) if env else _REPO_ROOT / "models" / "demo"


def runtime_dir() -> Path:
    """`$RUNTIME_DIRECTORY` (systemd), else `$XDG_RUNTIME_DIR/edged`, else `/tmp/edged-<uid>`."""
    for var in ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"):
        value = os.environ.get(var)
        if value:
            base = Path(value.split(":")[0])
            return base if var == "RUNTIME_DIRECTORY" else base / "edged"
    return Path("/tmp") / f"edged-{os.getuid()}"


def state_dir() -> Path:
    """`$STATE_DIRECTORY` (systemd), else `$XDG_STATE_HOME/edged`, else `~/.local/state/edged`."""
    value = os.environ.get("STATE_DIRECTORY")
    if value:
        return Path(value.split(":")[0])
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "edged"
