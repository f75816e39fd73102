"""Where edged finds its shipped files and keeps its state."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent


def demo_zoo_dir() -> Path:
    """The shipped demo zoo: `$EDGED_DEMO_ZOO`, else `models/demo` beside the package source.

    The demo zoo lives in the repository (not inside the wheel), so the quick start installs edged
    in editable mode; packagers point `EDGED_DEMO_ZOO` at wherever they put it.
    """
    env = os.environ.get("EDGED_DEMO_ZOO")
    return Path(env) if env else _REPO_ROOT / "models" / "demo"


class InsecureDirError(RuntimeError):
    """A directory that holds the daemon's socket can be changed by someone else."""


def check_private_dir(path: Path, *, create: bool = False, mode: int = 0o750) -> Path:
    """`path` as a directory only its owner can change: owned by us (or root), not a symlink,
    not group- or world-writable. Another user who owns it, or may write to it, could rename
    the daemon's socket and bind their own in its place (the fallback runtime dir lives under
    world-writable /tmp). `create` makes it (and missing parents) with `mode`."""
    path = Path(path)
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            path.mkdir(mode=mode)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise InsecureDirError(f"{path} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise InsecureDirError(f"{path} is {what}; refusing to use it for the socket")
    if st.st_uid not in (os.geteuid(), 0):
        raise InsecureDirError(
            f"{path} belongs to uid {st.st_uid}, not to this user ({os.geteuid()}): someone "
            "else could replace the socket in it; remove it or choose another endpoint")
    if st.st_mode & 0o022:
        raise InsecureDirError(
            f"{path} is group- or world-writable (mode {stat.S_IMODE(st.st_mode):04o}): "
            "someone else could replace the socket in it; chmod go-w it or choose another "
            "endpoint")
    return path


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
