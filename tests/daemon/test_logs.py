"""The JSON log line: fast, and byte for byte what structlog's stock processors wrote."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from meltguard.daemon.logs import (
    LineLogger,
    bind_caller,
    configure_logging,
    json_line_processor,
    merge_caller,
    start_request_context,
)


class Custom:
    def __structlog__(self) -> str:
        return "custom!"


class Plain:
    def __repr__(self) -> str:
        return "<plain>"


EVENTS: list[dict[str, Any]] = [
    {"event": "admission.decided", "tier": "pro", "cost": 1.0, "wait_s": 0.0, "degraded": None},
    {"event": "x", "text": "café \u2603 \"quoted\" \\ \n", "n": 2**70, "small": 1e-05,
     "big": 1e22, "nan": float("nan"), "inf": float("-inf"), "flag": True},
    {"event": "x", "nested": {"a": [1, 2.5, None, (3, 4)], "b": {"c": "d"}}},
    {"event": "x", "custom": Custom(), "plain": Plain(), 7: "int key", None: "none key"},
]


@pytest.fixture
def stock() -> Iterator[None]:
    yield
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def _stock_line(event_dict: dict[str, Any]) -> str:
    """What the stock chain (merge_contextvars, add_log_level, TimeStamper, format_exc_info,
    JSONRenderer) writes for the same event, minus the timestamp."""
    chain = [structlog.contextvars.merge_contextvars, merge_caller,
             structlog.processors.add_log_level, structlog.processors.format_exc_info,
             structlog.processors.JSONRenderer()]
    out: Any = dict(event_dict)
    for processor in chain:
        out = processor(None, "info", out)
    assert isinstance(out, str)
    return out


@pytest.mark.parametrize("event_dict", EVENTS)
def test_a_line_is_what_the_stock_processors_wrote(stock: None,
                                                   event_dict: dict[str, Any]) -> None:
    contextvars.copy_context().run(_compare_with_stock, event_dict)


def _compare_with_stock(event_dict: dict[str, Any]) -> None:
    structlog.contextvars.bind_contextvars(request_id="r-1", region="eu")
    bind_caller("acme", "free")
    line = json_line_processor()(None, "info", dict(event_dict))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    text = line.decode("ascii")
    # The same keys in the same order, each written the same way; the timestamp comes last.
    head, _, stamp = text.rstrip("\n").rpartition(', "timestamp": ')
    assert head + "}" == _stock_line(event_dict)
    assert re.fullmatch(r'"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z"}', stamp)


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


def test_a_failed_encoding_leaves_the_next_line_intact(stock: None) -> None:
    stream = io.BytesIO()
    configure_logging("json", stream=stream)
    log = structlog.get_logger("t")
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValueError, match="Circular"):
        log.info("circular", value=loop)
    shared = ["x"]
    log.info("fine", a=shared, b=shared)
    assert json.loads(stream.getvalue())["a"] == ["x"]


def test_capture_logs_still_sees_the_events(stock: None) -> None:
    configure_logging("json", stream=io.BytesIO())
    with capture_logs() as logs:
        structlog.get_logger("t").bind().info("admission.decided", tier="pro")
    assert logs == [{"event": "admission.decided", "tier": "pro", "log_level": "info"}]


class CountingStream(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_outside_a_loop_every_line_is_flushed() -> None:
    stream = CountingStream()
    logger = LineLogger(stream)
    logger.info(b"one\n")
    logger.error(b"two\n")
    assert stream.getvalue() == b"one\ntwo\n" and stream.flushes == 2


async def test_inside_a_loop_lines_are_flushed_once_at_the_end_of_the_turn() -> None:
    stream = CountingStream()
    logger = LineLogger(stream)
    for index in range(5):
        logger.info(b"line %d\n" % index)
    assert stream.flushes == 0
    await asyncio.sleep(0)
    assert stream.flushes == 1 and stream.getvalue().count(b"\n") == 5
    logger.info(b"later\n")
    await asyncio.sleep(0)
    assert stream.flushes == 2


def test_a_loop_that_closed_with_a_flush_pending_does_not_stall_later_ones() -> None:
    stream = CountingStream()
    logger = LineLogger(stream)

    loop = asyncio.new_event_loop()

    def log_and_stop() -> None:
        logger.info(b"first\n")
        loop.stop()  # this turn is the last: the flush it scheduled never runs

    loop.call_soon(log_and_stop)
    loop.run_forever()
    loop.close()
    assert stream.flushes == 0

    async def log_and_yield() -> None:
        logger.info(b"second\n")
        await asyncio.sleep(0)

    asyncio.run(log_and_yield())
    assert stream.flushes == 1 and stream.getvalue() == b"first\nsecond\n"


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
