"""Admission events become metrics and log lines: a decision joins the line of the request it
was made for; other events are applied at the end of the event-loop turn, in the context they
were emitted in."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from meltguard.admission.auth import Caller
from meltguard.admission.events import Decided, Settled, Waited
from meltguard.admission.policy import Level
from meltguard.daemon.admission_events import RequestLine, open_request_line
from meltguard.daemon.logs import configure_logging
from tests.daemon.conftest import BuildApp

DECIDED = Decided("pro", "pro-tenant", "admit", "ok", Level.NORMAL, 1.0, 0.0)
LABELS = {"tier": "pro", "decision": "admit", "reason": "ok", "endpoint": "generations"}


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

    def decided(self, tier: str, decision: str, reason: str,
                waited: float | None = None) -> None:
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
        {"tier": "free", "decision": "reject", "reason": reason, "endpoint": "generations"})
    return value or 0.0


async def _in_request(line_events: list[Decided], runtime: Any) -> RequestLine:
    """What the edge does around one request: open its line, let the gate decide, write it."""
    line = open_request_line()
    for event in line_events:
        runtime.on_event(event)
    line.write("POST", "/v1/images/generations", 429, Caller("flooder", "free", False), 1.5)
    return line


async def test_a_decision_joins_its_request_line_and_is_counted_at_once(
    build: BuildApp,
) -> None:
    runtime = build().runtime
    with capture_logs() as logs:
        # A task of its own, as aiohttp serves a request: the line stays in its context.
        await asyncio.create_task(_in_request([_refusal()], runtime))
        assert _rejections(runtime) == 1.0
        await asyncio.sleep(0)
    assert logs == [{
        "event": "admission.decided", "endpoint": "generations", "method": "POST",
        "path": "/v1/images/generations",
        "status": 429, "ms": 1.5, "tier": "free", "tenant": "flooder", "decision": "reject",
        "reason": "daily_quota_exceeded", "pressure": "normal", "cost": 1.0, "wait_s": 0.0,
        "degraded": None, "log_level": "info",
    }]


async def test_a_request_without_a_decision_is_an_access_line(build: BuildApp) -> None:
    runtime = build().runtime
    with capture_logs() as logs:
        await asyncio.create_task(_in_request([], runtime))
    assert logs == [{
        "event": "http.request", "method": "POST", "path": "/v1/images/generations",
        "status": 429, "tier": "free", "tenant": "flooder", "ms": 1.5, "log_level": "info"}]


async def test_a_second_decision_in_one_request_gets_a_line_of_its_own(
    build: BuildApp,
) -> None:
    runtime = build().runtime
    with capture_logs() as logs:
        await asyncio.create_task(_in_request([_refusal("a"), _refusal("b")], runtime))
        await asyncio.sleep(0)
    assert sorted((line["tenant"], "status" in line) for line in logs) == [
        ("a", True), ("b", False)]
    assert _rejections(runtime) == 2.0


async def test_decisions_outside_a_request_keep_lines_of_their_own(build: BuildApp) -> None:
    runtime = build().runtime
    with capture_logs() as logs:
        for event in (_refusal("a"), _refusal("a"), DECIDED):
            runtime.on_event(event)
        await asyncio.sleep(0)
    assert [(line["tenant"], line["decision"]) for line in logs] == [
        ("a", "reject"), ("a", "reject"), ("pro-tenant", "admit")]
    assert not any("status" in line for line in logs)


async def test_an_admission_feeds_the_queue_wait_histogram(build: BuildApp) -> None:
    runtime = build().runtime
    runtime.on_event(Decided("pro", "p", "queue", "ok", Level.NORMAL, 1.0, 2.5))
    runtime.on_event(_refusal())  # a refusal never reached the queue
    await asyncio.sleep(0)
    registry = runtime.metrics.registry
    assert registry.get_sample_value(
        "meltguard_queue_wait_seconds_count", {"tier": "pro"}) == 1.0
    assert registry.get_sample_value(
        "meltguard_queue_wait_seconds_sum", {"tier": "pro"}) == 2.5
    assert registry.get_sample_value(
        "meltguard_queue_wait_seconds_count", {"tier": "free"}) == 0.0


async def test_a_refund_is_logged_and_a_plain_success_is_not(build: BuildApp) -> None:
    runtime = build().runtime
    with capture_logs() as logs:
        runtime.on_event(Settled("pro", "success", 0.0))
        runtime.on_event(Settled("pro", "failed", 1.5))
        await asyncio.sleep(0)
    assert logs == [{"event": "quota.refund_requested", "tier": "pro", "outcome": "failed",
                     "cost": 1.5, "log_level": "info"}]


def test_an_unauthenticated_request_line_names_no_tenant() -> None:
    with capture_logs() as logs:
        RequestLine().write("GET", "/healthz", 200, None, 0.2)
    assert logs == [{"event": "http.request", "method": "GET", "path": "/healthz",
                     "status": 200, "tier": "none", "ms": 0.2, "log_level": "info"}]


def test_a_decision_line_follows_a_reconfigured_logger() -> None:
    # Loggers not cached (as the in-process CLI configures them): each configuration's own
    # stream gets the line, though the decision, and so its bound fields, is the same.
    streams = [io.BytesIO(), io.BytesIO()]
    try:
        for stream in streams:
            configure_logging("json", stream=stream, cache=False)
            line = RequestLine()
            line.decided = DECIDED
            line.write("POST", "/v1/images/generations", 200, None, 3.0)
    finally:
        structlog.reset_defaults()
    for stream in streams:
        [entry] = [json.loads(text) for text in stream.getvalue().splitlines()]
        assert entry["event"] == "admission.decided" and entry["tenant"] == DECIDED.tenant
