"""Jetson power rails from the INA3221 (and INA238) monitors, read straight from sysfs.

JetPack 5+ (upstream hwmon driver): `/sys/bus/i2c/drivers/ina3221/<dev>/hwmon/hwmonN/` with
`inN_label`, `inN_input` (bus mV), `currN_input` (mA), or `powerN_input` (uW). JetPack 4
(downstream IIO driver): `/sys/bus/i2c/drivers/ina3221x/<dev>/iio:deviceN/` with `rail_name_N`,
`in_power*_input` (mW). `VDD_IN` / `POM_5V_IN` / `VIN` is the module input (the total); boards
without one (AGX Orin) total the sum of their rails. "NC" channels and the chip's
sum-of-shunt channel are skipped.
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

BACKEND = "ina3221"
TOTAL_RAILS = ("VDD_IN", "POM_5V_IN", "VIN")
#: rail-name keyword of each device family; rails naming neither (SOC, CV, DDR) feed both
DEVICE_KEYWORDS = {"cpu": "CPU", "cuda": "GPU", "tensorrt": "GPU", "gpu": "GPU"}
_HWMON_GLOBS = ("bus/i2c/drivers/ina3221*/*/hwmon/hwmon*", "bus/i2c/drivers/ina238*/*/hwmon/hwmon*")
_IIO_GLOB = "bus/i2c/drivers/ina3221*/*/iio:device*"


class Ina3221Config(SysfsConfig):
    """The sampler options and `sysfs_root`."""


@dataclass(frozen=True)
class Rail:
    """One channel: power = files[0] * scale, or files[0] * files[1] * scale, in mW."""

    name: str
    files: tuple[Path, ...]
    scale: float


def _text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except PermissionError as exc:
        raise PermissionDenied(BACKEND, str(path)) from exc
    except OSError as exc:
        raise BackendUnavailable(BACKEND, f"cannot read {path}: {exc.strerror or exc}") from exc


def _skipped(label: str) -> bool:
    low = label.strip().lower()
    return low in ("nc", "") or "sum of" in low


def _hwmon_rails(hwmon: Path) -> list[Rail]:
    rails: list[Rail] = []
    labelled: set[int] = set()
    for label_file in sorted(hwmon.glob("in*_label")):
        match = re.fullmatch(r"in(\d+)_label", label_file.name)
        if not match:
            continue
        n = int(match.group(1))
        labelled.add(n)
        label = _text(label_file)
        if _skipped(label):
            continue
        enable = hwmon / f"in{n}_enable"
        if enable.exists() and _text(enable) == "0":
            continue
        power, volt, curr = (
            hwmon / f"power{n}_input",
            hwmon / f"in{n}_input",
            hwmon / f"curr{n}_input",
        )
        if power.exists():
            rails.append(Rail(label, (power,), 1e-3))  # uW -> mW
        elif volt.exists() and curr.exists():
            rails.append(Rail(label, (volt, curr), 1e-3))  # mV * mA = uW -> mW
    # INA238 and friends: power channels without labels, named after the device
    for power in sorted(hwmon.glob("power*_input")):
        match = re.fullmatch(r"power(\d+)_input", power.name)
        if not match or int(match.group(1)) in labelled:
            continue
        device_label = hwmon / "label"
        base = _text(device_label) if device_label.exists() else hwmon.parent.parent.name
        rails.append(Rail(f"{base}:{match.group(1)}", (power,), 1e-3))
    return rails


def _iio_rails(iio: Path) -> list[Rail]:
    rails: list[Rail] = []
    for name_file in sorted(iio.glob("rail_name_*")):
        match = re.fullmatch(r"rail_name_(\d+)", name_file.name)
        if not match:
            continue
        n = match.group(1)
        label = _text(name_file)
        if _skipped(label):
            continue
        power = iio / f"in_power{n}_input"
        volt, curr = iio / f"in_voltage{n}_input", iio / f"in_current{n}_input"
        if power.exists():
            rails.append(Rail(label, (power,), 1.0))  # mW
        elif volt.exists() and curr.exists():
            rails.append(Rail(label, (volt, curr), 1e-3))
    return rails


def discover_rails(sysfs_root: str | os.PathLike[str] = "/sys") -> list[Rail]:
    """Every usable rail under `sysfs_root`, JetPack 5+ hwmon first, then JetPack 4 IIO."""
    root = Path(sysfs_root)
    drivers = root / "bus/i2c/drivers"
    if not drivers.is_dir():
        raise BackendUnavailable(BACKEND, f"no {drivers}: no I2C power monitors (not a Jetson)")
    rails: list[Rail] = []
    for pattern in _HWMON_GLOBS:
        for hwmon in sorted(root.glob(pattern)):
            rails.extend(_hwmon_rails(hwmon))
    for iio in sorted(root.glob(_IIO_GLOB)):
        rails.extend(_iio_rails(iio))
    if not rails:
        raise BackendUnavailable(
            BACKEND, f"no INA3221/INA238 rails under {drivers}/ina3221*/*/(hwmon|iio:device)*"
        )
    seen: dict[str, int] = {}
    unique: list[Rail] = []
    for rail in rails:  # two chips may name a rail alike: keep both, apart
        count = seen.get(rail.name, 0)
        seen[rail.name] = count + 1
        unique.append(
            rail if count == 0 else Rail(f"{rail.name}#{count + 1}", rail.files, rail.scale)
        )
    return unique


class Ina3221Source(Source):
    """Reads each rail's files through descriptors kept open (pread at 0 re-reads sysfs)."""

    def __init__(self, rails: list[Rail]) -> None:
        names = [r.name for r in rails]
        total = next((t for t in TOTAL_RAILS if t in names), None)
        super().__init__(names, total)
        self._rails = rails
        self._fds: list[tuple[int, ...]] = []
        try:
            for rail in rails:
                self._fds.append(tuple(self._open(path) for path in rail.files))
            try:
                self.read()
            except EnergyReadError as exc:
                raise BackendUnavailable(BACKEND, f"first reading failed: {exc}") from exc
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _open(path: Path) -> int:
        try:
            return os.open(path, os.O_RDONLY)
        except PermissionError as exc:
            raise PermissionDenied(BACKEND, str(path)) from exc
        except OSError as exc:
            raise BackendUnavailable(BACKEND, f"cannot open {path}: {exc.strerror}") from exc

    def _value(self, fd: int, path: Path) -> float:
        try:
            raw = os.pread(fd, 64, 0)
        except OSError as exc:
            raise EnergyReadError(f"reading {path}: {exc.strerror or exc}") from exc
        try:
            return float(int(raw.split()[0]))
        except (ValueError, IndexError) as exc:
            raise EnergyReadError(f"{path} holds {raw!r}, not an integer") from exc

    def read(self) -> tuple[float, ...]:
        out = []
        for rail, fds in zip(self._rails, self._fds, strict=True):
            value = rail.scale
            for fd, path in zip(fds, rail.files, strict=True):
                value *= self._value(fd, path)
            out.append(value)
        return tuple(out)

    def close(self) -> None:
        for fds in self._fds:
            for fd in fds:
                os.close(fd)
        self._fds = []


