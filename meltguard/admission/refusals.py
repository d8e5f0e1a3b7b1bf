"""The words of each refusal the gate answers, and the Retry-After it computes for it."""

from __future__ import annotations

import math
import time

from meltguard.admission.policy import EffectiveTier, Level, Policy
from meltguard.errors import ErrorCode, Refused, clamp_retry
from meltguard.values import QuotaOutcome, WindowState

DAY = 86_400.0


def shed(tier: str, level: Level, retry_after: float) -> Refused:
    return Refused(
        ErrorCode.SERVER_OVERLOADED,
        f"The server is overloaded (GPU pressure: {level.label}) and is not taking "
        f"{tier}-tier requests right now.",
        clamp_retry(retry_after),
    )


def shed_while_queued(tier: str, level: Level, retry_after: float) -> Refused:
    return Refused(
        ErrorCode.SERVER_OVERLOADED,
        f"The server is overloaded (GPU pressure: {level.label}) and stopped taking "
        f"{tier}-tier requests while this one waited in the queue; nothing was charged.",
        clamp_retry(retry_after),
    )


def queue_too_long(tier: str, estimate: float, budget: float) -> Refused:
    return Refused(
        ErrorCode.SERVER_OVERLOADED,
        f"The server is overloaded: the estimated queue wait ({estimate:.0f} s) is longer "
        f"than the {budget:g} s a {tier}-tier request may wait.",
        clamp_retry(estimate - budget),
    )


def queue_timeout(tier: str, budget: float, retry_after: float) -> Refused:
    return Refused(
        ErrorCode.QUEUE_TIMEOUT,
        f"No GPU slot came free within the {budget:g} s a {tier}-tier request may wait in "
        "the queue.",
        clamp_retry(retry_after),
    )


def store_unavailable(jitter: float) -> Refused:
    # Jittered (jitter in [0, 1)) so that clients refused together do not come back together.
    return Refused(
        ErrorCode.QUOTA_STORE_UNAVAILABLE,
        "The quota store is unavailable, so this request cannot be counted; try again "
        "shortly.",
        clamp_retry(1.0 + jitter),
    )


def over_quota(quota: QuotaOutcome, now: float, eff: EffectiveTier, level: Level, cost: float,
               policy: Policy) -> Refused:
    """`rate_limit_exceeded`, or `daily_quota_exceeded` for a window of a day or longer,
    naming the window that resets last among those the cost does not fit: naming an earlier
    one would only send the client back to be refused again."""
    state = _binding(quota, cost)
    window = state.window
    scaled = "" if eff.quota_factor == 1.0 else (
        f" (reduced to {eff.quota_factor:g}x while the GPU is under {level.label} pressure)")
    reference = policy.cost.reference
    what = (
        f"{_amount(window.limit)} reference images per {_period(window.period)} for tier "
        f"{eff.name}{scaled}; {_amount(state.used)} used, this request costs {_amount(cost)} "
        f"(a {reference.size} image at {reference.steps} steps counts as 1)"
    )
    if cost > window.limit:
        what += ("; this request alone is more than the window allows, so ask for fewer or "
                 "smaller images or fewer steps")
    wait = state.reset_at - now
    if window.period >= DAY:
        return Refused(
            ErrorCode.DAILY_QUOTA_EXCEEDED,
            f"Quota exceeded: {what}. It resets at {_utc_minute(state.reset_at)}.",
            clamp_retry(wait), quota=quota,
        )
    return Refused(
        ErrorCode.RATE_LIMIT_EXCEEDED,
        f"Rate limit reached: {what}. Try again in {math.ceil(max(wait, 1.0))} s.",
        clamp_retry(wait), quota=quota,
    )


def _binding(quota: QuotaOutcome, cost: float) -> WindowState:
    late = [s for s in quota.windows if s.used + cost > s.window.limit + 1e-9]
    if late:
        return max(late, key=lambda s: s.reset_at)
    if quota.exhausted is not None:
        return quota.exhausted
    return min(quota.windows, key=lambda s: s.remaining)


def _amount(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _utc_minute(unix: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(unix))


def _period(seconds: float) -> str:
    for name, size in (("day", DAY), ("hour", 3600.0), ("minute", 60.0)):
        count = seconds / size
        if count >= 1 and count.is_integer():
            return name if count == 1 else f"{int(count)} {name}s"
    return f"{seconds:g} s"
