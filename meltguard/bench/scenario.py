"""What the benchmark offers the daemon, and the capacity it measures against.

All times here are model seconds: the seconds of the simulated GPU, whose thermal time
constant is 40 s. The live benchmark compresses them by `speed` on the wall clock; the offline
simulator runs them as virtual time. Either way a figure reads like one from a real card.

Request log (`meltguard simulate --requests FILE`, and what `meltguard bench` records):
JSON Lines, one request per line,

    {"t": 12.5, "tier": "pro", "tenant": "pro-003", "size": "512x512", "steps": 30, "n": 1}

`t` is the arrival in seconds from the start (non-decreasing), `tier` must be a tier of the
policy, `tenant` is any name (quotas and fairness are per tenant); `size`, `steps` and `n` are
optional and default to the policy's defaults and 1. Blank lines and `#` comments are skipped.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from meltguard.admission.policy import parse_duration
from meltguard.clock import FakeClock
from meltguard.daemon.strategies import BaselineOptions
from meltguard.daemon.telemetry.simulated import SimGpuParams, sustainable_duty_cycle
from meltguard.inference.sim import SimEngine, SimEngineParams
from meltguard.values import GenerationJob, Size

KEY_PREFIX = "mg-bench-"


@dataclass(frozen=True, slots=True)
class TierLoad:
    """One tier's part of the offered load."""

    tier: str
    share: float  # fraction of requests
    tenants: int  # requests are spread uniformly over this many tenants
    deadline_s: float  # the client's patience: an image later than this is not a good one


@dataclass(frozen=True, slots=True)
class RequestShape:
    size: Size = field(default_factory=lambda: Size(512, 512))
    steps: int = 30
    n: int = 1


DEFAULT_TIERS = (
    TierLoad("free", 0.70, 40, 30.0),
    TierLoad("plus", 0.20, 16, 60.0),
    TierLoad("pro", 0.10, 8, 120.0),
)


@dataclass(frozen=True, slots=True)
class Scenario:
    tiers: tuple[TierLoad, ...] = DEFAULT_TIERS
    shape: RequestShape = field(default_factory=RequestShape)
    engine: SimEngineParams = field(default_factory=SimEngineParams)
    gpu: SimGpuParams = field(default_factory=SimGpuParams)
    warmup_s: float = 60.0  # offered but not measured: lets every strategy reach its regime
    duration_s: float = 360.0  # the measured window after warm-up
    seed: int = 20_260_101

    def __post_init__(self) -> None:
        total = sum(t.share for t in self.tiers)
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"tier shares must add up to 1, got {total}")
        if self.duration_s <= 0 or self.warmup_s < 0:
            raise ValueError("duration_s must be > 0 and warmup_s >= 0")

    @property
    def end_s(self) -> float:
        """When arrivals stop."""
        return self.warmup_s + self.duration_s

    @property
    def grace_s(self) -> float:
        """How long after the last arrival answers are still waited for: past the longest
        deadline, nothing that arrives can still be a good image."""
        return max(t.deadline_s for t in self.tiers)

    def deadline(self, tier: str) -> float:
        for load in self.tiers:
            if load.tier == tier:
                return load.deadline_s
        return max(t.deadline_s for t in self.tiers)

    def job(self) -> GenerationJob:
        shape = self.shape
        return GenerationJob(prompt="bench", size=shape.size, steps=shape.steps, n=shape.n, seed=0)


