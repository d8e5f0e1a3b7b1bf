"""GPU telemetry: sources (NVML, simulated, replay), the sampler, the Prometheus collector."""

from meltguard.daemon.telemetry.collector import TelemetryCollector, register_telemetry_metrics
from meltguard.daemon.telemetry.errors import NvmlUnavailable, TelemetryError, TelemetrySpecError
from meltguard.daemon.telemetry.nvml import NvmlSource, open_nvml
from meltguard.daemon.telemetry.replay import ReplayFormatError, ReplaySource
from meltguard.daemon.telemetry.sampler import Sampler, TelemetrySnapshot
from meltguard.daemon.telemetry.samples import ThrottleUnknownSample, throttle_known
from meltguard.daemon.telemetry.select import open_source, requested_label
from meltguard.daemon.telemetry.simulated import (
    SimGpuParams,
    SimulatedGpu,
    steady_state_temperature,
    sustainable_duty_cycle,
)
from meltguard.daemon.telemetry.table import format_table

__all__ = [
    "NvmlSource",
    "NvmlUnavailable",
    "ReplayFormatError",
    "ReplaySource",
    "Sampler",
    "SimGpuParams",
    "SimulatedGpu",
    "TelemetryCollector",
    "TelemetryError",
    "TelemetrySnapshot",
    "TelemetrySpecError",
    "ThrottleUnknownSample",
    "format_table",
    "open_nvml",
    "open_source",
    "register_telemetry_metrics",
    "requested_label",
    "steady_state_temperature",
    "sustainable_duty_cycle",
    "throttle_known",
]
