"""CPU package and DRAM energy from RAPL counters in powercap sysfs (Intel, and AMD Zen).

Each zone's `energy_uj` counts up and wraps to 0 past `max_energy_range_uj`; the sampler reads
it every period, far more often than the fastest wrap (minutes at full load), so every wrap is
seen and unfolded into a monotonic counter. Since Linux 5.10 `energy_uj` is readable by root
only (CVE-2020-8694), hence the permission hint.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from edged.energy.base import (
    BackendUnavailable,
    EnergyReadError,
    PermissionDenied,
)
from edged.energy.sampler import Clock, SampledMeter, Source, SysfsConfig

BACKEND = "rapl"
_ZONE = re.compile(r"(intel|amd)-rapl:(\d+)(?::(\d+))?")


class RaplConfig(SysfsConfig):
    """The sampler options and `sysfs_root`."""


@dataclass(frozen=True)
class Zone:
    name: str
    energy_file: Path
    max_range_uj: int


def _read_int(path: Path) -> int:
    try:
        text = path.read_text().strip()
    except PermissionError as exc:
        raise PermissionDenied(BACKEND, str(path)) from exc
    except OSError as exc:
        raise BackendUnavailable(BACKEND, f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        return int(text)
    except ValueError as exc:
        raise BackendUnavailable(BACKEND, f"{path} holds {text!r}, not an integer") from exc


def discover_zones(sysfs_root: str | os.PathLike[str] = "/sys") -> list[Zone]:
    """Package zones and their DRAM subzones (core/uncore lie inside package; psys is skipped)."""
    powercap = Path(sysfs_root) / "class/powercap"
    if not powercap.is_dir():
        raise BackendUnavailable(
            BACKEND, f"no {powercap}: RAPL is not exposed (VM, container, no intel_rapl driver)"
        )
    zones: list[Zone] = []
    for path in sorted(powercap.iterdir()):
        match = _ZONE.fullmatch(path.name)  # skips intel-rapl-mmio duplicates of package zones
        if not match or not (path / "energy_uj").exists():
            continue
        name = (path / "name").read_text().strip() if (path / "name").exists() else path.name
        package = match.group(2)
        if name.startswith("package"):
            key = name
        elif name == "dram":
            key = f"dram-{package}"
        else:
            continue
        zones.append(Zone(key, path / "energy_uj", _read_int(path / "max_energy_range_uj")))
    if not zones:
        raise BackendUnavailable(BACKEND, f"no RAPL package or dram zone under {powercap}")
    for zone in zones:
        _read_int(zone.energy_file)  # fail now, with the permission hint, not in the sampler
    return zones


class RaplSource(Source):
    """Cumulative mJ per zone, wraparound unfolded (reads are serialized by the sampler)."""

    kind = "energy"

    def __init__(self, zones: list[Zone]) -> None:
        super().__init__([z.name for z in zones], None)
        self._zones = zones
        self._last_uj: list[int | None] = [None] * len(zones)
        self._offset_uj = [0] * len(zones)

    def read(self) -> tuple[float, ...]:
        out = []
        for i, zone in enumerate(self._zones):
            try:
                raw = int(zone.energy_file.read_text().strip())
            except PermissionError as exc:
                raise EnergyReadError(f"permission denied reading {zone.energy_file}") from exc
            except (OSError, ValueError) as exc:
                raise EnergyReadError(f"reading {zone.energy_file}: {exc}") from exc
            last = self._last_uj[i]
            if last is not None and raw < last:
                self._offset_uj[i] += zone.max_range_uj + 1  # counts 0..max_range
            self._last_uj[i] = raw
            out.append((raw + self._offset_uj[i]) / 1000.0)
        return tuple(out)


class RaplMeter(SampledMeter):
    """CPU package (+ DRAM) energy by counter differences at the window edges."""

    backend = BACKEND
    method = BACKEND
    scope = "CPU package(s) + DRAM (whole socket, every process on it)"

    def __init__(
        self, config: RaplConfig | None = None, *, clock: Clock = time.monotonic, start: bool = True
    ) -> None:
        config = config or RaplConfig()
        super().__init__(
            RaplSource(discover_zones(config.sysfs_root)), config, clock=clock, start=start
        )