@dataclass(frozen=True, slots=True)
class Capacity:
    """What the simulated card can sustain for the scenario's requests."""

    service_s: float  # model seconds one request takes alone at full clocks
    images_per_request: int
    duty: float  # busy fraction whose steady-state temperature is exactly the slowdown one
    steady_c_at_full_duty: float
    slowdown_c: float

    @property
    def nominal_rps(self) -> float:
        """Requests per second at full clocks, busy all the time: the spec-sheet figure."""
        return 1.0 / self.service_s

    @property
    def sustainable_rps(self) -> float:
        """Requests per second that keep the card at or below its slowdown temperature."""
        return self.duty / self.service_s

    @property
    def sustainable_ips(self) -> float:
        return self.sustainable_rps * self.images_per_request

    def describe(self) -> str:
        return (
            f"sustainable capacity: {self.sustainable_ips:.4f} images/s "
            f"({self.sustainable_rps * 60:.2f} requests/min) = duty {self.duty:.3f} / "
            f"service {self.service_s:.3f} s per request at full clocks; nominal (always busy) "
            f"{self.nominal_rps:.4f} requests/s would settle at "
            f"{self.steady_c_at_full_duty:.1f} °C, past the {self.slowdown_c:g} °C slowdown"
        )


def capacity(scenario: Scenario) -> Capacity:
    """From the simulator's own parameters: its service time for the request shape, and the
    duty cycle whose steady state sits at the slowdown temperature."""
    engine = SimEngine(clock=FakeClock(), params=scenario.engine, max_batch=1)
    gpu = scenario.gpu
    full = gpu.ambient_c + gpu.r_c_per_w * gpu.max_w
    return Capacity(
        service_s=engine.service_time(scenario.job()),
        images_per_request=scenario.shape.n,
        duty=sustainable_duty_cycle(gpu),
        steady_c_at_full_duty=full,
        slowdown_c=gpu.slowdown_c,
    )


@dataclass(frozen=True, slots=True)
class Arrival:
    t: float  # model seconds from the start of the run
    tier: str
    tenant: str
    size: Size | None = None
    steps: int | None = None
    n: int = 1

    def body(self, index: int) -> dict[str, Any]:
        """The OpenAI Images request for it."""
        body: dict[str, Any] = {"prompt": f"benchmark image {index}", "n": self.n}
        if self.size is not None:
            body["size"] = str(self.size)
        if self.steps is not None:
            body["steps"] = self.steps
        return body


def tenant_name(tier: str, index: int) -> str:
    return f"{tier}-{index:03d}"


def tenant_key(tenant: str) -> str:
    """The bench policy's API key of a bench tenant (only its SHA-256 is in the file)."""
    return KEY_PREFIX + tenant


def arrivals(scenario: Scenario, load: float, cap: Capacity) -> tuple[Arrival, ...]:
    """Open-loop Poisson arrivals at `load` x the sustainable request rate, until end_s.

    Seeded by the scenario and the load only, so every strategy at one point faces the very
    same requests (common random numbers: differences are the strategy's, not the dice's)."""
    rate = load * cap.sustainable_rps
    if rate <= 0:
        return ()
    rng = random.Random(f"{scenario.seed}:{float(load)!r}")
    shape = scenario.shape
    out: list[Arrival] = []
    t = rng.expovariate(rate)
    while t < scenario.end_s:
        pick = rng.random()
        chosen = scenario.tiers[-1]
        for tier in scenario.tiers:
            if pick < tier.share:
                chosen = tier
                break
            pick -= tier.share
        tenant = tenant_name(chosen.tier, rng.randrange(chosen.tenants))
        out.append(Arrival(t, chosen.tier, tenant, shape.size, shape.steps, shape.n))
        t += rng.expovariate(rate)
    return tuple(out)


# A token bucket usually allows a burst of a few seconds of its rate; ten seconds of the
# card's nominal rate is about six requests here.
BUCKET_BURST_S = 10.0


def baseline_options(cap: Capacity, speed: float = 1.0) -> BaselineOptions:
    """The baselines as the benchmark configures them, in the daemon clock's seconds: the token
    bucket at the card's nominal request rate (full clocks, always busy: the spec-sheet figure
    an operator without a thermal model would use); the concurrency cap at the policy's
    concurrency limit (its default)."""
    return BaselineOptions(bucket_rate=cap.nominal_rps * speed,
                           bucket_burst=max(1.0, cap.nominal_rps * BUCKET_BURST_S))


# ---- request logs -----------------------------------------------------------------------


class RequestLogError(ValueError):
    """A request log that cannot be read; the message is `FILE:LINE: what is wrong`."""


