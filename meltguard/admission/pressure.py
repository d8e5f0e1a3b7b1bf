"""GPU pressure levels from telemetry: climb at once, come down only slowly.

`assess` is pure: the previous state, the newest samples and `now` in, the next state out.
The sampler calls it every `sample_interval`; the gate reads the state it returns. Going up
is immediate because a hot card loses throughput (and hardware) faster than clients lose
patience; coming down waits for every exit signal and the level's `min_dwell`, because a
level that flaps makes quotas, queue limits and Retry-After flap with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from meltguard.admission.policy import (
    RISING_SIGNALS,
    EnterSignals,
    ExitSignals,
    Level,
    Policy,
    Pressure,
    PressureLevel,
)
from meltguard.admission.thermal import ThermalState
from meltguard.values import GpuSample

# Where pressure.hold sets the card's load: the settling temperature it aims at moves this
# many °C per °C that the card reads away from the hold line, so a cool card is let heat
# quickly and one past the line is turned back.
HOLD_GAIN = 1.0
# Integral action: a fit that is biased (early on it has seen little but full load) would
# hold the card off the line by bias/(1+HOLD_GAIN). While the governor is pacing (or the card
# is past the line) each sample moves the aim by HOLD_INTEGRAL x the error, up to
# HOLD_BIAS_MAX_C either way; while it is not (a card heating up from cold, which no aim
# would slow down) a negative aim only unwinds, so it cannot wind up.
HOLD_INTEGRAL = 0.1
HOLD_RAISE_C = 0.5
HOLD_BIAS_MAX_C = 8.0
# The smallest busy fraction the governor asks for: a card is never paced to a standstill
# (the levels and their actions take over when even this is too much).
MIN_DUTY = 0.05
# What cooling_eta says when nothing predicts the way down (not cooling, memory, throttle,
# stale telemetry): long enough that retries do not hammer a hot card, well inside the
# 60 s the OpenAI SDK still honours.
NOT_COOLING_ETA_S = 30.0

TELEMETRY_STALE = "telemetry_stale"
TELEMETRY_MISSING = "telemetry_missing"
GPU_LOST = "gpu_lost"
MIN_DWELL = "min_dwell"
# Signals cooling_eta can predict from the fitted thermal model; any other one holding a level
# (memory, utilization, power, throttle, lost, stale, a lookahead that still sees the card
# rising) gets the conservative default.
_THERMAL = frozenset({"temperature_c", "below_slowdown_c", MIN_DWELL})

_LEVELS = (Level.ELEVATED, Level.HIGH, Level.CRITICAL)
_NOT_HELD = -math.inf
_NO_DWELL: tuple[float, ...] = (_NOT_HELD,) * len(Level)


@dataclass(frozen=True, slots=True)
class GpuPressure:
    """One GPU's level and what holds it there.

    `dwell_until[L]` is the time before which this GPU stays at level L or above: set when it
    climbs to or past L (levels jumped over count as entered, so a jump to critical still
    holds elevated for elevated's dwell) and restarted when it lands back on L.
    """

    index: int
    level: Level
    entered_at: float
    signals: tuple[str, ...] = ()
    stale: bool = False
    temperature_c: float | None = None
    slowdown_c: float | None = None
    thermal: ThermalState | None = None  # the card's fitted model (admission/thermal.py)
    dwell_until: tuple[float, ...] = _NO_DWELL
    hold_bias_c: float = 0.0  # the hold governor's integral term (see _duty_budget)
    duty_budget: float | None = None  # this card's share of PressureState.duty_budget

    @property
    def settle_c(self) -> float | None:
        """Where the model says this card settles at its present load (None: no fit yet)."""
        return self.thermal.settle_c() if self.thermal is not None else None


@dataclass(frozen=True, slots=True)
class PressureState:
    """All GPUs; the overall level is the hottest one's because one melting card is enough."""

    gpus: tuple[GpuPressure, ...]
    level: Level
    entered_at: float
    stale: bool
    reasons: tuple[str, ...] = ()
    # The share of time the GPU may be kept busy so that its predicted settling temperature
    # sits at `pressure.hold`; None: no limit (no hold configured, no fit yet, or a cool card).
    duty_budget: float | None = None

    def gpu(self, index: int) -> GpuPressure | None:
        return next((g for g in self.gpus if g.index == index), None)


@dataclass(frozen=True, slots=True)
class _Reading:
    """What one assessment knows about a GPU; None is unknown (never triggers, never blocks)."""

    temperature_c: float | None = None
    slowdown_c: float | None = None
    memory_ratio: float | None = None
    utilization: float | None = None
    power_ratio: float | None = None
    throttle: frozenset[str] = frozenset()
    lost: bool = False
    stale: str | None = None  # TELEMETRY_STALE or TELEMETRY_MISSING
    thermal: ThermalState | None = None
    lookahead: float | None = None

    def crosses(self, line_c: float) -> bool:
        """Whether the model sees the card rise to `line_c` within the lookahead."""
        if self.thermal is None or not self.lookahead:
            return False
        eta = self.thermal.crossing_in_s(line_c)
        return eta is not None and eta <= self.lookahead

    def rising(self, signal: str) -> float | None:
        values = {
            "temperature_c": self.temperature_c,
            "memory_ratio": self.memory_ratio,
            "utilization": self.utilization,
            "power_ratio": self.power_ratio,
        }
        return values[signal]


def assess(
    samples: Sequence[GpuSample], previous: PressureState | None, policy: Policy, now: float
) -> PressureState:
    """The pressure state at `now` from the newest samples and the state assessed before."""
    pressure = policy.pressure
    on_stale = Level.named(pressure.on_stale)
    newest: dict[int, GpuSample] = {}
    for sample in samples:
        seen = newest.get(sample.index)
        if seen is None or sample.taken_at >= seen.taken_at:
            newest[sample.index] = sample
    before = {g.index: g for g in previous.gpus} if previous is not None else {}

    gpus: list[GpuPressure] = []
    # A GPU seen before but absent now stays in the state as missing: the sampler losing a
    # card is no reason to forget how hot it was.
    for index in sorted(newest.keys() | before.keys()):
        prior = before.get(index) or _first_sight(index, previous, policy, now)
        gpus.append(_step(prior, newest.get(index), policy, pressure, on_stale, now))

    if gpus:
        level = max(g.level for g in gpus)
        stale = any(g.stale for g in gpus)
        reasons = tuple(f"gpu{g.index}:{s}" for g in gpus if g.level == level for s in g.signals)
    else:
        # Nothing has ever been read: no evidence the cards are cool, so assume on_stale.
        level, stale, reasons = on_stale, True, (TELEMETRY_MISSING,)
    entered_at = (
        previous.entered_at if previous is not None and previous.level == level else now
    )
    budgets = [g.duty_budget for g in gpus if g.duty_budget is not None]
    return PressureState(
        gpus=tuple(gpus), level=level, entered_at=entered_at, stale=stale, reasons=reasons,
        duty_budget=min(budgets) if budgets and not stale else None,
    )


def hold_line(pressure: Pressure, slowdown_c: float | None) -> float | None:
    """The temperature `pressure.hold` keeps a card's settling point under, for its slowdown
    temperature; None when the policy holds nothing or the line needs an unknown slowdown."""
    hold = pressure.hold
    if hold is None:
        return None
    lines = []
    if hold.temperature_c is not None:
        lines.append(hold.temperature_c)
    if hold.below_slowdown_c is not None and slowdown_c is not None:
        lines.append(slowdown_c - hold.below_slowdown_c)
    return min(lines) if lines else None


def _duty_budget(
    thermal: ThermalState | None, temperature_c: float | None, slowdown_c: float | None,
    bias_c: float, pressure: Pressure,
) -> float | None:
    """The busy fraction whose predicted settling temperature is the hold line, bent toward
    the line by how far the card reads from it (HOLD_GAIN) and by the integral term:
    feed-forward from the model, feedback from the sensor, so a fit that is a few degrees
    off still converges on the line."""
    line = hold_line(pressure, slowdown_c)
    if line is None or thermal is None or temperature_c is None:
        return None
    fit = thermal.trusted
    mapping = thermal.utilization_to_load()
    if fit is None or mapping is None:
        return None
    goal = line + HOLD_GAIN * (line - temperature_c) + bias_c
    load = fit.load_for_settle(goal)
    if load is None:
        return None
    offset, slope = mapping
    duty = (load - offset) / slope
    if duty >= 1.0:
        return None
    return max(duty, MIN_DUTY)


def cooling_eta(state: PressureState, policy: Policy, now: float) -> float:
    """Seconds until the overall level can be left: what a shed request's Retry-After is.

    Every GPU at the overall level has to leave it, so this is the slowest one's estimate:
    its remaining min_dwell, or the time its temperature needs to fall to the exit threshold
    at the current cooling rate, whichever is longer. Uncapped; the daemon caps it.
    """
    if state.level == Level.NORMAL:
        return 0.0
    config = policy.level_config(state.level)
    etas = [_gpu_eta(g, state.level, config, now) for g in state.gpus if g.level == state.level]
    return max(etas) if etas else NOT_COOLING_ETA_S


def _first_sight(
    index: int, previous: PressureState | None, policy: Policy, now: float
) -> GpuPressure:
    if previous is None:
        return GpuPressure(index=index, level=Level.NORMAL, entered_at=now)
    # A card first read after a stale spell (or hot-plugged) starts where the whole box was,
    # so recovering from stale telemetry obeys the same exit rules as recovering from heat.
    until = [_NOT_HELD] * len(Level)
    for level in _LEVELS:
        if level <= previous.level:
            until[level] = previous.entered_at + _dwell(policy, level)
    return GpuPressure(
        index=index, level=previous.level, entered_at=previous.entered_at,
        dwell_until=tuple(until),
    )


def _step(
    prior: GpuPressure,
    sample: GpuSample | None,
    policy: Policy,
    pressure: Pressure,
    on_stale: Level,
    now: float,
) -> GpuPressure:
    reading, thermal = _read(prior, sample, pressure, now)
    entering = {
        level: _entering(level, policy.level_config(level), reading, on_stale)
        for level in _LEVELS
    }
    target = max((level for level in _LEVELS if entering[level]), default=Level.NORMAL)
    level, entered_at = prior.level, prior.entered_at
    until = list(prior.dwell_until)

    if target > level:
        for passed in _LEVELS:
            if level < passed <= target:
                until[passed] = now + _dwell(policy, passed)
        level, entered_at = target, now
    elif (
        target < level
        and now >= until[level]
        and not _unmet_exits(level, policy.level_config(level), reading, on_stale)
    ):
        landing, restart = Level.NORMAL, False
        for lower in reversed(_LEVELS):
            if lower >= level:
                continue
            if entering[lower] or _unmet_exits(lower, policy.level_config(lower), reading,
                                                on_stale):
                landing, restart = lower, True
                break
            if now < until[lower]:
                landing = lower
                break
        for above in _LEVELS:
            if above > landing:
                until[above] = _NOT_HELD
        if restart:
            until[landing] = now + _dwell(policy, landing)
        level, entered_at = landing, now

    bias = _hold_bias(prior, reading, pressure, sample is not None)
    slowdown = reading.slowdown_c if reading.slowdown_c is not None else prior.slowdown_c
    duty = None if reading.stale is not None else _duty_budget(
        thermal, reading.temperature_c, slowdown, bias, pressure)
    return GpuPressure(
        index=prior.index,
        level=level,
        entered_at=entered_at,
        signals=_holding(level, entering, policy, reading, on_stale),
        stale=reading.stale is not None,
        temperature_c=reading.temperature_c,
        slowdown_c=slowdown,
        thermal=thermal,
        dwell_until=tuple(until),
        hold_bias_c=bias,
        duty_budget=duty,
    )


def _hold_bias(prior: GpuPressure, reading: _Reading, pressure: Pressure, fresh: bool) -> float:
    """The hold governor's integral term after this sample (see HOLD_INTEGRAL)."""
    slowdown = reading.slowdown_c if reading.slowdown_c is not None else prior.slowdown_c
    line = hold_line(pressure, slowdown)
    temperature = reading.temperature_c
    if line is None or temperature is None or not fresh or reading.stale is not None:
        return prior.hold_bias_c
    error = line - temperature
    # Raising the aim is slow (a card still coming up to the line would wind it up and then
    # overshoot); lowering it is not (a card past the line is the emergency).
    bias = prior.hold_bias_c + HOLD_INTEGRAL * min(error, HOLD_RAISE_C)
    if prior.duty_budget is None and error > 0.0:
        bias = min(bias, max(prior.hold_bias_c, 0.0))
    return min(max(bias, -HOLD_BIAS_MAX_C), HOLD_BIAS_MAX_C)


def _read(
    prior: GpuPressure, sample: GpuSample | None, pressure: Pressure, now: float
) -> tuple[_Reading, ThermalState | None]:
    if sample is None:
        return _Reading(stale=TELEMETRY_MISSING), prior.thermal
    if sample.taken_at < now - pressure.stale_after:
        # Old numbers are not evidence either way: the card may have cooled or caught fire.
        return _Reading(stale=TELEMETRY_STALE), prior.thermal

    thermal = prior.thermal
    if sample.temperature_c is not None:
        if thermal is None:
            thermal = ThermalState.start(pressure.sample_interval, sample)
        thermal = thermal.observe(sample)
    reading = _Reading(
        temperature_c=sample.temperature_c,
        slowdown_c=sample.slowdown_c,
        memory_ratio=sample.memory_ratio,
        utilization=sample.utilization,
        power_ratio=sample.power_ratio,
        throttle=sample.throttle,
        lost=sample.lost,
        thermal=thermal,
        lookahead=pressure.lookahead,
    )
    return reading, thermal


def _dwell(policy: Policy, level: Level) -> float:
    config = policy.level_config(level)
    return config.min_dwell if config is not None else 0.0


def _rising_threshold(signals: ExitSignals, signal: str) -> float | None:
    thresholds = {
        "temperature_c": signals.temperature_c,
        "memory_ratio": signals.memory_ratio,
        "utilization": signals.utilization,
        "power_ratio": signals.power_ratio,
    }
    return thresholds[signal]


def _entering(
    level: Level, config: PressureLevel | None, r: _Reading, on_stale: Level
) -> list[str]:
    """The enter signals of `level` that hold now, as "name>=threshold" strings."""
    held: list[str] = []
    if r.stale is not None and level == on_stale:
        held.append(r.stale)
    if r.lost and level == Level.CRITICAL:
        held.append(GPU_LOST)  # whatever the policy says: a card that is gone is critical
    if config is None:
        return held
    enter: EnterSignals = config.enter
    for signal in RISING_SIGNALS:
        threshold, value = _rising_threshold(enter, signal), r.rising(signal)
        if threshold is not None and value is not None and value >= threshold:
            held.append(f"{signal}>={threshold:g}")
    headroom = enter.below_slowdown_c
    if (
        headroom is not None
        and r.temperature_c is not None
        and r.slowdown_c is not None
        and r.temperature_c >= r.slowdown_c - headroom
    ):
        held.append(f"below_slowdown_c<={headroom:g}")
    active = sorted(r.throttle.intersection(enter.throttle))
    if active:
        held.append("throttle:" + ",".join(active))

    if r.temperature_c is not None and r.lookahead:
        # lookahead: the fitted curve (not a straight line) crosses the line in time.
        absolute = enter.temperature_c
        if absolute is not None and r.temperature_c < absolute and r.crosses(absolute):
            held.append(f"lookahead:temperature_c>={absolute:g}")
        if headroom is not None and r.slowdown_c is not None:
            line = r.slowdown_c - headroom
            if r.temperature_c < line and r.crosses(line):
                held.append(f"lookahead:below_slowdown_c<={headroom:g}")
    return held


def _unmet_exits(
    level: Level, config: PressureLevel | None, r: _Reading, on_stale: Level
) -> list[str]:
    """Exit conditions of `level` that do not hold yet; leaving needs this empty.

    A signal with an exit threshold must fall to it (the hysteresis band); one without must
    merely stop holding; an unknown reading blocks nothing, or a card that stops reporting a
    field would pin its level forever.
    """
    unmet: list[str] = []
    if r.stale is not None and level == on_stale:
        unmet.append(r.stale)
    if r.lost and level == Level.CRITICAL:
        unmet.append(GPU_LOST)
    if config is None:
        return unmet
    enter, leave = config.enter, config.exit
    for signal in RISING_SIGNALS:
        value = r.rising(signal)
        if value is None:
            continue
        exit_at, enter_at = _rising_threshold(leave, signal), _rising_threshold(enter, signal)
        if exit_at is not None:
            if value > exit_at:
                unmet.append(f"{signal}>{exit_at:g}")
        elif enter_at is not None and value >= enter_at:
            unmet.append(f"{signal}>={enter_at:g}")
    if r.temperature_c is not None and r.slowdown_c is not None:
        if leave.below_slowdown_c is not None:
            if r.temperature_c > r.slowdown_c - leave.below_slowdown_c:
                unmet.append(f"below_slowdown_c<{leave.below_slowdown_c:g}")
        elif (
            enter.below_slowdown_c is not None
            and r.temperature_c >= r.slowdown_c - enter.below_slowdown_c
        ):
            unmet.append(f"below_slowdown_c<={enter.below_slowdown_c:g}")
    active = sorted(r.throttle.intersection(enter.throttle))
    if active:
        unmet.append("throttle:" + ",".join(active))
    if enter.gpu_lost and r.lost and GPU_LOST not in unmet:
        unmet.append(GPU_LOST)
    return unmet


def _signal_name(signal: str) -> str:
    for stop, char in enumerate(signal):
        if char in "<>=:":
            return signal[:stop]
    return signal


def _holding(
    level: Level,
    entering: dict[Level, list[str]],
    policy: Policy,
    reading: _Reading,
    on_stale: Level,
) -> tuple[str, ...]:
    """Enter signals that hold, then exit signals not yet met; min_dwell when neither."""
    if level == Level.NORMAL:
        return ()
    held = list(entering[level])
    names = {_signal_name(s) for s in held}
    for signal in _unmet_exits(level, policy.level_config(level), reading, on_stale):
        if _signal_name(signal) not in names:
            held.append(signal)
    return tuple(held) or (MIN_DWELL,)


def _gpu_eta(gpu: GpuPressure, level: Level, config: PressureLevel | None, now: float) -> float:
    remaining = max(gpu.dwell_until[level] - now, 0.0)
    if gpu.stale or any(_signal_name(s) not in _THERMAL for s in gpu.signals):
        return max(remaining, NOT_COOLING_ETA_S)
    return max(remaining, _thermal_eta(gpu, config))


def _thermal_eta(gpu: GpuPressure, config: PressureLevel | None) -> float:
    """Seconds for the temperature to fall to the level's exit line along the fitted curve:
    at the present load, or the lightest load seen lately when the present one would never
    get there (shedding is what brings the load down)."""
    if config is None or gpu.temperature_c is None:
        return 0.0
    lines: list[float] = []
    absolute = config.exit.temperature_c
    if absolute is None:
        absolute = config.enter.temperature_c
    if absolute is not None:
        lines.append(absolute)
    headroom = config.exit.below_slowdown_c
    if headroom is None:
        headroom = config.enter.below_slowdown_c
    if headroom is not None and gpu.slowdown_c is not None:
        lines.append(gpu.slowdown_c - headroom)
    if not lines or gpu.temperature_c <= min(lines):
        return 0.0
    eta = gpu.thermal.cooling_s(min(lines)) if gpu.thermal is not None else None
    return NOT_COOLING_ETA_S if eta is None else eta
