"""NVIDIA GPU energy through NVML (nvidia-ml-py, imported only when this backend is used).

Volta and newer: `nvmlDeviceGetTotalEnergyConsumption` (mJ since driver load) differenced at the
window edges. That counter only moves every ~20-100 ms; the sampler watches it move and keeps
the observed update period. A window shorter than that period is served from the counter's mean
power over the last second (marked approximate); up to a few periods it is still approximate.
`nvmlDeviceGetPowerUsage` would not help there: on Ampere and newer it is itself a 1 s average.
Older GPUs have no counter, so their power readings are sampled and integrated. Jetson's iGPU
answers NOT_SUPPORTED for both, which is reported as unavailable, never as 0 J.
"""

from __future__ import annotations

import contextlib
import re
import statistics
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from edged.energy.base import (
    BackendUnavailable,
    EnergyConfigError,
    EnergyReadError,
    EnergyRecord,
    PermissionDenied,
    check_number,
)
from edged.energy.sampler import Anchor, Clock, SampledMeter, SamplerConfig, Source

BACKEND = "nvml"
#: assumed counter update period until one is observed (the slow end of what GPUs do)
DEFAULT_UPDATE_PERIOD_S = 0.1
#: windows shorter than this many update periods are marked approximate
EXACT_PERIODS = 5


@dataclass(frozen=True)
class NvmlConfig(SamplerConfig):
    """gpu_indices: NVML indices of the GPUs whose energy is summed (all = every GPU)."""

    gpu_indices: tuple[int, ...] | str = (0,)

    def __post_init__(self) -> None:
        super().__post_init__()
        value = self.gpu_indices
        if value == "all":
            return
        if isinstance(value, int) and not isinstance(value, bool):
            value = (value,)
        if not isinstance(value, (list, tuple)) or not value:
            raise EnergyConfigError(
                f'energy option gpu_indices must be "all" or a list of GPU indices, got {value!r}'
            )
        for index in value:
            check_number("gpu_indices[]", index, low=0, high=1023, integer=True)
        object.__setattr__(self, "gpu_indices", tuple(value))


def import_pynvml() -> ModuleType:
    """The pynvml module, or `BackendUnavailable` saying how to get it."""
    try:
        import pynvml
    except ImportError as exc:
        raise BackendUnavailable(
            BACKEND, "pynvml is not installed (pip install 'edged[nvml]', package nvidia-ml-py)"
        ) from exc
    return pynvml


def _code(pynvml: ModuleType, exc: BaseException) -> int | None:
    return getattr(exc, "value", None) if isinstance(exc, pynvml.NVMLError) else None


def _not_supported(pynvml: ModuleType, exc: BaseException) -> bool:
    return _code(pynvml, exc) == pynvml.NVML_ERROR_NOT_SUPPORTED


def _init_error(pynvml: ModuleType, exc: BaseException) -> BackendUnavailable:
    code = _code(pynvml, exc)
    if code == pynvml.NVML_ERROR_LIBRARY_NOT_FOUND:
        return BackendUnavailable(BACKEND, "no NVIDIA driver (libnvidia-ml.so.1 not found)")
    if code == pynvml.NVML_ERROR_DRIVER_NOT_LOADED:
        return BackendUnavailable(BACKEND, "the NVIDIA kernel driver is not loaded")
    if code == pynvml.NVML_ERROR_NO_PERMISSION:
        return PermissionDenied(BACKEND, "/dev/nvidia*", "add edged's user to the video group")
    return BackendUnavailable(BACKEND, f"nvmlInit failed: {exc}")


class _NvmlSource(Source):
    def __init__(
        self, pynvml: ModuleType, handles: Sequence[Any], names: Sequence[str], clock: Clock
    ) -> None:
        super().__init__(names, None)
        self._nvml = pynvml
        self._handles = list(handles)
        self._clock = clock

    def _call(self, fn_name: str, i: int) -> float:
        try:
            return float(getattr(self._nvml, fn_name)(self._handles[i]))
        except self._nvml.NVMLError as exc:
            what = "NOT_SUPPORTED" if _not_supported(self._nvml, exc) else str(exc)
            raise EnergyReadError(f"NVML {fn_name} on {self.channels[i]}: {what}") from exc


class NvmlCounterSource(_NvmlSource):
    """Total energy counters (mJ); also learns how often they update."""

    kind = "energy"

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._last: list[float | None] = [None] * len(self._handles)
        self._changed_at: list[float | None] = [None] * len(self._handles)
        self._intervals: deque[float] = deque(maxlen=64)

    def read(self) -> tuple[float, ...]:
        fn = "nvmlDeviceGetTotalEnergyConsumption"
        values = tuple(self._call(fn, i) for i in range(len(self._handles)))
        now = self._clock()
        for i, value in enumerate(values):
            if self._last[i] is not None and value != self._last[i]:
                changed = self._changed_at[i]
                if changed is not None:
                    self._intervals.append(now - changed)
                self._changed_at[i] = now
            elif self._last[i] is None:
                self._changed_at[i] = None
            self._last[i] = value
        return values

    @property
    def update_period_s(self) -> float | None:
        """Median observed time between counter updates (an upper bound at coarse polling)."""
        intervals = list(self._intervals)
        return statistics.median(intervals) if len(intervals) >= 3 else None


