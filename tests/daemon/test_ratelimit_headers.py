"""The rate-limit headers of a quota outcome."""

from __future__ import annotations

from meltguard.daemon.ratelimit_headers import openai_duration, ratelimit_headers
from meltguard.values import QuotaOutcome, QuotaWindow, WindowState

DAY = QuotaWindow("{mg:t}:86400", 3.0, 86_400.0)
MINUTE = QuotaWindow("{mg:t}:60", 2.0, 60.0)


def outcome(day_used: float = 3.0, minute_used: float = 1.0) -> QuotaOutcome:
    day = WindowState(DAY, day_used, 86_400.0)
    minute = WindowState(MINUTE, minute_used, 3_600.0 + 60.0)
    exhausted = day if day_used >= DAY.limit else None
    return QuotaOutcome(exhausted is None, (day, minute), exhausted=exhausted)


def test_headers_name_the_tightest_window() -> None:
    headers = ratelimit_headers(outcome(day_used=1.0, minute_used=2.0), now=3_600.0)
    assert headers == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1m0s",
        "RateLimit-Policy": '"day";q=3;w=86400, "minute";q=2;w=60',
        "RateLimit": '"minute";r=0;t=60',
    }


def test_the_countdown_moves_with_the_clock() -> None:
    refused = outcome()
    assert ratelimit_headers(refused, now=3_600.0)["RateLimit"].endswith("t=82800")
    later = ratelimit_headers(refused, now=3_601.5)
    assert later["RateLimit"].endswith("t=82799")
    assert later["x-ratelimit-reset-requests"] == openai_duration(86_400.0 - 3_601.5)
    # The last second counts in milliseconds.
    assert ratelimit_headers(refused, now=86_399.5)["x-ratelimit-reset-requests"] == "500ms"
    assert ratelimit_headers(refused, now=86_399.75)["x-ratelimit-reset-requests"] == "250ms"


def test_no_windows_no_headers() -> None:
    assert ratelimit_headers(QuotaOutcome(True, ()), now=0.0) == {}


def test_another_outcome_over_the_same_windows_counts_down_what_remains() -> None:
    # A tenant admitted twice: same windows, usage one higher.
    first = ratelimit_headers(outcome(day_used=0.0, minute_used=0.0), now=3_600.2)
    second = ratelimit_headers(outcome(day_used=1.0, minute_used=1.0), now=3_600.4)
    assert first["x-ratelimit-remaining-requests"] == "2" and first["RateLimit"].startswith(
        '"minute";r=2;')
    assert second == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "1m0s",
        "RateLimit-Policy": '"day";q=3;w=86400, "minute";q=2;w=60',
        "RateLimit": '"minute";r=1;t=60',
    }
    # Another set of windows is formatted afresh.
    other = QuotaWindow("{mg:u}:60", 5.0, 60.0)
    alone = QuotaOutcome(True, (WindowState(other, 1.0, 3_660.0),))
    assert ratelimit_headers(alone, now=3_600.4) == {
        "x-ratelimit-limit-requests": "5",
        "x-ratelimit-remaining-requests": "4",
        "x-ratelimit-reset-requests": "1m0s",
        "RateLimit-Policy": '"minute";q=5;w=60',
        "RateLimit": '"minute";r=4;t=60',
    }
