"""`zoo.toml` (a cost-ordered list of model directories) and the `Zoo` that serves it.

The zoo loads models eagerly or on first use, unloads them on request and, under a memory cap,
evicts the least recently used. A model that fails to load is recorded, reported by `status()`
and raised again by `get()`; it never takes the other models down.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edged.zoo.errors import InvalidRequestError, ManifestError, ModelLoadError, UnknownModelError
from edged.zoo.model import LoadedModel, SessionConfig, find_model_file, model_size_bytes
from edged.zoo.params import GenerationParams
from edged.zoo.remote import RemoteModel, RemoteSpec, parse_remote

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_GEN_FIELDS = {f.name for f in dataclasses.fields(GenerationParams)}


@dataclass(frozen=True)
class ZooSettings:
    """The `[zoo]` table: defaults for every model plus how the zoo loads them."""

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    allow_fallback: bool = True
    load: str = "eager"  # or "lazy"
    memory_cap_mb: float = 0  # 0 = no cap
    intra_op_threads: int = 0
    inter_op_threads: int = 0


@dataclass(frozen=True)
class ModelEntry:
    """One `[[models]]` entry, its path already resolved against the manifest's folder."""

    name: str
    path: Path
    session: SessionConfig
    generation: GenerationParams = field(default_factory=GenerationParams)
    context: int | None = None
    #: a remote model (`kind = "edged"` / `"openai"`): no path, no session (edged.zoo.remote)
    remote: RemoteSpec | None = None


@dataclass(frozen=True)
class ZooManifest:
    """A validated manifest: models in cost order, cheapest first."""

    path: Path
    settings: ZooSettings
    models: tuple[ModelEntry, ...]
    checker: str = "exact"

    @classmethod
    def load(cls, path: Path | str) -> ZooManifest:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ManifestError(path, "file does not exist") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ManifestError(path, f"cannot read: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ManifestError(path, f"not valid TOML: {exc}") from exc
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], path: Path) -> ZooManifest:
        _only(data, {"checker", "zoo", "models"}, path, None, "")
        checker = data.get("checker", "exact")
        if not isinstance(checker, str) or not checker:
            raise ManifestError(path, "must be a non-empty string", field="checker")
        settings = _settings(data.get("zoo", {}), path)
        raw = data.get("models")
        if not isinstance(raw, list) or not raw:
            raise ManifestError(path, "needs at least one [[models]] entry", field="models")
        models, seen = [], set()
        for i, entry in enumerate(raw):
            model = _entry(entry, i, settings, path)
            if model.name in seen:
                raise ManifestError(path, "duplicate model name", model=model.name, field="name")
            seen.add(model.name)
            models.append(model)
        return cls(path=path, settings=settings, models=tuple(models), checker=checker)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]


