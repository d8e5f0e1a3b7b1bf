"""Admission events become metrics and log lines at the end of the event-loop turn, in the
context they were emitted in."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from meltguard.admission.events import Decided, Settled, Waited
from meltguard.admission.policy import Level
from meltguard.daemon.admission_events import AdmissionEvents
from tests.daemon.conftest import BuildApp

DECIDED = Decided("pro", "pro-tenant", "admit", "ok", Level.NORMAL, 1.0, 0.0)
LABELS = {"tier": "pro", "decision": "admit", "reason": "ok"}


def _decisions(runtime: Any) -> float:
    value = runtime.metrics.registry.get_sample_value(
        "meltguard_admission_decisions_total", LABELS)
    return value or 0.0


async def test_an_event_is_applied_at_the_end_of_the_turn_in_its_own_context(
    build: BuildApp,
) -> None:
    runtime = build().runtime
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id="req-1")
    try:
        with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
            runtime.on_event(DECIDED)
            assert logs == [] and _decisions(runtime) == 0.0
            # What the request binds after its decision is not part of the decision's line.
            structlog.contextvars.bind_contextvars(request_id="req-2")
            await asyncio.sleep(0)
        assert _decisions(runtime) == 1.0
        [line] = [entry for entry in logs if entry["event"] == "admission.decided"]
        assert line["request_id"] == "req-1" and line["tenant"] == "pro-tenant"
    finally:
        structlog.contextvars.clear_contextvars()


def test_outside_a_loop_an_event_is_applied_at_once(build: BuildApp) -> None:
    runtime = build().runtime
    with capture_logs() as logs:
        runtime.on_event(DECIDED)
    assert _decisions(runtime) == 1.0
    assert [entry["event"] for entry in logs] == ["admission.decided"]


class HalfBroken:
    def __init__(self) -> None:
        self.waits: list[float] = []

    def decided(self, tier: str, decision: str, reason: str) -> None:
        raise RuntimeError("metrics backend broke")

    def waited(self, tier: str, seconds: float) -> None:
        self.waits.append(seconds)


async def test_a_failing_event_is_logged_and_the_others_still_apply(
    build: BuildApp, caplog: pytest.LogCaptureFixture
) -> None:
    runtime = build().runtime
    broken = HalfBroken()
    runtime.metrics = broken  # type: ignore[assignment]
    with caplog.at_level(logging.ERROR):
        runtime.on_event(DECIDED)
        runtime.on_event(Waited("pro", 0.25))
        await asyncio.sleep(0)
    assert broken.waits == [0.25]
    assert "admission event hook failed" in caplog.text


async def test_events_keep_their_order_across_turns(build: BuildApp) -> None:
    runtime = build().runtime
    with capture_logs() as logs:
        for index in range(3):
            runtime.on_event(Decided("pro", f"t{index}", "admit", "ok", Level.NORMAL, 1.0, 0.0))
        await asyncio.sleep(0)
        runtime.on_event(Decided("pro", "t3", "admit", "ok", Level.NORMAL, 1.0, 0.0))
        await asyncio.sleep(0)
    assert [entry["tenant"] for entry in logs] == ["t0", "t1", "t2", "t3"]
    assert _decisions(runtime) == 4.0


def _refusal(tenant: str = "flooder", reason: str = "daily_quota_exceeded") -> Decided:
    return Decided("free", tenant, "reject", reason, Level.NORMAL, 1.0, 0.0)


def _rejections(runtime: Any, reason: str = "daily_quota_exceeded") -> float:
    value = runtime.metrics.registry.get_sample_value(
        "meltguard_admission_decisions_total",
        {"tier": "free", "decision": "reject", "reason": reason})
    return value or 0.0


async def test_repeated_refusals_fold_into_one_line_and_every_one_is_counted(
    build: BuildApp,
) -> None:
    runtime = build().runtime
    structlog.contextvars.bind_contextvars(request_id="req-first")
    try:
        with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
            runtime.on_event(_refusal())
            await asyncio.sleep(0)
            structlog.contextvars.bind_contextvars(request_id="req-later")
            for _ in range(4):
                runtime.on_event(_refusal())
            await asyncio.sleep(0)
            assert len(logs) == 1 and "repeated" not in logs[0]
            runtime.events.flush()
    finally:
        structlog.contextvars.clear_contextvars()
    first, summary = logs
    assert first["request_id"] == "req-first" and first["tenant"] == "flooder"
    assert summary["event"] == "admission.decided" and summary["repeated"] == 4
    assert summary["cost"] == 4.0 and summary["reason"] == "daily_quota_exceeded"
    # The summary speaks for many requests, so it names none of them.
    assert "request_id" not in summary
    assert _rejections(runtime) == 5.0


async def test_refusals_of_other_tenants_or_reasons_and_admissions_are_not_folded(
    build: BuildApp,
) -> None:
    runtime = build().runtime
    with capture_logs() as logs:
        for event in (_refusal("a"), _refusal("b"), _refusal("a", "rate_limit_exceeded"),
                      DECIDED, DECIDED):
            runtime.on_event(event)
        await asyncio.sleep(0)
        runtime.events.flush()
    assert [(line["tenant"], line["decision"]) for line in logs] == [
        ("a", "reject"), ("b", "reject"), ("a", "reject"), ("pro-tenant", "admit"),
        ("pro-tenant", "admit")]
    assert not any("repeated" in line for line in logs)


async def test_a_fold_is_written_when_its_second_ends_and_the_next_refusal_opens_another(
    build: BuildApp,
) -> None:
    runtime = build().runtime
    runtime.events = AdmissionEvents(lambda: runtime.metrics, fold_seconds=0.05)
    with capture_logs() as logs:
        for _ in range(3):
            runtime.on_event(_refusal())
            await asyncio.sleep(0)
        await asyncio.sleep(0.2)
        assert [line.get("repeated") for line in logs] == [None, 2]
        runtime.on_event(_refusal())
        await asyncio.sleep(0)
    assert [line.get("repeated") for line in logs] == [None, 2, None]


async def test_a_refund_is_logged_and_a_plain_success_is_not(build: BuildApp) -> None:
    runtime = build().runtime
    with capture_logs() as logs:
        runtime.on_event(Settled("pro", "success", 0.0))
        runtime.on_event(Settled("pro", "failed", 1.5))
        await asyncio.sleep(0)
    assert logs == [{"event": "quota.refunded", "tier": "pro", "outcome": "failed",
                     "cost": 1.5, "log_level": "info"}]
