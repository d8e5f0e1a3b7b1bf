"""One GPU's readings in the units the formats use (MiB, %, W), turned into a GpuSample."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meltguard.daemon.telemetry.samples import ThrottleUnknownSample, decode_throttle
from meltguard.values import GpuSample

MIB = 1024 * 1024

# The fields a reader may fill, in the units of the trace's cells.
FIELDS = (
    "temperature_c",
    "tlimit_c",  # margin to slowdown (nvidia-smi temperature.gpu.tlimit)
    "slowdown_c",
    "shutdown_c",
    "memory_used_mib",
    "memory_free_mib",
    "memory_total_mib",
    "utilization_pct",
    "power_w",
    "power_limit_w",
    "reasons",  # NVML clocks-event bitmask
)


@dataclass(slots=True)
class Readings:
    index: int
    uuid: str = ""
    name: str = ""
    lost: bool = False
    values: dict[str, float] = field(default_factory=dict)

    def sample(self) -> GpuSample:
        if self.lost:
            return GpuSample(index=self.index, uuid=self.uuid, name=self.name, taken_at=0.0,
                             lost=True)
        v = self.values
        temperature = v.get("temperature_c")
        slowdown = v.get("slowdown_c")
        if slowdown is None and temperature is not None and "tlimit_c" in v:
            slowdown = temperature + v["tlimit_c"]
        used, free, total = (v.get(k) for k in ("memory_used_mib", "memory_free_mib",
                                                "memory_total_mib"))
        if total is None and used is not None and free is not None:
            total = used + free
        if used is None and total is not None and free is not None:
            used = total - free
        utilization = v.get("utilization_pct")
        fields: dict[str, Any] = {
            "index": self.index,
            "uuid": self.uuid,
            "name": self.name,
            "taken_at": 0.0,
            "temperature_c": temperature,
            "slowdown_c": slowdown,
            "shutdown_c": v.get("shutdown_c"),
            "memory_used_bytes": None if used is None else int(used * MIB),
            "memory_total_bytes": None if total is None else int(total * MIB),
            "utilization": None if utilization is None else utilization / 100.0,
            "power_w": v.get("power_w"),
            "power_limit_w": v.get("power_limit_w"),
        }
        reasons = v.get("reasons")
        if reasons is None:
            # Without a reasons reading the throttle state is unknown, not "not throttling".
            return ThrottleUnknownSample(**fields)
        return GpuSample(**fields, throttle=decode_throttle(int(reasons)))
