"""Where a GPU's temperature is heading: a two-stage thermal model fitted online per card.

Model. A GPU heats in two stages: the die rises within about a second of a load step (a
small heat capacity behind a small thermal resistance), its heatsink over a minute or more.
At the sampling rates NVML is read at (0.5-1 s) the die stage is as good as instantaneous,
so the model is

    T    = H + R_f·x                              die: the heatsink plus a rise that follows
                                                  the load at once
    dH/dt = (T_amb + R_s·x − H) / τ               heatsink: first order, time constant τ

with `x` the load: board power over the power limit where the card reports power, else the
utilization, else nothing (then R_f = R_s = 0 and T_amb is simply where the card settles).
The settling temperature at a constant load is T_amb + (R_f + R_s)·x, tied to power; a load
step moves the temperature by R_f·Δx at once and the rest along exp(−t/τ).

Why this model: it is the smallest one that has both stages real curves show (2 °C/s for the
first seconds of a load step, flattening within a minute), it is linear in T_amb, R_s and R_f
once τ is fixed, and it has a closed-form solution, so a prediction at any horizon and the
time to reach any line are exact rather than stepped.

Fitting. For each τ of a fixed grid (in sample intervals, so a time-compressed daemon fits
the same curve) the exact discretisation over a sample step of Δ seconds,

    T[k+1] − (1−α)·T[k] = α·T_amb + α·x'·R_s + (x' − x + α·x)·R_f,    α = 1 − exp(−Δ/τ),

is a linear regression in (T_amb, R_s, R_f) whose sufficient statistics are kept with
exponential forgetting (about HORIZON_SAMPLES samples of memory): O(grid) work per sample,
no history to keep. The τ with the smallest residual wins. A small ridge toward "no load
effect" keeps the solve defined while the load has not varied yet.

Limits.
- No power and no utilization: the model only learns where the curve is flattening toward
  under whatever load the card had lately; a load change is seen only as the temperature
  moves. Predictions are then as good as the last minute's curve.
- A card that just started: nothing is predicted before MIN_FIT_SAMPLES samples; the
  policy's absolute thresholds still apply from the first sample.
- Noisy sensors: NVML reports whole degrees. The fit averages over its memory, but a
  prediction starts from the newest reading, so it carries its ±0.5 °C rounding.
- Fans and boost clocks make a real card's R depend on temperature; forgetting lets the fit
  follow that slowly, not at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meltguard.values import GpuSample

# Heatsink time constants tried, in sample intervals: 1 s to 10 min at 500 ms.
TAU_GRID_SAMPLES: tuple[float, ...] = tuple(2.0 * 1.15**i for i in range(41))
# Memory of the fit: about this many samples (2.5 min at 500 ms).
HORIZON_SAMPLES = 300.0
# No prediction before this many sample steps have been fitted.
MIN_FIT_SAMPLES = 20
# A gap of more than this many intervals between two samples is not one step of the curve.
MAX_GAP_SAMPLES = 4.0
# Ridge weight, relative to each regressor's own energy: enough to keep a load effect that
# the data cannot tell yet at zero, too little to bend a fit the data does determine.
_RIDGE = 1e-3
# A τ whose residual is within this factor of the best one's is as plausible as the best.
# Loose on purpose: NVML's whole degrees and a real card's fans make residuals correlated,
# so far fewer of them are independent than there are samples.
PLAUSIBLE_SSE = 1.25
_EPS = 1e-12

LOAD_POWER = "power"
LOAD_UTILIZATION = "utilization"
LOAD_NONE = "none"


@dataclass(frozen=True, slots=True)
class ThermalFit:
    """The fitted model of one card; all temperatures in °C, times in seconds."""

    ambient_c: float
    r_slow_c: float  # °C per unit of load at steady state, through the heatsink
    r_fast_c: float  # °C per unit of load, at once (die)
    tau_s: float
    rms_c: float  # residual of one sample step
    samples: int

    @property
    def r_total_c(self) -> float:
        return self.r_slow_c + self.r_fast_c

    def settle_c(self, load: float) -> float:
        """Where the card settles if `load` holds."""
        return self.ambient_c + self.r_total_c * load

    def predict_c(self, temperature_c: float, load: float, horizon_s: float) -> float:
        """The temperature `horizon_s` from a reading of `temperature_c` at `load`, the load
        held: the die part is already there, the heatsink part follows exp(−t/τ)."""
        settle = self.settle_c(load)
        return settle + (temperature_c - settle) * math.exp(-max(horizon_s, 0.0) / self.tau_s)

    def time_to_c(self, temperature_c: float, load: float, line_c: float) -> float | None:
        """Seconds until the curve from `temperature_c` at `load` reaches `line_c`; 0 when it
        is there already, None when it settles short of it."""
        settle = self.settle_c(load)
        gap = temperature_c - settle
        if (line_c - temperature_c) * (line_c - settle) <= 0.0 and temperature_c != settle:
            # The line lies between now and the settling point (or on it).
            if line_c == temperature_c:
                return 0.0
            remaining = line_c - settle
            if remaining == 0.0:
                return None  # approached, never reached
            return self.tau_s * math.log(gap / remaining)
        if temperature_c == line_c:
            return 0.0
        return None

    def load_for_settle(self, settle_c: float) -> float | None:
        """The load at which the card would settle at `settle_c`; None when the load does not
        move the settling point (no load signal, or a fit that has not seen it vary)."""
        if self.r_total_c <= _EPS:
            return None
        return (settle_c - self.ambient_c) / self.r_total_c


@dataclass(frozen=True, slots=True)
class _Sums:
    """Forgetting least-squares statistics for one τ: the normal matrix (upper triangle, 3x3),
    the right-hand side and Σy²."""

    a: tuple[float, float, float, float, float, float] = (0.0,) * 6  # 00 01 02 11 12 22
    b: tuple[float, float, float] = (0.0, 0.0, 0.0)
    yy: float = 0.0
    weight: float = 0.0


@dataclass(frozen=True, slots=True)
class ThermalState:
    """One card's model between samples. Build with `ThermalState.start`, advance with
    `observe` once per sample; read `fit`."""

    sample_interval: float
    load_kind: str
    last_t: float | None = None
    last_c: float | None = None
    last_load: float = 0.0
    steps: int = 0
    sums: tuple[_Sums, ...] = ()
    fit: ThermalFit | None = None
    # Every fit whose residual is close to the best one's: the curves the data cannot yet
    # tell apart (early in a load step a short τ settling low and a long one settling high
    # match the first seconds equally well).
    plausible: tuple[ThermalFit, ...] = ()
    # Utilization -> load, for power-driven cards (load = u0 + u1·utilization): how much
    # admitted GPU time moves the load. Σ with forgetting of 1, u, u², x, u·x.
    util_sums: tuple[float, float, float, float, float] = (0.0,) * 5
    min_load: float | None = None
    last_util: float | None = None

    @classmethod
    def start(cls, sample_interval: float, sample: GpuSample) -> ThermalState:
        if sample.power_w is not None:
            kind = LOAD_POWER
        elif sample.utilization is not None:
            kind = LOAD_UTILIZATION
        else:
            kind = LOAD_NONE
        return cls(sample_interval=sample_interval, load_kind=kind,
                   sums=tuple(_Sums() for _ in TAU_GRID_SAMPLES))

    def load_of(self, sample: GpuSample) -> float | None:
        """The sample's load in this card's unit, or None when it lacks the signal."""
        if self.load_kind == LOAD_POWER:
            if sample.power_w is None:
                return None
            # Normalised so that the fit's constants read as °C per "full load"; a card that
            # does not report its limit is taken as a 1 kW one (only the scale changes).
            return sample.power_w / (sample.power_limit_w or 1000.0)
        if self.load_kind == LOAD_UTILIZATION:
            return sample.utilization
        return 0.0

    def utilization_to_load(self) -> tuple[float, float] | None:
        """(u0, u1) with load ≈ u0 + u1·utilization, once utilization has varied enough."""
        if self.load_kind == LOAD_UTILIZATION:
            return (0.0, 1.0)
        n, su, suu, sx, sux = self.util_sums
        if self.load_kind != LOAD_POWER or n < MIN_FIT_SAMPLES:
            return None
        var = suu * n - su * su
        if var <= 1e-3 * n * n:
            # Utilization has barely moved (a card busy all along): take the load as
            # proportional to it, which overstates what a lower duty saves by the idle power;
            # the hold governor's integral term makes up for that until the load varies.
            if self.last_util is None or self.last_util < 0.1:
                return None
            return (0.0, self.last_load / self.last_util)
        slope = (sux * n - su * sx) / var
        if slope <= 0.0:
            return None
        return ((sx - slope * su) / n, slope)

    def observe(self, sample: GpuSample) -> ThermalState:
        temperature = sample.temperature_c
        load = self.load_of(sample)
        t = sample.taken_at
        if temperature is None or load is None or (self.last_t is not None and t <= self.last_t):
            return self
        keep = 1.0 - 1.0 / HORIZON_SAMPLES
        util_sums = self.util_sums
        if self.load_kind == LOAD_POWER and sample.utilization is not None:
            u = sample.utilization
            n, su, suu, sx, sux = util_sums
            util_sums = (keep * n + 1.0, keep * su + u, keep * suu + u * u, keep * sx + load,
                         keep * sux + u * load)
        min_load = load if self.min_load is None else min(self.min_load, load)
        sums, steps, fit, plausible = self.sums, self.steps, self.fit, self.plausible
        if self.last_t is not None and self.last_c is not None:
            dt = t - self.last_t
            if dt <= MAX_GAP_SAMPLES * self.sample_interval:
                sums = tuple(
                    _add(s, keep, dt, tau * self.sample_interval, self.last_c, self.last_load,
                         temperature, load)
                    for s, tau in zip(self.sums, TAU_GRID_SAMPLES, strict=True)
                )
                steps += 1
                plausible = _fits(sums, self.sample_interval, steps, self.last_c)
                fit = plausible[0] if plausible else None
        return ThermalState(
            sample_interval=self.sample_interval, load_kind=self.load_kind, last_t=t,
            last_c=temperature, last_load=load, steps=steps, sums=sums, fit=fit,
            plausible=plausible, util_sums=util_sums, min_load=min_load,
            last_util=sample.utilization,
        )

    @property
    def trusted(self) -> ThermalFit | None:
        """The fit, once it has seen enough samples to predict with."""
        if self.fit is None or self.steps < MIN_FIT_SAMPLES:
            return None
        return self.fit

    def predict_c(self, horizon_s: float) -> float | None:
        fit = self.trusted
        if fit is None or self.last_c is None:
            return None
        return fit.predict_c(self.last_c, self.last_load, horizon_s)

    def settle_c(self) -> float | None:
        fit = self.trusted
        return None if fit is None else fit.settle_c(self.last_load)

    def crossing_in_s(self, line_c: float) -> float | None:
        """Seconds until the predicted curve (the load held) rises to `line_c`; None when it
        does not, or nothing can be predicted yet. Every plausible fit must see the crossing,
        and the latest of their times is the answer: a level is entered early only on what
        the data says for certain, never on the steepest curve that also fits."""
        if self.trusted is None or self.last_c is None or self.last_c >= line_c:
            return None
        latest = 0.0
        for fit in self.plausible:
            eta = fit.time_to_c(self.last_c, self.last_load, line_c)
            if eta is None:
                return None
            latest = max(latest, eta)
        return latest

    def cooling_s(self, line_c: float) -> float | None:
        """Seconds until the card is at or below `line_c`: along the curve of the load it has
        now, or, when that settles above the line, of the lightest load seen lately (what
        shedding work brings it back to). None when neither reaches it."""
        fit = self.trusted
        if fit is None or self.last_c is None:
            return None
        if self.last_c <= line_c:
            return 0.0
        for load in (self.last_load, self.min_load):
            if load is None:
                continue
            eta = fit.time_to_c(self.last_c, load, line_c)
            if eta is not None:
                return eta
        return None


def _add(s: _Sums, keep: float, dt: float, tau: float, before_c: float, before_x: float,
         after_c: float, after_x: float) -> _Sums:
    alpha = -math.expm1(-dt / tau)
    phi = (alpha, alpha * after_x, after_x - before_x + alpha * before_x)
    y = after_c - (1.0 - alpha) * before_c
    a = s.a
    return _Sums(
        a=(keep * a[0] + phi[0] * phi[0], keep * a[1] + phi[0] * phi[1],
           keep * a[2] + phi[0] * phi[2], keep * a[3] + phi[1] * phi[1],
           keep * a[4] + phi[1] * phi[2], keep * a[5] + phi[2] * phi[2]),
        b=(keep * s.b[0] + phi[0] * y, keep * s.b[1] + phi[1] * y, keep * s.b[2] + phi[2] * y),
        yy=keep * s.yy + y * y,
        weight=keep * s.weight + 1.0,
    )


def _fits(sums: tuple[_Sums, ...], interval: float, steps: int,
          first_guess_c: float) -> tuple[ThermalFit, ...]:
    """The best fit first, then every other τ whose residual is within PLAUSIBLE_SSE of it."""
    scored: list[tuple[float, ThermalFit]] = []
    for s, tau in zip(sums, TAU_GRID_SAMPLES, strict=True):
        theta = _solve(s, first_guess_c)
        if theta is None:
            continue
        sse = max(_sse(s, theta), 0.0)
        rms = math.sqrt(sse / max(s.weight, 1.0))
        scored.append((sse, ThermalFit(ambient_c=theta[0], r_slow_c=theta[1],
                                       r_fast_c=theta[2], tau_s=tau * interval, rms_c=rms,
                                       samples=steps)))
    if not scored:
        return ()
    scored.sort(key=lambda item: item[0])
    bound = scored[0][0] * PLAUSIBLE_SSE
    return tuple(fit for sse, fit in scored if sse <= bound)


def _solve(s: _Sums, ambient_guess: float) -> tuple[float, float, float] | None:
    a00, a01, a02, a11, a12, a22 = s.a
    # Ridge toward (ambient_guess, 0, 0), scaled to each column's own energy.
    r0, r1, r2 = (_RIDGE * a00 + _EPS, _RIDGE * a11 + _EPS, _RIDGE * a22 + _EPS)
    m = ((a00 + r0, a01, a02), (a01, a11 + r1, a12), (a02, a12, a22 + r2))
    rhs = (s.b[0] + r0 * ambient_guess, s.b[1], s.b[2])
    det = _det(m)
    if abs(det) < 1e-300:
        return None
    out = []
    for col in range(3):
        swapped = tuple(
            tuple(rhs[row] if c == col else m[row][c] for c in range(3)) for row in range(3)
        )
        out.append(_det(swapped) / det)
    return (out[0], out[1], out[2])


def _det(m: tuple[tuple[float, ...], ...]) -> float:
    return (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))


def _sse(s: _Sums, theta: tuple[float, float, float]) -> float:
    a00, a01, a02, a11, a12, a22 = s.a
    t0, t1, t2 = theta
    quad = (a00 * t0 * t0 + a11 * t1 * t1 + a22 * t2 * t2
            + 2.0 * (a01 * t0 * t1 + a02 * t0 * t2 + a12 * t1 * t2))
    return s.yy - 2.0 * (theta[0] * s.b[0] + theta[1] * s.b[1] + theta[2] * s.b[2]) + quad
