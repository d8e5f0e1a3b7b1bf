"""OpenAI's x-ratelimit-* and the IETF RateLimit-Policy / RateLimit fields from a quota outcome."""

from __future__ import annotations

import math

from meltguard.values import QuotaOutcome, WindowState

_NAMES = {86400.0: "day", 3600.0: "hour", 60.0: "minute", 1.0: "second"}


def window_name(period: float) -> str:
    if period in _NAMES:
        return _NAMES[period]
    return f"{period:g}s"


def openai_duration(seconds: float) -> str:
    """OpenAI's reset format: "1s", "6m0s", "1h2m3s", "20ms"."""
    if seconds < 1:
        return f"{max(int(seconds * 1000), 0)}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def _tightest(windows: tuple[WindowState, ...]) -> WindowState:
    """The window with the least left, the sooner-resetting one on a tie."""
    return min(windows, key=lambda state: (state.remaining, state.reset_at))


def ratelimit_headers(outcome: QuotaOutcome, now: float) -> dict[str, str]:
    """Headers for every authenticated response; nothing when the tier has no quota. They
    name the window that refused, else the tightest one."""
    windows = outcome.windows
    if not windows:
        return {}
    tight = outcome.exhausted or _tightest(windows)
    window = tight.window
    reset = max(tight.reset_at - now, 0.0)
    remaining = str(math.floor(tight.remaining + 1e-9))
    return {
        "x-ratelimit-limit-requests": str(math.floor(window.limit)),
        "x-ratelimit-remaining-requests": remaining,
        "x-ratelimit-reset-requests": openai_duration(reset),
        "RateLimit-Policy": ", ".join(
            f'"{window_name(s.window.period)}";q={math.floor(s.window.limit)};'
            f"w={int(s.window.period)}" for s in windows),
        "RateLimit": f'"{window_name(window.period)}";r={remaining};t={math.ceil(reset)}',
    }