class NvmlPowerSource(_NvmlSource):
    """Power readings (mW) for GPUs without an energy counter (pre-Volta)."""

    def read(self) -> tuple[float, ...]:
        fn = "nvmlDeviceGetPowerUsage"
        return tuple(self._call(fn, i) for i in range(len(self._handles)))


class NvmlMeter(SampledMeter):
    """GPU board energy (GPU only: not the CPU, not the host) for the configured GPUs."""

    backend = BACKEND
    scope = "GPU board(s) only"

    def __init__(
        self, config: NvmlConfig | None = None, *, clock: Clock = time.monotonic, start: bool = True
    ) -> None:
        config = config or NvmlConfig()
        nvml = import_pynvml()
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            raise _init_error(nvml, exc) from exc
        self._nvml = nvml
        try:
            source = self._open(nvml, config, clock)
        except BaseException:
            nvml.nvmlShutdown()
            raise
        self.method = "nvml" if isinstance(source, NvmlCounterSource) else "nvml-power"
        super().__init__(source, config, clock=clock, start=start)

    @staticmethod
    def _open(nvml: ModuleType, config: NvmlConfig, clock: Clock) -> _NvmlSource:
        count = int(nvml.nvmlDeviceGetCount())
        if count == 0:
            raise BackendUnavailable(BACKEND, "NVML sees no GPU")
        indices = range(count) if config.gpu_indices == "all" else config.gpu_indices
        handles, names = [], []
        for index in indices:
            if index >= count:
                raise EnergyConfigError(
                    f"energy option gpu_indices names GPU {index}, but NVML sees {count} GPU(s)"
                )
            handles.append(nvml.nvmlDeviceGetHandleByIndex(index))
            names.append(f"gpu{index}")
        counter = power = True
        for handle, name in zip(handles, names, strict=True):
            works = {}
            for fn_name in ("nvmlDeviceGetTotalEnergyConsumption", "nvmlDeviceGetPowerUsage"):
                try:
                    getattr(nvml, fn_name)(handle)
                    works[fn_name] = True
                except nvml.NVMLError as exc:
                    if not _not_supported(nvml, exc):
                        raise BackendUnavailable(BACKEND, f"{name}: {fn_name}: {exc}") from exc
                    works[fn_name] = False
            if not any(works.values()):
                raise BackendUnavailable(
                    BACKEND,
                    f"{name} answers NOT_SUPPORTED for both its energy counter and its power "
                    "reading (a Jetson iGPU? use the ina3221 backend)",
                )
            counter = counter and works["nvmlDeviceGetTotalEnergyConsumption"]
            power = power and works["nvmlDeviceGetPowerUsage"]
        if not counter and not power:
            raise BackendUnavailable(
                BACKEND, f"GPUs {names} share neither an energy counter nor power readings"
            )
        source_cls = NvmlCounterSource if counter else NvmlPowerSource
        return source_cls(nvml, handles, names, clock)

    def device_channels(self, device: str) -> tuple[str, ...]:
        """"cuda" is GPU 0, "cuda:N" (or "gpuN") GPU N; a GPU not configured, or any other
        device (the CPU), is not seen by this meter: ()."""
        match = re.fullmatch(r"(?:cuda|gpu)(?::?(\d+))?", device)
        if match is None:
            return ()
        name = f"gpu{match.group(1) or 0}"
        return (name,) if name in self.channels else ()

    @property
    def update_period_s(self) -> float | None:
        """Observed counter update period, None until seen (or in power-sampling mode)."""
        source = self._source
        return source.update_period_s if isinstance(source, NvmlCounterSource) else None

    def _measure(self, start: Anchor, end: Anchor) -> EnergyRecord:
        record = super()._measure(start, end)
        if not isinstance(self._source, NvmlCounterSource):
            return record
        period = self.update_period_s or DEFAULT_UPDATE_PERIOD_S
        if record.window_s >= EXACT_PERIODS * period:
            return record
        if record.window_s < period:
            recent = self.sampler.recent_power_mw(max(1.0, 2 * period))
            if recent is not None:
                per_rail_j = {
                    ch: mw * record.window_s / 1000.0
                    for ch, mw in zip(self.channels, recent, strict=True)
                }
                return self._record(
                    per_rail_j,
                    record.window_s,
                    samples=record.samples,
                    approximate=True,
                    method="nvml-recent-power",
                )
        return self._record(
            record.per_rail_j, record.window_s, samples=record.samples, approximate=True
        )

    def _release(self) -> None:
        super()._release()
        with contextlib.suppress(self._nvml.NVMLError):  # nothing left to free
            self._nvml.nvmlShutdown()
