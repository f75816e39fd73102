"""The daemon's one TOML config file, parsed into explicit dataclasses and validated key by key.

Every error names the file and the key (`edged.toml: [server] queue_size: ...`), so an operator can
fix a broken config from the journal alone. A missing file section means its defaults; defaults
serve the shipped demo zoo on an ipc socket in the runtime directory.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENDPOINT_ENV = "EDGED_ENDPOINT"
_SCHEMES = ("ipc://", "tcp://")


class ConfigError(ValueError):
    """A config value is wrong; the message names the file and the key."""

    def __init__(self, source: str, key: str, message: str) -> None:
        super().__init__(f"{source}: {key}: {message}")
        self.source = source
        self.key = key


@dataclass(frozen=True)
class ServerConfig:
    endpoint: str | None = None          # None: ipc://<runtime dir>/edged.sock
    state_dir: Path | None = None        # None: edged.paths.state_dir()
    queue_size: int = 16                 # queued generations before `busy`
    worker_nice: int = 5                 # generation workers' nice above the socket loop's
    exploration_backlog: int = 8         # queued explorations per device before one runs first
    max_message_bytes: int = 1 << 20     # ZMQ_MAXMSGSIZE and msgpack limits
    deadline_max_ms: int = 600_000       # cap on any request's deadline (and the default)
    save_interval_s: float = 60.0        # router state saved this often when it changed
    hwm: int = 1000                      # ZMQ send/receive high-water marks (messages)
    ipc_mode: int = 0o660                # ipc socket file permissions
    allow_insecure_tcp: bool = False     # bind tcp on a non-loopback address without CURVE
    curve_secret_key: Path | None = None   # server certificate (`edged keys generate`)
    curve_client_keys: Path | None = None  # directory of allowed client public keys


@dataclass(frozen=True)
class EnergyConfig:
    backend: str = "auto"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelsConfig:
    manifest: Path | None = None         # zoo.toml; None with no dirs: the demo zoo
    dirs: tuple[Path, ...] = ()          # ad-hoc zoo, cheapest first


@dataclass(frozen=True)
class LabelsConfig:
    """[labels]: where satisfaction labels come from (docs/daemon.md, "Label sources")."""

    sources: tuple[str, ...] = ("reference", "feedback")
    agreement_checker: str | None = None   # None: the zoo's checker, or text similarity
    similarity: float = 0.85               # free-text agreement threshold (difflib ratio)
    judge_model: str | None = None
    judge_template: str | None = None      # {prompt} and {reply}; None: the built-in one


@dataclass(frozen=True)
class Config:
    source: str = "<defaults>"
    server: ServerConfig = field(default_factory=ServerConfig)
    energy: EnergyConfig = field(default_factory=EnergyConfig)
    router: dict[str, Any] = field(default_factory=dict)   # RouterConfig keyword arguments
    models: ModelsConfig = field(default_factory=ModelsConfig)
    checker: str | None = None           # None: the manifest's checker
    labels: LabelsConfig = field(default_factory=LabelsConfig)

    def where(self, key: str) -> str:
        """`file: key`, for errors found after parsing (an unknown checker or router field)."""
        return f"{self.source}: {key}"


_SECTIONS = ("server", "energy", "router", "models", "labels")


class _Section:
    """Typed getters over one TOML table that raise `ConfigError` naming `[section] key`."""

    def __init__(self, source: str, name: str, table: Any, base: Path) -> None:
        if not isinstance(table, dict):
            raise ConfigError(source, f"[{name}]", "must be a table")
        self.source, self.name, self.table, self.base = source, name, table, base
        self.used: set[str] = set()

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.source, f"[{self.name}] {key}", message)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.used.add(key)
        if key not in self.table:
            return default
        value = self.table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(key, f"must be {' or '.join(k.__name__ for k in kinds)}, not a bool")
        if not isinstance(value, kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise self.error(key, f"must be {names}, not {type(value).__name__}")
        return value

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        value = self.get(key, int, default)
        if not lo <= value <= hi:
            raise self.error(key, f"must be in [{lo}, {hi}], got {value}")
        return value

    def number(self, key: str, default: float | None, lo: float, hi: float) -> float | None:
        value = self.get(key, (int, float), default)
        if value is None:
            return None
        value = float(value)
        if not math.isfinite(value) or not lo <= value <= hi:
            raise self.error(key, f"must be a number in [{lo}, {hi}], got {value}")
        return value

    def path(self, key: str) -> Path | None:
        value = self.get(key, str, None)
        if value is None:
            return None
        if not value:
            raise self.error(key, "must not be empty")
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.base / path

    def finish(self, known_only: bool = True) -> dict[str, Any]:
        """The keys nobody read; an error when the section allows none."""
        rest = {k: v for k, v in self.table.items() if k not in self.used}
        if known_only and rest:
            raise self.error(sorted(rest)[0], "unknown key")
        return rest


def validate_endpoint(endpoint: str, source: str = "<endpoint>", key: str = "endpoint") -> str:
    if not isinstance(endpoint, str) or not endpoint.startswith(_SCHEMES):
        raise ConfigError(source, key, f"must start with ipc:// or tcp://, got {endpoint!r}")
    rest = endpoint.split("://", 1)[1]
    if not rest:
        raise ConfigError(source, key, "has no address after the scheme")
    if endpoint.startswith("tcp://"):
        host, _, port = rest.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(source, key, f"must be tcp://HOST:PORT, got {endpoint!r}")
    return endpoint


def _server(s: _Section) -> ServerConfig:
    endpoint = s.get("endpoint", str, None)
    if endpoint is not None:
        validate_endpoint(endpoint, s.source, "[server] endpoint")
    mode = s.get("ipc_mode", (str, int), "0660")
    if isinstance(mode, str):
        try:
            mode = int(mode, 8)
        except ValueError:
            msg = f"must be an octal string like \"0660\", got {mode!r}"
            raise s.error("ipc_mode", msg) from None
    if not 0 <= mode <= 0o777 or mode & 0o007:
        raise s.error("ipc_mode", "must be an octal mode without bits for others, e.g. 0660")
    config = ServerConfig(
        endpoint=endpoint,
        state_dir=s.path("state_dir"),
        queue_size=s.integer("queue_size", 16, 1, 100_000),
        worker_nice=s.integer("worker_nice", 5, 0, 19),
        exploration_backlog=s.integer("exploration_backlog", 8, 0, 100_000),
        max_message_bytes=s.integer("max_message_bytes", 1 << 20, 1024, 1 << 28),
        deadline_max_ms=s.integer("deadline_max_ms", 600_000, 1, 86_400_000),
        save_interval_s=s.number("save_interval_s", 60.0, 0.1, 86_400.0) or 60.0,
        hwm=s.integer("hwm", 1000, 1, 1_000_000),
        ipc_mode=mode,
        allow_insecure_tcp=s.get("allow_insecure_tcp", bool, False),
        curve_secret_key=s.path("curve_secret_key"),
        curve_client_keys=s.path("curve_client_keys"),
    )
    if (config.curve_secret_key is None) != (config.curve_client_keys is None):
        raise s.error(
            "curve_secret_key" if config.curve_secret_key is None else "curve_client_keys",
            "CURVE needs both curve_secret_key and curve_client_keys",
        )
    s.finish()
    return config


def _router(s: _Section) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "alpha" in s.table:
        out["alpha"] = s.number("alpha", None, 0.0, 1.0)
    if "V" in s.table:
        value = s.get("V", (str, int, float), "auto")
        if isinstance(value, str) and value != "auto":
            raise s.error("V", f"must be \"auto\" or a number >= 0, got {value!r}")
        if not isinstance(value, str):
            value = s.number("V", None, 0.0, 1e12)
        out["V"] = value
    if "c" in s.table:
        out["c"] = s.number("c", None, 0.0, 1.0)
    if "seed" in s.table:
        out["seed"] = s.integer("seed", 0, 0, (1 << 63) - 1)
    # The server checks the rest against RouterConfig's fields (config imports nothing of edged).
    for key, value in s.finish(known_only=False).items():
        if key == "experts":  # the one list-valued field
            if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise s.error(key, f"must be a list of expert names, got {value!r}")
        elif not isinstance(value, (bool, int, float, str)):
            raise s.error(key, "must be a number, bool or string")
        out[key] = value
    return out


def _models(s: _Section) -> ModelsConfig:
    manifest = s.path("manifest")
    dirs = s.get("dirs", list, [])
    if not all(isinstance(d, str) and d for d in dirs):
        raise s.error("dirs", "must be a list of directory paths")
    if manifest is not None and dirs:
        raise s.error("dirs", "give either manifest or dirs, not both")
    paths = tuple(
        p if p.is_absolute() else s.base / p for p in (Path(d).expanduser() for d in dirs)
    )
    s.finish()
    return ModelsConfig(manifest=manifest, dirs=paths)


def _labels(s: _Section) -> LabelsConfig:
    sources = s.get("sources", list, ["reference", "feedback"])
    if not sources or not all(isinstance(x, str) and x for x in sources):
        raise s.error("sources", "must be a non-empty list of source names")
    if len(set(sources)) != len(sources):
        raise s.error("sources", "lists a source twice")
    out = LabelsConfig(
        sources=tuple(sources),
        agreement_checker=s.get("agreement_checker", str, None),
        similarity=s.number("similarity", 0.85, 0.0, 1.0) or 0.0,
        judge_model=s.get("judge_model", str, None),
        judge_template=s.get("judge_template", str, None),
    )
    s.finish()
    return out


def parse_config(
    data: dict[str, Any], source: str = "<config>", base: Path | None = None
) -> Config:
    """Validate an already-parsed TOML document; relative paths are relative to `base`."""
    base = base or Path.cwd()
    for key in data:
        if key not in _SECTIONS:
            raise ConfigError(source, f"[{key}]", f"unknown section; valid: {', '.join(_SECTIONS)}")
    server = _server(_Section(source, "server", data.get("server", {}), base))
    e = _Section(source, "energy", data.get("energy", {}), base)
    backend = e.get("backend", str, "auto")
    if not backend:
        raise e.error("backend", "must not be empty")
    energy = EnergyConfig(backend=backend, options=e.finish(known_only=False))
    router = _router(_Section(source, "router", data.get("router", {}), base))
    models = _models(_Section(source, "models", data.get("models", {}), base))
    labels = _Section(source, "labels", data.get("labels", {}), base)
    checker = labels.get("checker", str, None)
    label_config = _labels(labels)
    env = os.environ.get(ENDPOINT_ENV)
    if env:
        validate_endpoint(env, f"${ENDPOINT_ENV}", "value")
        server = replace(server, endpoint=env)
    return Config(
        source=source, server=server, energy=energy, router=router, models=models,
        checker=checker, labels=label_config,
    )


def load_config(path: Path | None) -> Config:
    """Read and validate `path`; None means defaults (plus `$EDGED_ENDPOINT`)."""
    if path is None:
        return parse_config({}, "<defaults>")
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, "file", f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(source, "file", "is not UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "file", f"is not valid TOML: {exc}") from None
    return parse_config(data, source, Path(path).resolve().parent)

