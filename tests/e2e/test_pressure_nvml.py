"""Issue 4 end to end: a real daemon reads a fake GPU through the real pynvml bindings, sheds
the free tier when the card runs hot, keeps serving pro, counts the free tier's daily quota,
comes back after cooling and min_dwell, and shrugs off a broken policy file."""

from __future__ import annotations

import math
import signal
import time

import pytest

from tests.e2e.conftest import (
    Daemons,
    error_code,
    generate,
    header,
    log_events,
    metric,
    policy_yaml,
    pressure_level,
    wait_for,
)
from tests.fakenvml import FakeNvml
from tests.process import Daemon

pytestmark = pytest.mark.slow

HIGH_DWELL = 2.0
RELOADS = "meltguard_policy_reloads_total"


def test_free_tier_shed_when_hot_pro_served_quota_counted_and_recovered(
    daemons: Daemons, fake_gpu: FakeNvml
) -> None:
    daemon = daemons.make(
        policy=policy_yaml(free_quota="{limit: 3, per: 1d}", elevated_dwell="1s",
                           high_dwell=f"{HIGH_DWELL:g}s"),
        store="memory",
    )
    daemons.start(daemon)
    status, _, ready = daemon.request("GET", "/readyz")
    assert status == 200 and ready["telemetry"]["source"] == "nvml", ready
    wait_for(lambda: pressure_level(daemon) == 0, "normal pressure at 60 °C")
    assert metric(daemon, "meltguard_gpu_temperature_celsius", {"gpu": "0"}) == 60

    # 60 °C: the free key gets its first image of the day (cost 1 of 3).
    status, headers, body = generate(daemon, "free-a")
    assert status == 200, body
    assert len(body["data"]) == 1 and body["usage"]["cost"] == 1
    assert header(headers, "x-ratelimit-remaining-requests") == "2"

    # A typo mid-run: the watcher (1 s poll) counts one failed reload, and the SIGHUP that
    # follows for the same bytes does not count a second (one edit, one failure; issue 17).
    # The old policy stays whole. The broken file also lowers the free quota to 1, which would
    # refuse the next image if any of it had been applied.
    policy_path = daemons.policy_path()
    good_text = policy_path.read_text()
    sha_before = _policy_sha(daemon)
    policy_path.write_text(
        good_text.replace("{limit: 3, per: 1d}", "{limit: 1, per: 1d}")
        .replace("on_store_error:", "on_store_eror:")
    )
    wait_for(lambda: metric(daemon, RELOADS, {"result": "failure"}) == 1,
             "the file watcher to count a failed reload", timeout=10)
    daemon.signal(signal.SIGHUP)
    wait_for(lambda: any(line.get("trigger") == "sighup"
                         for line in log_events(daemon, "policy.reload_skipped")),
             "SIGHUP to find the edit already rejected", timeout=10)
    assert metric(daemon, RELOADS, {"result": "failure"}) == 1
    assert metric(daemon, RELOADS, {"result": "success"}) == 0
    assert _policy_sha(daemon) == sha_before
    status, _, body = generate(daemon, "free-a")
    assert status == 200, f"the broken policy's quota of 1 was applied: {body}"

    # Hot: the free tier is shed with a usable Retry-After, pro is still served.
    raised_at = time.monotonic()
    fake_gpu.update({"0.temperature": 88})
    wait_for(lambda: pressure_level(daemon) == 2, "high pressure at 88 °C")
    assert metric(daemon, "meltguard_gpu_temperature_celsius", {"gpu": "0"}) == 88
    status, headers, body = generate(daemon, "free-a")
    assert status == 503, body
    assert error_code(body) == "server_overloaded"
    assert body["error"]["type"] == "server_error"
    retry_after = int(header(headers, "Retry-After") or 0)
    retry_ms = int(header(headers, "retry-after-ms") or 0)
    assert 1 <= retry_after <= 60
    assert math.ceil(retry_ms / 1000) == retry_after
    status, _, body = generate(daemon, "pro")
    assert status == 200, body

    # Cool down: no free image before min_dwell has passed since the card went hot, and one
    # as soon as the daemon has left the level. Shed requests are not charged, so this is
    # the free tier's third image.
    fake_gpu.update({"0.temperature": 60})
    while True:
        status, _, body = generate(daemon, "free-a")
        answered = time.monotonic()
        if status == 200:
            break
        assert status == 503 and error_code(body) == "server_overloaded", body
        assert answered - raised_at < HIGH_DWELL + 15, "the free tier never came back"
        time.sleep(0.05)
    # The level was entered after the temperature was raised, so it cannot have been left
    # before raised_at + min_dwell.
    assert answered - raised_at >= HIGH_DWELL
    assert pressure_level(daemon) == 0

    # The fourth image of the day is refused for good.
    status, headers, body = generate(daemon, "free-a")
    assert status == 429, body
    assert error_code(body) == "daily_quota_exceeded"
    assert header(headers, "x-should-retry") == "false"
    assert 1 <= int(header(headers, "Retry-After") or 0) <= 60
    assert header(headers, "x-ratelimit-remaining-requests") == "0"

    def rejected(reason: str) -> float:
        return metric(daemon, "meltguard_admission_decisions_total",
                      {"tier": "free", "decision": "reject", "reason": reason})

    assert rejected("server_overloaded") >= 1
    assert rejected("daily_quota_exceeded") == 1
    assert metric(daemon, "meltguard_images_generated_total", {"tier": "free"}) == 3
    # The bad file is reported once, not on every poll since.
    assert metric(daemon, RELOADS, {"result": "failure"}) == 1


def _policy_sha(daemon: Daemon) -> str:
    for line in daemon.metrics().splitlines():
        if line.startswith("meltguard_policy_info{"):
            return line.split('sha256="', 1)[1].split('"', 1)[0]
    raise AssertionError("no meltguard_policy_info series")


def test_an_admission_that_did_not_wait_is_counted_as_admit(daemons: Daemons) -> None:
    # A slot granted at once must not read as `queue` because a real clock ticked between
    # two reads inside the scheduler.
    daemon = daemons.make(policy=policy_yaml(), store="memory")
    daemons.start(daemon)
    status, _, body = generate(daemon, "pro")
    assert status == 200, body
    decisions = "meltguard_admission_decisions_total"
    assert metric(daemon, decisions, {"tier": "pro", "decision": "queue", "reason": "ok"}) == 0
    assert metric(daemon, decisions, {"tier": "pro", "decision": "admit", "reason": "ok"}) == 1
