"""Choose a backend: probe what this machine has, or build the one the config names.

"auto" tries nvml, ina3221, rapl, then the estimate, which always works. jtop is AGPL and reads
the same sensors as ina3221, so it is built only when named. A named backend that cannot run is
an error (`BackendUnavailable`), never a silent fallback to something that measures another
thing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edged.energy.base import BackendUnavailable, EnergyConfigError, EnergyMeter, NullMeter
from edged.energy.estimate import EstimateConfig, EstimateMeter
from edged.energy.ina3221 import Ina3221Config, Ina3221Meter
from edged.energy.jtop import JtopConfig, JtopMeter, jtop_present
from edged.energy.nvml import NvmlConfig, NvmlMeter
from edged.energy.rapl import RaplConfig, RaplMeter

#: name -> (meter class, config class); order is the probe order
BACKENDS: dict[str, tuple[Callable[..., EnergyMeter], type]] = {
    "nvml": (NvmlMeter, NvmlConfig),
    "ina3221": (Ina3221Meter, Ina3221Config),
    "jtop": (JtopMeter, JtopConfig),
    "rapl": (RaplMeter, RaplConfig),
    "estimate": (EstimateMeter, EstimateConfig),
}
AUTO_ORDER = ("nvml", "ina3221", "rapl", "estimate")


@dataclass(frozen=True)
class ProbeResult:
    """Whether one backend can run here, and why (not)."""

    backend: str
    available: bool
    reason: str
    channels: tuple[str, ...] = ()
    scope: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"channels": list(self.channels)}


def _config(backend: str, options: dict[str, Any], *, strict: bool) -> Any:
    config_cls = BACKENDS[backend][1]
    names = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(options) - names)
    if unknown and strict:
        raise EnergyConfigError(
            f"energy backend {backend!r} has no option(s) {unknown}; it knows {sorted(names)}"
        )
    try:
        return config_cls(**{k: v for k, v in options.items() if k in names})
    except TypeError as exc:  # pragma: no cover - names are filtered above
        raise EnergyConfigError(f"energy backend {backend!r}: {exc}") from exc


def _check_names(options: dict[str, Any]) -> None:
    known = {f.name for _, cls in BACKENDS.values() for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise EnergyConfigError(f"unknown energy option(s) {unknown}; known: {sorted(known)}")


def _build(backend: str, config: Any, **kwargs: Any) -> EnergyMeter:
    return BACKENDS[backend][0](config, **kwargs)


def create_meter(backend: str = "auto", **options: Any) -> EnergyMeter:
    """A started meter: `backend` by name, "auto" for the best one here, or "none" (NullMeter).

    Options are the fields of the backend's config dataclass (`period_s`, `gpu_indices`,
    `sysfs_root`, `watts_per_core`...). With "auto", each candidate takes the options it knows.
    """
    if backend == "none":
        if options:
            raise EnergyConfigError(
                f"energy backend 'none' takes no options, got {sorted(options)}"
            )
        return NullMeter()
    if backend == "auto":
        _check_names(options)
        configs = {name: _config(name, options, strict=False) for name in AUTO_ORDER}
        reasons = []
        for name in AUTO_ORDER:
            try:
                return _build(name, configs[name])
            except BackendUnavailable as exc:
                reasons.append(f"{name}: {exc.reason}")
        raise BackendUnavailable("auto", "; ".join(reasons))  # pragma: no cover - estimate works
    if backend not in BACKENDS:
        raise EnergyConfigError(
            f"unknown energy backend {backend!r}; choose one of {['auto', *BACKENDS, 'none']}"
        )
    return _build(backend, _config(backend, options, strict=True))


def probe(**options: Any) -> dict[str, ProbeResult]:
    """Every backend, in probe order: can it run here, and if not, why. Starts no sampler and
    never imports jetson-stats (AGPL); options are as for `create_meter("auto", ...)`."""
    _check_names(options)
    results: dict[str, ProbeResult] = {}
    for name in BACKENDS:
        config = _config(name, options, strict=False)
        if name == "jtop":
            ok, why = jtop_present()
            if ok:
                why += "; not chosen by auto (AGPL, same sensors as ina3221): name it to use it"
            results[name] = ProbeResult(name, ok, why)
            continue
        kwargs = {} if name == "estimate" else {"start": False}
        try:
            meter = _build(name, config, **kwargs)
        except BackendUnavailable as exc:
            results[name] = ProbeResult(name, False, exc.reason)
            continue
        try:
            reason = "available" if name != "estimate" else "available (a model, not a sensor)"
            results[name] = ProbeResult(name, True, reason, meter.channels, meter.scope)
        finally:
            meter.close()
    return results


def auto_choice(results: dict[str, ProbeResult]) -> str:
    """The backend "auto" would pick given probe results."""
    return next(name for name in AUTO_ORDER if results[name].available)
