"""The ops policy as a strict, frozen model, and the per-level view of it the gate decides with.

Parsing a file (YAML, line numbers) is the daemon's job; this module takes plain data and
returns every problem at once as `PolicyIssue`s whose paths the loader maps back to lines.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from meltguard.values import THROTTLE_REASONS, Size


class Level(IntEnum):
    NORMAL = 0
    ELEVATED = 1
    HIGH = 2
    CRITICAL = 3

    @property
    def label(self) -> str:
        # Read on every decision; Enum.name goes through a descriptor each time.
        return _LEVEL_LABELS[self]

    @classmethod
    def named(cls, name: str) -> Level:
        return cls[name.upper()]


_LEVEL_LABELS = tuple(level.name.lower() for level in Level)
LEVEL_NAMES = ("elevated", "high", "critical")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ms|s|m|h|d)$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TENANT = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")


def parse_duration(value: object) -> float:
    """"500ms", "10s", "1m", "2h", "1d" (or a bare number of seconds) -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 10s, got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value!r}")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value.strip())
        if match:
            return float(match.group(1)) * _UNITS[match.group(2)]
    raise ValueError(f"expected a duration like 500ms, 10s, 1m, 2h or 1d, got {value!r}")


def _parse_size(value: object) -> Size:
    if isinstance(value, Size):
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size like 512x512, got {value!r}")
    size = Size.parse(value)
    if size.width % 8 or size.height % 8:
        raise ValueError(f"width and height must be multiples of 8, got {value!r}")
    return size


def _parse_hex(value: object) -> str:
    if not isinstance(value, str) or not _HEX64.match(value.strip().lower()):
        raise ValueError("expected 64 hex digits (meltguard policy hash-key KEY prints them)")
    return value.strip().lower()


def _parse_tenant(value: object) -> str:
    if not isinstance(value, str) or not _TENANT.match(value):
        raise ValueError("a tenant is 1-64 characters of letters, digits and _ . @ -")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0.0)]
SizeField = Annotated[Size, BeforeValidator(_parse_size)]
Sha256 = Annotated[str, BeforeValidator(_parse_hex)]
Tenant = Annotated[str, BeforeValidator(_parse_tenant)]
Ratio = Annotated[float, Field(ge=0.0, le=1.0)]
Factor = Annotated[float, Field(gt=0.0, le=1.0)]
ThrottleName = Literal[
    "gpu_idle", "applications_clocks_setting", "sw_power_cap", "hw_slowdown", "sync_boost",
    "sw_thermal", "hw_thermal", "hw_power_brake", "display_clock_setting",
]
LevelName = Literal["normal", "elevated", "high", "critical"]
assert set(ThrottleName.__args__) == set(THROTTLE_REASONS)  # type: ignore[attr-defined]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class Quota(_Strict):
    limit: Annotated[int, Field(gt=0, strict=True)]
    per: PositiveDuration


class Tier(_Strict):
    priority: Annotated[int, Field(strict=True)]
    quotas: tuple[Quota, ...] = ()
    max_concurrent: Annotated[int, Field(gt=0)] = 1
    max_queue_wait: Duration = 30.0
    # Share of the admitted GPU work reserved for this tier while it asks for at least that.
    min_share: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0


class ApiKey(_Strict):
    key_sha256: Sha256
    tenant: Tenant
    tier: str


class Reference(_Strict):
    size: SizeField = Size(512, 512)
    steps: Annotated[int, Field(gt=0)] = 30


class Cost(_Strict):
    reference: Reference = Reference()


class Limits(_Strict):
    max_n: Annotated[int, Field(ge=1, le=16)] = 4
    max_size: SizeField = Size(1024, 1024)
    max_steps: Annotated[int, Field(ge=1, le=500)] = 50
    max_prompt_chars: Annotated[int, Field(ge=1)] = 4000
    default_size: SizeField = Size(512, 512)
    default_steps: Annotated[int, Field(ge=1)] = 20
    # Largest file /v1/images/edits accepts per uploaded image or mask (OpenAI's 4 MB).
    max_upload_bytes: Annotated[int, Field(ge=1024, le=1 << 30)] = 4 << 20


class ExitSignals(_Strict):
    temperature_c: float | None = None
    below_slowdown_c: float | None = None
    memory_ratio: Ratio | None = None
    utilization: Ratio | None = None
    power_ratio: Annotated[float, Field(ge=0.0, le=2.0)] | None = None


