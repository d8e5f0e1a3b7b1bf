"""A simulated GPU that heats with the engine's real work, for laptops, CI and the benchmark.

Thermal model: one lumped heat capacity between die and air (first order),

    dT/dt = (T_ambient + R·P − T) / τ,    P = P_idle + (P_max − P_idle) · duty

where `duty` is the fraction of real time the engine spent generating since the previous read.
With duty constant over a read interval the equation has the closed form
T(t+Δ) = T_ss + (T − T_ss)·exp(−Δ/τ), so the model is integrated exactly whatever the read
interval; the only extra cuts are at the instants throttling switches on or off.

The power limit is a lever (protocols.PowerLimits, `SimPowerLimit`): under a limit below what
the work draws at full clocks, the draw while busy is the limit and work slows by the published
DVFS curve of dvfs.py, so a capped card runs cooler and still does most of its work. The card
keeps an energy counter, in joules of model time, like NVML's total energy.

Throttling behaves like the hardware: at the slowdown temperature clocks drop (`hw_thermal`, power
capped at `throttled_max_w`, work takes `throttle_slowdown` times longer) until the die has cooled
`release_c` below it. Full duty therefore settles into a saw-tooth just under slowdown instead of
cooking past shutdown, as an H100 in a hot rack does.

`speed` compresses time: thermal time advances speed × real time, so τ = 40 s with speed 10
heats in seconds of wall time, while duty (a ratio of real times) is unaffected.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from meltguard.daemon.telemetry.sim_power import SimPowerLimit
from meltguard.protocols import Clock
from meltguard.values import GpuSample

_GIB = 1024**3
# One long read interval at high speed can alternate throttle states many times; past this many
# switches the remainder is integrated in the current state (the error is within the saw-tooth).
_MAX_SEGMENTS = 256


@dataclass(frozen=True, slots=True)
class SimGpuParams:
    """H100-SXM-like defaults: 700 W board, 87 °C slowdown, 92 °C shutdown.

    R = 0.1 °C/W puts idle (70 W) at 37 °C and full duty (700 W) at 100 °C unthrottled, so
    sustained full load must throttle, while the sustainable duty cycle
    (`sustainable_duty_cycle`, ≈0.79) is the target an admission controller can hold.
    """

    name: str = "Simulated NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-5151a7ed-0000-4000-8000-000000000000"
    index: int = 0
    ambient_c: float = 30.0
    tau_s: float = 40.0
    r_c_per_w: float = 0.1
    idle_w: float = 70.0
    max_w: float = 700.0
    power_limit_w: float = 700.0  # the default limit, also the highest the card accepts
    min_power_limit_w: float = 200.0  # the lowest limit the card accepts (an H100 SXM's)
    slowdown_c: float = 87.0
    shutdown_c: float = 92.0
    release_c: float = 2.0  # hysteresis: clocks recover this far below slowdown
    throttled_max_w: float = 540.0  # steady state 84 °C, under the release point: a saw-tooth
    throttle_slowdown: float = 1.8  # work takes this much longer at thermal-slowdown clocks
    memory_total_bytes: int = 85_520_809_984  # 81559 MiB, what an H100 80GB reports
    memory_base_bytes: int = 3 * _GIB  # CUDA context and model weights
    memory_per_request_bytes: int = 6 * _GIB  # activations of one in-flight generation
    initial_c: float | None = None  # None: start at the idle steady state

    def __post_init__(self) -> None:
        problems = []
        if self.tau_s <= 0:
            problems.append("tau_s must be > 0")
        if self.r_c_per_w <= 0:
            problems.append("r_c_per_w must be > 0")
        if not 0 <= self.idle_w <= self.max_w:
            problems.append("need 0 <= idle_w <= max_w")
        if self.release_c <= 0:
            problems.append("release_c must be > 0 or throttling would switch without progress")
        if self.throttle_slowdown < 1:
            problems.append("throttle_slowdown must be >= 1")
        if not 0 < self.min_power_limit_w <= self.power_limit_w:
            problems.append("need 0 < min_power_limit_w <= power_limit_w")
        if problems:
            raise ValueError("SimGpuParams: " + "; ".join(problems))


def _clamp01(value: float) -> float:
    return min(max(value, 0.0), 1.0)


def demand_power(params: SimGpuParams, duty: float) -> float:
    """Board power the work asks for at this duty cycle, before any cap."""
    return params.idle_w + (params.max_w - params.idle_w) * _clamp01(duty)


def steady_state_temperature(params: SimGpuParams, duty: float) -> float:
    """Where the die settles at a constant duty cycle if nothing throttled."""
    return params.ambient_c + params.r_c_per_w * demand_power(params, duty)


def sustainable_duty_cycle(params: SimGpuParams) -> float:
    """The duty cycle whose steady state is exactly the slowdown temperature: above it the card
    eventually throttles, below it it never does. 0.79 with the defaults."""
    power = (params.slowdown_c - params.ambient_c) / params.r_c_per_w
    return _clamp01((power - params.idle_w) / (params.max_w - params.idle_w))


class SimulatedGpu:
    """TelemetrySource with one simulated GPU; deterministic for a given clock and busy series.

    `busy_seconds` is the engine's cumulative busy time in real seconds (Engine.busy_seconds) and
    `inflight` the number of generations holding memory; both are called from the sampler's
    reader thread, so they must be safe to call off the event loop (plain attribute reads are).
    """

    def __init__(
        self,
        *,
        clock: Clock,
        busy_seconds: Callable[[], float] | None = None,
        inflight: Callable[[], int] | None = None,
        speed: float = 1.0,
        params: SimGpuParams | None = None,
    ) -> None:
        if speed <= 0:
            raise ValueError(f"sim speed must be > 0, got {speed}")
        self._clock = clock
        self._busy_seconds = busy_seconds or (lambda: 0.0)
        self._inflight = inflight or (lambda: 0)
        self._speed = speed
        self.params = params or SimGpuParams()
        p = self.params
        self._temperature = (
            p.initial_c if p.initial_c is not None else (steady_state_temperature(p, 0.0))
        )
        self._throttled = self._temperature >= p.slowdown_c
        self._duty = 0.0
        self._power = p.idle_w
        self._power_capped = False
        self._last_t: float | None = None
        self._last_busy = 0.0
        self._energy_j = 0.0
        self.power_limit = SimPowerLimit(index=p.index, default_w=p.power_limit_w,
                                         min_w=p.min_power_limit_w, max_w=p.power_limit_w)
        # read() runs on the sampler thread while slowdown_factor() is asked from the event loop.
        self._lock = threading.Lock()

    @property
    def kind(self) -> str:
        return "simulated"

    @property
    def speed(self) -> float:
        return self._speed

    @property
    def temperature_c(self) -> float:
        with self._lock:
            return self._temperature

    @property
    def throttled(self) -> bool:
        with self._lock:
            return self._throttled

    def slowdown_factor(self) -> float:
        """How much longer work takes at the current clocks: the daemon hands it to the sim engine
        so that a hot simulated card really serves fewer images, as a throttled one does."""
        with self._lock:
            thermal = self.params.throttle_slowdown if self._throttled else 1.0
        # The tighter of the two governs the clocks: thermal slowdown cuts them whatever the limit.
        return max(thermal, self.power_limit.slowdown(self.params.max_w))

    # ---- the power limit as a lever (protocols.PowerLimits) ----

    def default_power_limit_w(self, gpu: int) -> float | None:
        return self.power_limit.default_power_limit_w(gpu)

    def power_limit_range_w(self, gpu: int) -> tuple[float, float] | None:
        return self.power_limit.power_limit_range_w(gpu)

    def set_power_limit_w(self, gpu: int, watts: float) -> str:
        return self.power_limit.set_power_limit_w(gpu, watts)

    def read(self) -> Sequence[GpuSample]:
        now = self._clock.monotonic()
        busy = self._busy_seconds()
        inflight = max(self._inflight(), 0)
        with self._lock:
            self._advance(now, busy)
            return [self._sample(now, inflight)]

    def close(self) -> None:
        pass

    def _advance(self, now: float, busy: float) -> None:
        if self._last_t is None:
            self._last_t, self._last_busy = now, busy
            return
        dt = now - self._last_t
        if dt <= 0:
            return
        self._duty = _clamp01((busy - self._last_busy) / dt)
        self._last_t, self._last_busy = now, busy
        self._integrate(dt * self._speed)

    def _integrate(self, dt: float) -> None:
        p = self.params
        release = p.slowdown_c - p.release_c
        remaining = dt
        for _ in range(_MAX_SEGMENTS):
            if not self._throttled and self._temperature >= p.slowdown_c:
                self._throttled = True
            elif self._throttled and self._temperature <= release:
                self._throttled = False
            target = self._target()
            temp = self._temperature
            crossing = math.inf  # thermal seconds until the throttle state flips
            if not self._throttled and target > p.slowdown_c:
                crossing = p.tau_s * math.log((target - temp) / (target - p.slowdown_c))
            elif self._throttled and target < release:
                crossing = p.tau_s * math.log((temp - target) / (release - target))
            if crossing >= remaining:
                break
            self._energy_j += self._power * crossing
            self._temperature = p.slowdown_c if not self._throttled else release
            remaining -= crossing
        target = self._target()
        self._energy_j += self._power * remaining
        self._temperature = target + (self._temperature - target) * math.exp(-remaining / p.tau_s)

    def _target(self) -> float:
        """Steady state for the current duty and throttle state; also fixes the reported power."""
        p = self.params
        limit = self.power_limit.limit_w
        # The limit caps the draw while the card works; idle draw is far below any limit.
        busy_w = min(p.max_w, limit)
        demand = p.idle_w + (busy_w - p.idle_w) * _clamp01(self._duty)
        self._power = min(demand, p.throttled_max_w) if self._throttled else demand
        self._power_capped = p.max_w > limit and self._duty > 0
        return p.ambient_c + p.r_c_per_w * self._power

    def _sample(self, now: float, inflight: int) -> GpuSample:
        p = self.params
        throttle: set[str] = set()
        if self._throttled:
            throttle.add("hw_thermal")
        if self._power_capped:
            throttle.add("sw_power_cap")
        if self._duty == 0.0:
            # Real cards report idle clocks as a clocks-event reason too.
            throttle.add("gpu_idle")
        used = p.memory_base_bytes + p.memory_per_request_bytes * inflight
        return GpuSample(
            index=p.index,
            uuid=p.uuid,
            name=p.name,
            taken_at=now,
            temperature_c=self._temperature,
            slowdown_c=p.slowdown_c,
            shutdown_c=p.shutdown_c,
            memory_used_bytes=min(used, p.memory_total_bytes),
            memory_total_bytes=p.memory_total_bytes,
            utilization=self._duty,
            power_w=self._power,
            power_limit_w=self.power_limit.limit_w,
            throttle=frozenset(throttle),
            energy_j=self._energy_j,
        )