class Ina3221Meter(SampledMeter):
    """Module or per-rail power on Jetson boards, sampled and integrated by trapezoids."""

    backend = BACKEND
    method = BACKEND

    def __init__(
        self,
        config: Ina3221Config | None = None,
        *,
        clock: Clock = time.monotonic,
        start: bool = True,
    ) -> None:
        config = config or Ina3221Config()
        source = Ina3221Source(discover_rails(config.sysfs_root))
        self.scope = (
            f"whole module ({source.total} input rail)"
            if source.total
            else "sum of the monitored rails (no module-input rail on this board)"
        )
        super().__init__(source, config, clock=clock, start=start)

    def device_channels(self, device: str) -> tuple[str, ...]:
        """The rails that feed `device`: those naming it (CPU, GPU) plus those naming neither
        (SOC, CV, memory), which every device shares; never the module-input rail. A rail
        naming both (Orin Nano's VDD_CPU_GPU_CV) is shared by CPU and GPU windows."""
        keyword = DEVICE_KEYWORDS.get(device.split(":")[0].lower())
        if keyword is None:
            return ()
        kinds = set(DEVICE_KEYWORDS.values())
        return tuple(
            rail for rail in self.channels
            if rail != self._source.total
            and (keyword in rail.upper() or not any(k in rail.upper() for k in kinds))
        )