class EnterSignals(ExitSignals):
    throttle: tuple[ThrottleName, ...] = ()
    gpu_lost: bool = False


# Signals where a higher reading means more pressure; below_slowdown_c is the reverse.
RISING_SIGNALS = ("temperature_c", "memory_ratio", "utilization", "power_ratio")


class PressureLevel(_Strict):
    enter: EnterSignals
    exit: ExitSignals = ExitSignals()
    min_dwell: Duration = 0.0


class Hold(_Strict):
    """Where admission holds a card: the busy share is paced so that the card's predicted
    settling temperature sits at this line (the lower one when both are set)."""

    below_slowdown_c: Annotated[float, Field(gt=0.0)] | None = None
    temperature_c: Annotated[float, Field(gt=0.0)] | None = None


class Pressure(_Strict):
    sample_interval: PositiveDuration = 0.5
    stale_after: PositiveDuration = 5.0
    on_stale: LevelName = "high"
    lookahead: Duration | None = None
    hold: Hold | None = None
    levels: dict[str, PressureLevel] = {}


class TierAction(_Strict):
    reject: bool = False
    quota_factor: Factor | None = None
    concurrency_factor: Factor | None = None
    max_queue_wait: Duration | None = None
    max_steps: Annotated[int, Field(ge=1)] | None = None
    max_size: SizeField | None = None
    max_n: Annotated[int, Field(ge=1)] | None = None


_NO_ACTION = TierAction()


class Concurrency(_Strict):
    limit: Annotated[int, Field(ge=1)] = 2
    min_limit: Annotated[int, Field(ge=1)] = 1


class Policy(_Strict):
    version: Literal[1]
    mode: Literal["enforce", "shadow"] = "enforce"
    overload_status: Literal[503, 429] = 503
    anonymous_tier: str | None = None
    on_store_error: Literal["open", "closed"] = "open"
    admin_key_sha256: Sha256 | None = None
    tiers: Annotated[dict[str, Tier], Field(min_length=1)]
    api_keys: tuple[ApiKey, ...] = ()
    cost: Cost = Cost()
    limits: Limits = Limits()
    concurrency: Concurrency = Concurrency()
    pressure: Pressure = Pressure()
    actions: dict[str, dict[str, TierAction]] = {}
    # Per level, the GPU power limit as a ratio of the card's default limit (issue 19).
    power: dict[str, Factor] = {}

    def power_ratio(self, level: Level) -> float | None:
        """The power-limit ratio at `level`, or None for the card's default limit. A level the
        section leaves out keeps the ratio of the nearest level below it, so a hotter card is
        never given more power than a cooler one."""
        ratio: float | None = None
        for name in LEVEL_NAMES[: int(level)]:
            ratio = self.power.get(name, ratio)
        return ratio

    def level_config(self, level: Level) -> PressureLevel | None:
        return self.pressure.levels.get(level.label)

    def tiers_by_priority(self) -> tuple[str, ...]:
        """Highest priority first."""
        return tuple(sorted(self.tiers, key=lambda name: -self.tiers[name].priority))

    def effective(self, tier: str, level: Level) -> EffectiveTier:
        """What a tier may do at a level: its action there, falling back to normal per field."""
        base = self.tiers[tier]
        action = self.actions.get(level.label, {}).get(tier, _NO_ACTION)
        return EffectiveTier(
            name=tier,
            priority=base.priority,
            reject=action.reject,
            quota_factor=action.quota_factor if action.quota_factor is not None else 1.0,
            concurrency_factor=(
                action.concurrency_factor if action.concurrency_factor is not None else 1.0
            ),
            max_queue_wait=(
                action.max_queue_wait if action.max_queue_wait is not None else base.max_queue_wait
            ),
            max_concurrent=base.max_concurrent,
            max_steps=min(action.max_steps or self.limits.max_steps, self.limits.max_steps),
            max_size=action.max_size or self.limits.max_size,
            max_n=min(action.max_n or self.limits.max_n, self.limits.max_n),
            quotas=base.quotas,
        )


@dataclass(frozen=True, slots=True)
class EffectiveTier:
    name: str
    priority: int
    reject: bool
    quota_factor: float
    concurrency_factor: float
    max_queue_wait: float
    max_concurrent: int
    max_steps: int
    max_size: Size
    max_n: int
    quotas: tuple[Quota, ...]


