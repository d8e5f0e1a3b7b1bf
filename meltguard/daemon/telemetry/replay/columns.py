"""Column names of CSV traces: nvidia-smi --query-gpu properties and the synonyms loggers use
(`temp_c`, `temperature_C`, `gpu_index`, `power_draw_W`, `mem_used_mib`, ...), each mapped to a
reading and the factor that brings its unit to the reading's (MiB, %, W, °C)."""

from __future__ import annotations

import re
from dataclasses import dataclass

TIME, GPU, UUID, NAME = "time", "gpu", "uuid", "name"
TEXT_ROLES = frozenset({UUID, NAME})

# nvidia-smi --query-gpu properties this reader uses; their presence labels a file nvidia-smi's.
SMI_PROPERTIES = frozenset({
    "temperature.gpu", "temperature.gpu.tlimit", "utilization.gpu", "memory.used", "memory.free",
    "memory.total", "power.draw", "power.draw.instant", "power.draw.average", "power.limit",
    "enforced.power.limit", "clocks_event_reasons.active", "clocks_throttle_reasons.active",
    "pci.bus_id", "utilization.memory",
})


@dataclass(frozen=True, slots=True)
class Column:
    role: str  # TIME, GPU, UUID, NAME or a readings field
    scale: float = 1.0


def normalize(header: str) -> str:
    """"memory.used [MiB]" -> "memory_used"; "power_draw_W" -> "power_draw_w"."""
    bare = header.split("[", 1)[0].strip().lower()
    return re.sub(r"[^a-z0-9]+", "_", bare).strip("_")


def smi_property(header: str) -> str:
    return header.split("[", 1)[0].strip().lower()


def _build() -> dict[str, Column]:
    table: dict[str, Column] = {}

    def add(role: str, names: str, scale: float = 1.0) -> None:
        for name in names.split():
            table[name] = Column(role, scale)

    add(TIME, "timestamp time datetime date_time ts epoch unix_time wall_time timestamp_s "
              "timestamp_ms timestamp_us timestamp_ns time_s t elapsed elapsed_s")
    add(TIME, "time_ms elapsed_ms", 1e-3)
    add(GPU, "index gpu gpu_index gpu_id gpu_idx idx device device_id device_index gpu_num "
             "minor_number")
    add(UUID, "uuid gpu_uuid")
    add(NAME, "name gpu_name gpu_model model model_name modelname product_name")
    add("temperature_c", "temperature_gpu temperature temp temp_c temperature_c gpu_temp "
                         "gpu_temp_c gpu_temperature gpu_temperature_c temperature_celsius "
                         "gpu_temperature_celsius core_temp_c")
    add("tlimit_c", "temperature_gpu_tlimit tlimit tlimit_c slowdown_margin_c below_slowdown_c")
    add("slowdown_c", "slowdown_c slowdown_temp_c temperature_slowdown_c "
                      "gpu_slowdown_temperature_celsius")
    add("shutdown_c", "shutdown_c shutdown_temp_c")
    add("utilization_pct", "utilization_gpu utilization gpu_util gpu_util_pct gpu_util_percent "
                           "util_gpu util_gpu_pct util_gpu_percent gpu_utilization "
                           "gpu_utilization_pct utilization_pct util util_pct sm_util")
    add("utilization_pct", "gpu_utilization_ratio utilization_ratio", 100.0)
    for field, stems in (
        ("memory_used_mib", "memory_used mem_used fb_used used_memory gpu_mem_used"),
        ("memory_free_mib", "memory_free mem_free fb_free free_memory gpu_mem_free"),
        ("memory_total_mib", "memory_total mem_total fb_total total_memory gpu_mem_total"),
    ):
        for stem in stems.split():
            # nvidia tools write "MB" for MiB (nvidia-smi dmon's fb, pynvml loggers' _MB).
            add(field, f"{stem} {stem}_mib {stem}_mb")
            add(field, f"{stem}_gib {stem}_gb", 1024.0)
            add(field, f"{stem}_kib {stem}_kb", 1 / 1024)
            add(field, f"{stem}_bytes {stem}_b", 1 / (1024 * 1024))
    add("power_w", "power_draw power_draw_instant power_draw_average power power_w "
                   "power_draw_w power_usage power_usage_w power_watts gpu_power_watts")
    add("power_w", "power_mw power_draw_mw power_usage_mw", 1e-3)
    add("power_limit_w", "power_limit enforced_power_limit power_limit_w power_cap power_cap_w "
                         "power_limit_watts gpu_power_limit_watts")
    add("power_limit_w", "power_limit_mw enforced_power_limit_mw", 1e-3)
    add("reasons", "clocks_event_reasons_active clocks_throttle_reasons_active "
                   "clocks_event_reasons clocks_throttle_reasons throttle_reasons "
                   "clock_throttle_reasons throttle_reasons_mask throttle_mask")
    # DCGM field names, as CSV loggers over DCGM name their columns.
    add("temperature_c", "dcgm_fi_dev_gpu_temp")
    add("power_w", "dcgm_fi_dev_power_usage")
    add("utilization_pct", "dcgm_fi_dev_gpu_util")
    add("memory_used_mib", "dcgm_fi_dev_fb_used")
    add("memory_free_mib", "dcgm_fi_dev_fb_free")
    add("memory_total_mib", "dcgm_fi_dev_fb_total")
    add("reasons", "dcgm_fi_dev_clock_throttle_reasons dcgm_fi_dev_clocks_event_reasons")
    return table


SYNONYMS: dict[str, Column] = _build()


def column_for(header: str) -> Column | None:
    return SYNONYMS.get(normalize(header))


def names_for(role: str) -> list[str]:
    return [name for name, column in SYNONYMS.items() if column.role == role]
