"""Issue 5: the sqlite store keeps the day's counts across a daemon restart."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.e2e.conftest import Daemons, auth, error_code, generate, header, policy_yaml

pytestmark = pytest.mark.slow

DAY = 86_400


def test_daily_quota_survives_a_restart_on_the_same_sqlite_file(
    daemons: Daemons, tmp_path: Path
) -> None:
    day = int(time.time() // DAY)
    store = f"sqlite:{tmp_path / 'state' / 'quota.sqlite3'}"
    policy = policy_yaml(free_quota="{limit: 3, per: 1d}")

    first = daemons.make(policy=policy, store=store, name="first")
    daemons.start(first)
    for expected_left in ("2", "1"):
        status, headers, body = generate(first, "free-a")
        assert status == 200, body
        assert header(headers, "x-ratelimit-remaining-requests") == expected_left
    assert first.stop() == 0

    second = daemons.make(policy=policy, store=store, name="second")
    daemons.start(second)
    status, _, quota = second.request("GET", "/v1/quota", headers=auth("free-a"))
    assert status == 200, quota
    [daily] = quota["windows"]
    assert (daily["limit"], daily["used"], daily["remaining"]) == (3, 2, 1)

    status, _, body = generate(second, "free-a")
    assert status == 200, body
    status, headers, body = generate(second, "free-a")
    if int(time.time() // DAY) != day:
        pytest.skip("the UTC day turned over mid-test; the counts started afresh")
    assert status == 429, body
    assert error_code(body) == "daily_quota_exceeded"
    assert header(headers, "x-should-retry") == "false"
    # Another tenant of the same tier was never charged by any of this.
    status, _, body = generate(second, "free-b")
    assert status == 200, body