Path = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    path: Path
    message: str

    def dotted(self) -> str:
        out = ""
        for part in self.path:
            out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
        return out or "(top level)"


class PolicyError(ValueError):
    def __init__(self, issues: tuple[PolicyIssue, ...]) -> None:
        super().__init__("; ".join(f"{i.dotted()}: {i.message}" for i in issues))
        self.issues = issues


def parse_policy(data: object) -> Policy:
    """Validate plain data into a Policy or raise PolicyError listing every problem."""
    if not isinstance(data, Mapping):
        raise PolicyError((PolicyIssue((), "a policy is a mapping with version, tiers, ..."),))
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(
            tuple(_issue_from_pydantic(err, data) for err in exc.errors())
        ) from None
    issues = semantic_issues(policy)
    if issues:
        raise PolicyError(tuple(issues))
    return policy


def _issue_from_pydantic(err: Any, data: object) -> PolicyIssue:
    kind = err["type"]
    path = _data_path(err["loc"], data)
    message = str(err["msg"])
    if kind == "extra_forbidden":
        message = "unknown key"
    elif kind == "missing":
        message = "required key is missing"
    elif message.startswith("Value error, "):
        message = message.removeprefix("Value error, ")
    elif kind == "literal_error":
        message = f"{message} (got {err.get('input')!r})"
    return PolicyIssue(path, message)


def _data_path(loc: tuple[Any, ...], data: object) -> Path:
    """pydantic's loc with its validator and union-member names removed: keep only the parts
    that are keys or indexes in the data being validated (a tier may be called `int`)."""
    path: list[str | int] = []
    node = data
    for part in loc:
        in_list = isinstance(node, list | tuple) and isinstance(part, int) and 0 <= part < len(node)
        if (isinstance(node, Mapping) and part in node) or in_list:
            node = node[part]  # type: ignore[index]
        elif _names_a_missing_key(node, part):
            pass  # the key itself is missing or unknown: it still names the place
        else:
            continue
        path.append(part)
    return tuple(path)


def _names_a_missing_key(node: object, part: object) -> bool:
    return isinstance(node, Mapping) and isinstance(part, str) and part not in node and not (
        "[" in part or part.startswith(("constrained-", "function-"))
    )


def semantic_issues(policy: Policy) -> list[PolicyIssue]:
    """Rules that span fields: references between sections, orderings, uniqueness."""
    issues: list[PolicyIssue] = []
    tiers = set(policy.tiers)
    known = ", ".join(sorted(tiers))

    seen_priorities: dict[int, str] = {}
    for name, tier in policy.tiers.items():
        if tier.priority in seen_priorities:
            issues.append(PolicyIssue(("tiers", name, "priority"),
                f"priority {tier.priority} is already used by tier "
                f"{seen_priorities[tier.priority]!r}; priorities must be unique"))
        seen_priorities.setdefault(tier.priority, name)

    if policy.anonymous_tier is not None and policy.anonymous_tier not in tiers:
        issues.append(PolicyIssue(("anonymous_tier",),
            f"unknown tier {policy.anonymous_tier!r} (tiers: {known})"))

    seen_hashes: dict[str, int] = {}
    for index, key in enumerate(policy.api_keys):
        if key.tier not in tiers:
            issues.append(PolicyIssue(("api_keys", index, "tier"),
                f"unknown tier {key.tier!r} (tiers: {known})"))
        if key.key_sha256 in seen_hashes:
            issues.append(PolicyIssue(("api_keys", index, "key_sha256"),
                f"duplicate key hash: api_keys[{seen_hashes[key.key_sha256]}] has the same one"))
        seen_hashes.setdefault(key.key_sha256, index)

    limits = policy.limits
    if not limits.default_size.fits_in(limits.max_size):
        issues.append(PolicyIssue(("limits", "default_size"),
            f"default_size {limits.default_size} does not fit in max_size {limits.max_size}"))
    if limits.default_steps > limits.max_steps:
        issues.append(PolicyIssue(("limits", "default_steps"),
            f"default_steps {limits.default_steps} is above max_steps {limits.max_steps}"))
    if policy.pressure.stale_after <= policy.pressure.sample_interval:
        issues.append(PolicyIssue(("pressure", "stale_after"),
            "stale_after must be longer than sample_interval, or every sample would be stale"))

    reserved = sum(tier.min_share for tier in policy.tiers.values())
    if reserved >= 1.0:
        for name, tier in policy.tiers.items():
            if tier.min_share:
                issues.append(PolicyIssue(("tiers", name, "min_share"),
                    f"the tiers' min_share add up to {reserved:g}; they must leave room "
                    "below 1 for priority to order"))
                break
    hold = policy.pressure.hold
    if hold is not None and hold.below_slowdown_c is None and hold.temperature_c is None:
        issues.append(PolicyIssue(("pressure", "hold"),
            "hold needs below_slowdown_c or temperature_c"))

    if policy.concurrency.min_limit > policy.concurrency.limit:
        issues.append(PolicyIssue(("concurrency", "min_limit"),
            f"min_limit {policy.concurrency.min_limit} is above limit {policy.concurrency.limit}"))

    issues.extend(_level_issues(policy.pressure))

    for level, per_tier in policy.actions.items():
        if level not in LEVEL_NAMES:
            issues.append(PolicyIssue(("actions", level),
                f"unknown level {level!r} (levels: {', '.join(LEVEL_NAMES)})"))
        for tier_name in per_tier:
            if tier_name not in tiers:
                issues.append(PolicyIssue(("actions", level, tier_name),
                    f"unknown tier {tier_name!r} (tiers: {known})"))
    issues.extend(_power_issues(policy.power))
    return issues


