"""The log lines: one JSON object per line with the request's context, as structlog renders
it with orjson; console lines for people."""

from __future__ import annotations

import contextvars
import io
import json
from collections.abc import Iterator

import pytest
import structlog
from structlog.testing import capture_logs

from meltguard.daemon.logs import bind_caller, configure_logging, start_request_context


class Custom:
    def __structlog__(self) -> str:
        return "custom!"


@pytest.fixture
def stock() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def test_a_json_line_carries_the_event_level_time_and_context(stock: None) -> None:
    stream = io.BytesIO()
    configure_logging("json", stream=stream)

    def request() -> None:
        start_request_context("r-1")
        structlog.get_logger("t").info("x", text="café \u2603 \"q\"\n", n=2, obj=Custom())

    contextvars.copy_context().run(request)
    [line] = stream.getvalue().splitlines()
    record = json.loads(line)
    assert record["event"] == "x" and record["level"] == "info"
    assert record["request_id"] == "r-1" and record["text"] == "café \u2603 \"q\"\n"
    assert record["n"] == 2 and record["obj"] == "custom!"
    assert record["timestamp"].endswith("Z")


def test_exceptions_are_rendered_as_the_stock_chain_does(stock: None) -> None:
    stream = io.BytesIO()
    configure_logging("json", stream=stream)
    log = structlog.get_logger("t")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed", step=3)
    record = json.loads(stream.getvalue())
    assert record["event"] == "failed" and record["level"] == "error"
    assert record["exception"].startswith("Traceback") and "ValueError: boom" in record["exception"]
    assert "exc_info" not in record


def test_capture_logs_still_sees_the_events(stock: None) -> None:
    configure_logging("json", stream=io.BytesIO())
    with capture_logs() as logs:
        structlog.get_logger("t").bind().info("admission.decided", tier="pro")
    assert logs == [{"event": "admission.decided", "tier": "pro", "log_level": "info"}]


def test_text_streams_are_written_through_their_buffer() -> None:
    raw = io.BytesIO()
    text = io.TextIOWrapper(raw, encoding="utf-8", write_through=True)
    configure_logging("json", stream=text)
    try:
        structlog.get_logger("t").info("hello", who="world")
        text.flush()
        assert json.loads(raw.getvalue())["who"] == "world"
    finally:
        structlog.reset_defaults()


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_the_bound_caller_is_named_until_the_next_request(stock: None, fmt: str) -> None:
    stream = io.StringIO()
    configure_logging(fmt, stream=stream)  # type: ignore[arg-type]
    log = structlog.get_logger("t")

    def request() -> None:
        start_request_context("r-1")
        log.info("before")
        bind_caller("acme", "pro")
        log.info("after")
        log.info("own", tenant="other", tier="free")
        start_request_context("r-2")
        log.info("next")

    contextvars.copy_context().run(request)
    lines = stream.getvalue().splitlines()
    if fmt == "json":
        named = [(entry["event"], entry["request_id"], entry.get("tenant"), entry.get("tier"))
                 for entry in map(json.loads, lines)]
        assert named == [("before", "r-1", None, None), ("after", "r-1", "acme", "pro"),
                         ("own", "r-1", "other", "free"), ("next", "r-2", None, None)]
    else:
        assert ["tenant=acme" in line for line in lines] == [False, True, False, False]
        assert "tenant=other" in lines[2] and "tier=free" in lines[2]
