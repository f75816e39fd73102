"""Per-request joules: NVML, Jetson INA3221 rails, RAPL, jtop, or an honest estimate.

meter = create_meter("auto")          # or a backend name, with its options
with meter.window() as window:        # windows nest and overlap, from any thread
    ...
window.record.to_dict()               # joules, dynamic_joules, per_rail_j, method, ...
meter.close()
"""

from edged.energy.base import (
    BackendUnavailable,
    EnergyConfigError,
    EnergyError,
    EnergyMeter,
    EnergyReadError,
    EnergyRecord,
    EnergyWindow,
    MeterClosedError,
    NullMeter,
    PermissionDenied,
    WindowError,
)
from edged.energy.estimate import EstimateConfig, EstimateMeter
from edged.energy.factory import BACKENDS, ProbeResult, auto_choice, create_meter, probe
from edged.energy.ina3221 import Ina3221Config, Ina3221Meter
from edged.energy.jtop import JtopConfig, JtopMeter
from edged.energy.nvml import NvmlConfig, NvmlMeter
from edged.energy.rapl import RaplConfig, RaplMeter
from edged.energy.sampler import SampledMeter, Sampler, SamplerConfig

__all__ = [
    "BACKENDS",
    "BackendUnavailable",
    "EnergyConfigError",
    "EnergyError",
    "EnergyMeter",
    "EnergyReadError",
    "EnergyRecord",
    "EnergyWindow",
    "EstimateConfig",
    "EstimateMeter",
    "Ina3221Config",
    "Ina3221Meter",
    "JtopConfig",
    "JtopMeter",
    "MeterClosedError",
    "NullMeter",
    "NvmlConfig",
    "NvmlMeter",
    "PermissionDenied",
    "ProbeResult",
    "RaplConfig",
    "RaplMeter",
    "SampledMeter",
    "Sampler",
    "SamplerConfig",
    "WindowError",
    "auto_choice",
    "create_meter",
    "probe",
]