def parse_requests(text: str, origin: str = "<requests>") -> tuple[Arrival, ...]:
    out: list[Arrival] = []
    last = -math.inf
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{origin}:{number}"
        try:
            obj = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise RequestLogError(f"{where}: not JSON: {exc.msg}") from None
        if not isinstance(obj, dict):
            raise RequestLogError(f"{where}: each line must be a JSON object")
        out.append(_arrival(obj, where))
        if out[-1].t < last:
            raise RequestLogError(f"{where}: t goes backwards")
        last = out[-1].t
    return tuple(out)


def _arrival(obj: Mapping[str, Any], where: str) -> Arrival:
    unknown = sorted(set(obj) - {"t", "tier", "tenant", "size", "steps", "n"})
    if unknown:
        raise RequestLogError(f"{where}: {unknown[0]}: unknown field")
    t = obj.get("t")
    if not isinstance(t, int | float) or isinstance(t, bool) or t < 0:
        raise RequestLogError(f"{where}: t: seconds from the start (a number >= 0) is required")
    tier, tenant = obj.get("tier"), obj.get("tenant")
    if not isinstance(tier, str) or not tier:
        raise RequestLogError(f"{where}: tier: a tier name is required")
    if tenant is None:
        tenant = f"{tier}-000"
    if not isinstance(tenant, str) or not tenant:
        raise RequestLogError(f"{where}: tenant: must be a non-empty string")
    size: Size | None = None
    if obj.get("size") is not None:
        try:
            size = Size.parse(obj["size"])
        except ValueError as exc:
            raise RequestLogError(f"{where}: size: {exc}") from None
    steps, n = obj.get("steps"), obj.get("n", 1)
    for name, value in (("steps", steps), ("n", n)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 1):
            raise RequestLogError(f"{where}: {name}: must be an integer >= 1")
    return Arrival(float(t), tier, tenant, size, steps, n)


def load_requests(path: str | Path) -> tuple[Arrival, ...]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RequestLogError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_requests(text, str(path))


def format_requests(items: Iterable[Arrival]) -> str:
    lines = []
    for a in items:
        obj: dict[str, Any] = {"t": round(a.t, 6), "tier": a.tier, "tenant": a.tenant}
        if a.size is not None:
            obj["size"] = str(a.size)
        if a.steps is not None:
            obj["steps"] = a.steps
        obj["n"] = a.n
        lines.append(json.dumps(obj, separators=(",", ":")))
    return "".join(line + "\n" for line in lines)


# ---- time compression of a policy -----------------------------------------------------------

# Every duration a policy holds; the benchmark policy is written in model seconds, and a daemon
# whose simulated GPU runs `speed` times faster than the wall clock needs them that much shorter.
_TIER_DURATIONS = ("max_queue_wait",)
_PRESSURE_DURATIONS = ("sample_interval", "stale_after", "lookahead")


def compress_policy(text: str, speed: float) -> str:
    """The policy with every duration divided by `speed` (quota periods included), as YAML.

    Raises ValueError when the text is not a mapping; the result still goes through the
    daemon's strict loader, which reports anything else."""
    data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError("a policy is a mapping")

    def scale(holder: Any, key: str) -> None:
        if isinstance(holder, dict) and holder.get(key) is not None:
            holder[key] = parse_duration(holder[key]) / speed

    for tier in (data.get("tiers") or {}).values():
        for key in _TIER_DURATIONS:
            scale(tier, key)
        for quota in (tier or {}).get("quotas") or ():
            scale(quota, "per")
    pressure = data.get("pressure") or {}
    for key in _PRESSURE_DURATIONS:
        scale(pressure, key)
    for level in (pressure.get("levels") or {}).values():
        scale(level, "min_dwell")
    for per_tier in (data.get("actions") or {}).values():
        for action in (per_tier or {}).values():
            for key in _TIER_DURATIONS:
                scale(action, key)
    header = f"# Generated: the benchmark policy with every duration divided by {speed:g}.\n"
    return header + yaml.safe_dump(data, sort_keys=False)
