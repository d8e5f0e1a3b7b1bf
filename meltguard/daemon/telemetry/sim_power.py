"""The simulated card's power limit: a lever the power actuator can move (protocols.PowerLimits),
and the slowdown a lower limit causes (the DVFS curve in dvfs.py).

Like the driver, it refuses a limit outside the card's range rather than clamping it, and it is
read from the sampler's thread and the event loop at once, so every access holds a lock.
"""

from __future__ import annotations

import threading

from meltguard.daemon.telemetry.dvfs import throughput_at


class SimPowerLimit:
    def __init__(self, *, index: int, default_w: float, min_w: float, max_w: float) -> None:
        if not 0 < min_w <= default_w <= max_w:
            raise ValueError(f"need 0 < min_w <= default_w <= max_w, got {min_w}, {default_w}, "
                             f"{max_w}")
        self._index = index
        self._default = default_w
        self._range = (min_w, max_w)
        self._limit = default_w
        self._lock = threading.Lock()

    @property
    def limit_w(self) -> float:
        with self._lock:
            return self._limit

    def default_power_limit_w(self, gpu: int) -> float | None:
        return self._default if gpu == self._index else None

    def power_limit_range_w(self, gpu: int) -> tuple[float, float] | None:
        return self._range if gpu == self._index else None

    def set_power_limit_w(self, gpu: int, watts: float) -> str:
        if gpu != self._index:
            return "nvml_no_handle"
        low, high = self._range
        if not low <= watts <= high:
            return "nvml_invalid_argument"
        with self._lock:
            self._limit = float(watts)
        return "success"

    def slowdown(self, full_clocks_w: float) -> float:
        """How much longer work that would draw `full_clocks_w` takes under the limit (>= 1)."""
        limit = self.limit_w
        if full_clocks_w <= 0 or limit >= full_clocks_w:
            return 1.0
        return 1.0 / throughput_at(limit / full_clocks_w)
