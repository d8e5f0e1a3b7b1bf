"""OpenAI's x-ratelimit-* and the IETF RateLimit-Policy / RateLimit fields from a quota outcome."""

from __future__ import annotations

import math
from collections.abc import Mapping

from meltguard.values import QuotaOutcome, QuotaWindow, WindowState

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
    best = windows[0]
    # WindowState.remaining, inlined: this runs for every authenticated answer.
    best_left = max(best.window.limit - best.used, 0.0)
    for state in windows[1:]:
        left = max(state.window.limit - state.used, 0.0)
        if left < best_left or (left == best_left and state.reset_at < best.reset_at):
            best, best_left = state, left
    return best


# RateLimit-Policy depends only on the windows' limits and periods, which stay the same for a
# tenant until the policy or the pressure level changes: format it once per set of windows.
_POLICY_FIELDS: dict[tuple[QuotaWindow, ...], str] = {}
_POLICY_FIELDS_MAX = 1024


def _policy_field(windows: tuple[WindowState, ...]) -> str:
    key = tuple(state.window for state in windows)
    text = _POLICY_FIELDS.get(key)
    if text is None:
        if len(_POLICY_FIELDS) >= _POLICY_FIELDS_MAX:
            _POLICY_FIELDS.clear()
        text = _POLICY_FIELDS[key] = ", ".join(
            f'"{window_name(w.period)}";q={math.floor(w.limit)};w={int(w.period)}' for w in key
        )
    return text


class _Memo:
    """The last headers answered, for the outcome they were built from. Within one whole
    second of the reset countdown, a repeated outcome (a tenant refused again and again: see
    the gate's refusal memory) gets the same headers, and another outcome over the same
    windows (a tenant admitted again and again) differs only in what remains."""

    __slots__ = ("headers", "named", "outcome", "reset_s", "state", "tight")

    def __init__(self) -> None:
        self.outcome: QuotaOutcome | None = None
        self.state = WindowState(QuotaWindow("", 0.0, 1.0), 0.0, 0.0)  # the outcome's tightest
        self.tight: QuotaWindow | None = None
        self.reset_s = -1
        self.named = ""  # the RateLimit field's window name, quoted
        self.headers: dict[str, str] = {}  # handed out as read-only, never changed after


_last = _Memo()


def ratelimit_headers(outcome: QuotaOutcome, now: float) -> Mapping[str, str]:
    """Headers for every authenticated response; nothing when the tier has no quota.

    Read-only (the type says so; a caller adding its own headers makes a dict of them first):
    a repeated outcome shares its headers with the last answer, and aiohttp copies them into
    each response anyway. A plain dict rather than a read-only view, which aiohttp would copy
    field by field instead of as a dict."""
    windows = outcome.windows
    if not windows:
        return {}
    last = _last
    if outcome is last.outcome:
        tight = last.state
    else:
        tight = outcome.exhausted or (windows[0] if len(windows) == 1 else _tightest(windows))
    window = tight.window
    reset = max(tight.reset_at - now, 0.0)
    reset_s = math.ceil(reset)
    # Below one second the reset is counted in milliseconds, a new value every call.
    same_second = reset >= 1 and reset_s == last.reset_s and window is last.tight
    if same_second and outcome is last.outcome:
        return last.headers
    # WindowState.remaining, written out: this runs for every authenticated answer.
    remaining = str(math.floor(max(window.limit - tight.used, 0.0) + 1e-9))
    previous = last.outcome
    if same_second and previous is not None and len(windows) == len(previous.windows):
        for one, other in zip(windows, previous.windows, strict=True):
            if one.window is not other.window:
                break
        else:
            headers = last.headers.copy()
            headers["x-ratelimit-remaining-requests"] = remaining
            headers["RateLimit"] = f"{last.named}{remaining};t={reset_s}"
            last.outcome, last.state, last.headers = outcome, tight, headers
            return headers
    named = f'"{window_name(window.period)}";r='
    headers = {
        "x-ratelimit-limit-requests": str(math.floor(window.limit)),
        "x-ratelimit-remaining-requests": remaining,
        "x-ratelimit-reset-requests": openai_duration(reset),
        "RateLimit-Policy": _policy_field(windows),
        "RateLimit": f"{named}{remaining};t={reset_s}",
    }
    last.outcome, last.state, last.tight, last.reset_s = outcome, tight, window, reset_s
    last.named, last.headers = named, headers
    return headers