def _only(table: Mapping[str, Any], allowed: set[str], path: Path, model: str | None,
          prefix: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ManifestError(path, f"unknown field (allowed: {sorted(allowed)})", model=model,
                            field=prefix + unknown[0])


def _check(value: Any, ok: bool, path: Path, model: str | None, name: str, want: str) -> Any:
    if not ok:
        raise ManifestError(path, f"{value!r} is not {want}", model=model, field=name)
    return value


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _providers(value: Any, path: Path, model: str | None, name: str) -> tuple[str, ...]:
    ok = isinstance(value, list) and bool(value) and all(isinstance(p, str) and p for p in value)
    return tuple(_check(value, ok, path, model, name, "a non-empty list of provider names"))


def _settings(table: Any, path: Path) -> ZooSettings:
    if not isinstance(table, dict):
        raise ManifestError(path, "must be a table", field="zoo")
    _only(table, {f.name for f in dataclasses.fields(ZooSettings)}, path, None, "zoo.")
    d = ZooSettings()

    def get(key: str, ok: Any, want: str) -> Any:
        value = table.get(key, getattr(d, key))
        return _check(value, ok(value), path, None, f"zoo.{key}", want)

    providers = d.providers
    if "providers" in table:
        providers = _providers(table["providers"], path, None, "zoo.providers")
    return ZooSettings(
        providers=providers,
        allow_fallback=get("allow_fallback", lambda v: isinstance(v, bool), "true or false"),
        load=get("load", lambda v: v in ("eager", "lazy"), '"eager" or "lazy"'),
        memory_cap_mb=get("memory_cap_mb", lambda v: isinstance(v, (int, float))
                          and not isinstance(v, bool) and v >= 0, "a number >= 0"),
        intra_op_threads=get("intra_op_threads", _int, "an integer >= 0"),
        inter_op_threads=get("inter_op_threads", _int, "an integer >= 0"),
    )


def _entry(entry: Any, index: int, zoo: ZooSettings, path: Path) -> ModelEntry:
    if not isinstance(entry, dict):
        raise ManifestError(path, "must be a table", field=f"models[{index}]")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ManifestError(path, f"{name!r} is not a name (letters, digits, . _ -)",
                            model=f"models[{index}]", field="name")
    remote = parse_remote(entry, name, path) if "kind" in entry else None
    if remote is not None:
        return _remote_entry(entry, name, remote, zoo, path)
    _only(entry, {"name", "path", "providers", "allow_fallback", "intra_op_threads",
                  "inter_op_threads", "context", "generation"}, path, name, "")
    raw_path = entry.get("path")
    _check(raw_path, isinstance(raw_path, str) and bool(raw_path), path, name, "path",
           "a non-empty string")
    providers = _providers(entry["providers"], path, name, "providers") \
        if "providers" in entry else zoo.providers
    fallback = entry.get("allow_fallback", zoo.allow_fallback)
    _check(fallback, isinstance(fallback, bool), path, name, "allow_fallback", "true or false")
    threads = {}
    for key in ("intra_op_threads", "inter_op_threads"):
        threads[key] = _check(entry.get(key, getattr(zoo, key)), _int(entry.get(key, 0)), path,
                              name, key, "an integer >= 0")
    context, params = _context_and_generation(entry, name, path)
    session = SessionConfig(providers=providers, allow_fallback=fallback, **threads)
    model_path = Path(raw_path)
    if not model_path.is_absolute():
        model_path = path.parent / model_path
    return ModelEntry(name=name, path=model_path, session=session, generation=params,
                      context=context)


def _context_and_generation(entry: Mapping[str, Any], name: str,
                            path: Path) -> tuple[int | None, GenerationParams]:
    context = entry.get("context")
    if context is not None:
        _check(context, _int(context) and context > 0, path, name, "context",
               "an integer > 0")
    gen = entry.get("generation", {})
    if not isinstance(gen, dict):
        raise ManifestError(path, "must be a table", model=name, field="generation")
    _only(gen, _GEN_FIELDS, path, name, "generation.")
    if isinstance(gen.get("stop"), list):
        gen = {**gen, "stop": tuple(gen["stop"])}
    try:
        params = GenerationParams(**gen)
    except InvalidRequestError as exc:
        bad = str(exc).split("=", 1)[0]
        raise ManifestError(path, str(exc), model=name, field=f"generation.{bad}") from exc
    return context, params


def _remote_entry(entry: Mapping[str, Any], name: str, remote: RemoteSpec, zoo: ZooSettings,
                  path: Path) -> ModelEntry:
    """A remote model: no directory and no session; `path` only names where it is."""
    context, params = _context_and_generation(entry, name, path)
    session = SessionConfig(providers=zoo.providers, allow_fallback=zoo.allow_fallback)
    return ModelEntry(name=name, path=Path(f"remote:{name}"), session=session,
                      generation=params, context=context, remote=remote)


class Zoo:
    """Named models in cost order, loaded on demand, LRU-evicted under a memory cap.

    Thread-safe: `get` may be called from several worker threads. A model evicted while a
    generation runs on it stays alive until that generation ends (the cap is then exceeded
    for that long).
    """

    def __init__(self, manifest: ZooManifest) -> None:
        self.manifest = manifest
        self._entries = {m.name: m for m in manifest.models}
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()  # least recent first
        self._failures: dict[str, ModelLoadError] = {}
        self._reserved: dict[str, int] = {}  # bytes of models being loaded right now
        self._gates: dict[str, threading.Lock] = {name: threading.Lock() for name in self.names}
        self._lock = threading.Lock()  # guards the dicts; never held while a model loads
        if manifest.settings.load == "eager":
            self._load_eagerly()

    @classmethod
    def from_manifest(cls, path: Path | str) -> Zoo:
        return cls(ZooManifest.load(path))

    @classmethod
    def from_dirs(cls, dirs: Iterable[Path | str], *, settings: ZooSettings | None = None,
                  checker: str = "exact") -> Zoo:
        """A zoo of model directories in the given (cost) order, named after the folders."""
        settings = settings or ZooSettings()
        session = SessionConfig(providers=settings.providers,
                                allow_fallback=settings.allow_fallback,
                                intra_op_threads=settings.intra_op_threads,
                                inter_op_threads=settings.inter_op_threads)
        entries = []
        for d in map(Path, dirs):
            name = d.resolve().parent.name if d.name == "onnx" else d.name
            entries.append(ModelEntry(name=name, path=d, session=session))
        if len({e.name for e in entries}) != len(entries) or not entries:
            raise ManifestError("<dirs>", f"need distinct model folder names, got "
                                          f"{[e.name for e in entries]}")
        return cls(ZooManifest(path=Path("<dirs>"), settings=settings, models=tuple(entries),
                               checker=checker))

    # -- queries ---------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Model names in cost order, cheapest first."""
        return self.manifest.names

    @property
    def loaded(self) -> list[str]:
        """Loaded models, least recently used first."""
        with self._lock:
            return list(self._loaded)

    @property
    def failures(self) -> dict[str, ModelLoadError]:
        with self._lock:
            return dict(self._failures)

    def memory_mb(self) -> float:
        """Weights of the loaded models (their on-disk size) in MiB."""
        with self._lock:
            return sum(m.size_bytes for m in self._loaded.values()) / 2**20

    def unavailable(self) -> set[str]:
        """Remote models whose circuit is open now: the router routes around them."""
        with self._lock:
            loaded = list(self._loaded.values())
        return {m.name for m in loaded if isinstance(m, RemoteModel) and not m.available()}

    def remotes(self) -> dict[str, dict[str, Any]]:
        """name -> state of each remote model (kind, where, circuit) for `health`/`models`."""
        with self._lock:
            loaded = dict(self._loaded)
        return {n: loaded[n].status() for n in self.names
                if isinstance(loaded.get(n), RemoteModel)}

    def status(self) -> dict[str, str]:
        """name -> "loaded" | "unloaded" | "failed: <why>" (for `edged stats`)."""
        with self._lock:
            return {n: "loaded" if n in self._loaded else
                    f"failed: {self._failures[n]}" if n in self._failures else "unloaded"
                    for n in self.names}

    # -- loading ---------------------------------------------------------------------------
    def get(self, name: str) -> LoadedModel:
        """The model, loading it if needed; raises its recorded ModelLoadError if it failed.

        A load holds only that model's gate, so requests for models already loaded go on.
        """
        self._entry(name)
        with self._lock:
            ready = self._ready(name)
        if ready is not None:
            return ready
        with self._gates[name]:  # one loader per model; the others wait for its outcome
            return self._load(name, evict=True)

    def load(self, name: str) -> LoadedModel:
        """(Re)load a model now, forgetting an earlier failure (e.g. after fixing its files)."""
        self._entry(name)
        with self._gates[name], self._lock:
            self._failures.pop(name, None)
        return self.get(name)

    def unload(self, name: str) -> bool:
        """Drop a loaded model; True if it was loaded."""
        with self._lock:
            self._entry(name)
            model = self._loaded.pop(name, None)
        if model is not None:
            model.close()
        return model is not None

    def close(self) -> None:
        for name in self.loaded:
            self.unload(name)

    def _entry(self, name: str) -> ModelEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownModelError(f"no model {name!r} in the zoo (have {self.names})") from None

    def _ready(self, name: str) -> LoadedModel | None:
        """Under the lock: the loaded model (now most recent), its recorded failure, or None."""
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return self._loaded[name]
        if name in self._failures:
            raise self._failures[name]
        return None

    def _load(self, name: str, *, evict: bool) -> LoadedModel:
        """Under the model's gate: make room, load outside the lock, record the outcome."""
        entry = self._entries[name]
        with self._lock:
            ready = self._ready(name)
            if ready is not None:
                return ready
            try:
                self._reserved[name] = self._make_room(entry, evict=evict)
            except ModelLoadError as exc:
                self._failures[name] = exc
                raise
        try:
            model: LoadedModel | RemoteModel
            if entry.remote is not None:  # never contacts the remote: an outage is no load error
                model = RemoteModel(name, entry.remote, defaults=entry.generation,
                                    context=entry.context)
            else:
                model = LoadedModel(entry.path, name=name, session_config=entry.session,
                                    defaults=entry.generation, context=entry.context)
        except ModelLoadError as exc:
            with self._lock:
                self._reserved.pop(name, None)
                self._failures[name] = exc
            raise
        with self._lock:
            self._reserved.pop(name, None)
            self._loaded[name] = model
        return model

    def _make_room(self, entry: ModelEntry, *, evict: bool) -> int:
        """Under the lock: evict least recently used models until `entry` fits; its bytes."""
        cap = self.manifest.settings.memory_cap_mb * 2**20
        if not cap or entry.remote is not None or not entry.path.is_dir():
            return 0  # no cap, or LoadedModel will report the missing directory
        need = model_size_bytes(find_model_file(entry.path, entry.name))
        if need > cap:
            raise ModelLoadError(entry.name, f"needs {need / 2**20:.1f} MiB, more than the zoo's "
                                             f"memory_cap_mb {cap / 2**20:g}")
        used = sum(m.size_bytes for m in self._loaded.values()) + sum(self._reserved.values())
        while self._loaded and used + need > cap:
            if not evict:
                raise _NoRoom
            _, model = self._loaded.popitem(last=False)
            used -= model.size_bytes
            model.close()
        return need  # over the cap only while other loads are in flight: they finish first

    def _load_eagerly(self) -> None:
        for name in self.names:
            try:
                self._load(name, evict=False)
            except _NoRoom:
                continue  # stays unloaded; loaded on first use
            except ModelLoadError as exc:
                warnings.warn(str(exc), RuntimeWarning, stacklevel=3)


class _NoRoom(Exception):
    """Eager loading stops filling the cap rather than evicting what it just loaded."""
