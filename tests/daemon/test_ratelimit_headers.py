"""The rate-limit headers of a quota outcome, and the memo that answers a refused tenant's
repeated outcome without formatting it again."""

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


def test_a_repeated_outcome_gets_the_same_headers() -> None:
    refused = outcome()
    first = ratelimit_headers(refused, now=3_600.2)
    second = ratelimit_headers(refused, now=3_600.7)
    assert second is first  # shared, and typed read-only: the image route copies before adding
    assert second["RateLimit"] == '"day";r=0;t=82800'
    # Another outcome over the same windows gets a mapping of its own: the first is unchanged.
    third = ratelimit_headers(outcome(minute_used=0.0), now=3_600.9)
    assert third is not first and first["RateLimit"] == '"day";r=0;t=82800'


def test_the_countdown_moves_with_the_clock() -> None:
    refused = outcome()
    assert ratelimit_headers(refused, now=3_600.0)["RateLimit"].endswith("t=82800")
    later = ratelimit_headers(refused, now=3_601.5)
    assert later["RateLimit"].endswith("t=82799")
    assert later["x-ratelimit-reset-requests"] == openai_duration(86_400.0 - 3_601.5)
    # The last second counts in milliseconds, every call afresh.
    assert ratelimit_headers(refused, now=86_399.5)["x-ratelimit-reset-requests"] == "500ms"
    assert ratelimit_headers(refused, now=86_399.75)["x-ratelimit-reset-requests"] == "250ms"


def test_no_windows_no_headers() -> None:
    assert ratelimit_headers(QuotaOutcome(True, ()), now=0.0) == {}


def test_another_outcome_over_the_same_windows_counts_down_what_remains() -> None:
    # A tenant admitted again and again: same windows, usage one higher each time.
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