def _power_issues(power: Mapping[str, float]) -> list[PolicyIssue]:
    issues: list[PolicyIssue] = []
    for name in power:
        if name not in LEVEL_NAMES:
            issues.append(PolicyIssue(("power", name),
                f"unknown level {name!r} (levels: {', '.join(LEVEL_NAMES)}; normal always "
                "restores the card's default limit)"))
    ladder = [name for name in LEVEL_NAMES if name in power]
    for lower, upper in itertools.pairwise(ladder):
        if power[upper] > power[lower]:
            issues.append(PolicyIssue(("power", upper),
                f"{upper} allows {power[upper]:g} of the default limit, more than {lower}'s "
                f"{power[lower]:g}; a hotter level must not raise the limit"))
    return issues


def _level_issues(pressure: Pressure) -> list[PolicyIssue]:
    issues: list[PolicyIssue] = []
    names = list(pressure.levels)
    for name in names:
        if name not in LEVEL_NAMES:
            issues.append(PolicyIssue(("pressure", "levels", name),
                f"unknown level {name!r} (levels: {', '.join(LEVEL_NAMES)})"))
    ordered = [n for n in names if n in LEVEL_NAMES]
    if ordered != sorted(ordered, key=LEVEL_NAMES.index):
        issues.append(PolicyIssue(("pressure", "levels"),
            f"levels out of order: write them as {', '.join(LEVEL_NAMES)}"))

    for name in ordered:
        level = pressure.levels[name]
        where = ("pressure", "levels", name, "exit")
        for signal in (*RISING_SIGNALS, "below_slowdown_c"):
            enter = getattr(level.enter, signal)
            leave = getattr(level.exit, signal)
            if leave is None:
                continue
            if enter is None:
                issues.append(PolicyIssue((*where, signal),
                    f"exit threshold without an enter threshold for {signal}"))
            elif signal == "below_slowdown_c" and leave <= enter:
                issues.append(PolicyIssue((*where, signal),
                    f"exit must leave more headroom than enter ({leave} <= {enter})"))
            elif signal != "below_slowdown_c" and leave >= enter:
                issues.append(PolicyIssue((*where, signal),
                    f"exit threshold {leave} must sit below the enter threshold {enter}"))

    # Thresholds must tighten with the level, else a lower level could never be reached.
    ladder = sorted(ordered, key=LEVEL_NAMES.index)
    for lower, upper in itertools.pairwise(ladder):
        for signal in (*RISING_SIGNALS, "below_slowdown_c"):
            low = getattr(pressure.levels[lower].enter, signal)
            high = getattr(pressure.levels[upper].enter, signal)
            if low is None or high is None:
                continue
            inverted = high > low if signal == "below_slowdown_c" else high < low
            if inverted:
                issues.append(PolicyIssue(("pressure", "levels", upper, "enter", signal),
                    f"levels out of order: {upper} enters at {high}, which is less severe than "
                    f"{lower}'s {low}"))
    return issues
