"""structlog set-up: one JSON (or console) line per event, request context from contextvars.

The JSON form is on the hot path (an `admission.decided` line per decision and an
`http.request` line per request), so it is built for speed without changing what a line
says, byte for byte: structlog's usual processors fused into one, the stdlib's C JSON encoder
called directly rather than through json.dumps, the ISO timestamp assembled from a per-second
cache, and one flush per event-loop turn instead of one per line.
`structlog.testing.capture_logs` works as with any processor chain.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import json
import logging
import sys
import time
from collections.abc import Callable
from json.encoder import c_make_encoder, encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any, BinaryIO, Literal

import structlog

from meltguard.daemon.loop_turn import EndOfTurn

LogFormat = Literal["json", "console"]


def _fallback(value: Any) -> Any:
    # structlog's own rule for what JSON cannot hold: the object's __structlog__, else repr.
    render = getattr(value, "__structlog__", None)
    return render() if callable(render) else repr(value)


# The stdlib's C encoder with json.dumps' defaults (what structlog's JSONRenderer calls), built
# once instead of per line: lines come out byte for byte as before. Its circular-reference
# markers are emptied again whenever an encoding fails part-way.
_MARKERS: dict[int, Any] = {}
_ENCODE = (
    c_make_encoder(_MARKERS, _fallback, encode_basestring_ascii, None, ": ", ", ", False,
                   False, True)
    if c_make_encoder is not None else None
)


def render_json_line(logger: Any, method_name: str, event_dict: Any) -> bytes:
    """The event as one line of JSON, newline included, as json.dumps writes it."""
    if _ENCODE is None:
        return (json.dumps(event_dict, default=_fallback) + "\n").encode()
    try:
        chunks = _ENCODE(event_dict, 0)
    except BaseException:
        _MARKERS.clear()
        raise
    # ensure_ascii: the text is ASCII already.
    return ("".join(chunks) + "\n").encode("ascii")


# The tenant and tier of the request being served, for every line written in its context once
# it is admitted. One ContextVar set per admission rather than structlog's bind_contextvars (a
# variable, a set and a token per key): the image route admits far more often than anything
# logs in between.
_CALLER: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "meltguard_log_caller", default=None)


def bind_caller(tenant: str, tier: str) -> None:
    """Name the caller on every line written from here on in this context."""
    _CALLER.set((tenant, tier))


def start_request_context(request_id: str) -> None:
    """A request's log context: its id, no caller yet, nothing left from an earlier one."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    _CALLER.set(None)


def merge_caller(logger: Any, method_name: str, event_dict: Any) -> Any:
    """The processor for `bind_caller`: a line's own tenant and tier win."""
    caller = _CALLER.get()
    if caller is not None:
        event_dict.setdefault("tenant", caller[0])
        event_dict.setdefault("tier", caller[1])
    return event_dict


_CONTEXT_PREFIX = "structlog_"  # how structlog.contextvars names its variables
_PREFIX_LEN = len(_CONTEXT_PREFIX)
_LEVELS = {"warn": "warning", "exception": "error"}  # as structlog's add_log_level


def json_line_processor() -> Callable[[Any, str, Any], bytes]:
    """merge_contextvars, merge_caller, add_log_level, TimeStamper(fmt="iso", utc=True),
    format_exc_info and the JSON renderer as one processor, with the same result: the same
    keys in the same order, the timestamp as "2026-11-25T07:38:44.123456Z" (no fraction on a
    whole second). The date and time of day are formatted once per second rather than
    through a datetime per line."""
    second = -1
    prefix = ""

    def process(logger: Any, method_name: str, event_dict: Any) -> bytes:
        nonlocal second, prefix
        for var, value in contextvars.copy_context().items():
            name = var.name
            if name.startswith(_CONTEXT_PREFIX) and value is not Ellipsis:
                event_dict.setdefault(name[_PREFIX_LEN:], value)
        caller = _CALLER.get()
        if caller is not None:
            event_dict.setdefault("tenant", caller[0])
            event_dict.setdefault("tier", caller[1])
        event_dict["level"] = _LEVELS.get(method_name, method_name)
        now = time.time()
        whole = int(now)
        if whole != second:
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
            second = whole
        micros = int((now - whole) * 1_000_000)
        event_dict["timestamp"] = f"{prefix}.{micros:06d}Z" if micros else f"{prefix}Z"
        if "exc_info" in event_dict:
            event_dict = structlog.processors.format_exc_info(logger, method_name, event_dict)
        return render_json_line(logger, method_name, event_dict)

    return process


class LineLogger:
    """Writes rendered lines (newline included) to a binary stream and flushes once per
    event-loop turn.

    Lines logged while a loop runs are flushed by a callback at the end of that turn, so
    they reach the stream within one turn and together in one write; outside a loop (CLI
    commands, other threads) every line is flushed at once. Each line is a single write on
    the stream, which is atomic against writers on other threads."""

    __slots__ = ("_end_of_turn", "_flush", "_stream", "_write")

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._write = stream.write
        self._flush = stream.flush
        self._end_of_turn = EndOfTurn(self._flush_now)

    def msg(self, message: bytes) -> None:
        self._write(message)
        self._end_of_turn.request()

    def _flush_now(self) -> None:
        # A closed or broken stream: the lines are lost anyway.
        with contextlib.suppress(OSError, ValueError):
            self._flush()

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def _binary(stream: Any) -> BinaryIO:
    if isinstance(stream, io.RawIOBase | io.BufferedIOBase):
        return stream  # type: ignore[return-value]
    buffer = getattr(stream, "buffer", None)
    if isinstance(buffer, io.RawIOBase | io.BufferedIOBase):
        return buffer  # type: ignore[return-value]
    return _TextSink(stream)  # type: ignore[return-value]


class _TextSink:
    """A text stream without a binary buffer (a test harness's stand-in for stderr)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, data: bytes) -> int:
        return int(self._stream.write(data.decode("utf-8", "replace")))

    def flush(self) -> None:
        self._stream.flush()


class _CurrentStderr:
    """Whatever sys.stderr is at the moment of writing. A logger cached on first use outlives
    the stream that was stderr when logging was configured (a test harness swaps it per
    test), so the default target must not hold on to one."""

    def write(self, data: str) -> int:
        return sys.stderr.write(data)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


class _CurrentStderrBytes:
    def write(self, data: bytes) -> int:
        stream = sys.stderr
        buffer = getattr(stream, "buffer", None)
        if buffer is not None:
            return int(buffer.write(data))
        return int(stream.write(data.decode("utf-8", "replace")))

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(
    fmt: LogFormat = "json", level: int = logging.INFO, *, stream: Any = None, cache: bool = True
) -> None:
    """`stream` (default: stderr) takes text or bytes; JSON lines go to its binary buffer.

    `cache=False` is for commands that run inside another program (tests call the CLI
    in-process): loggers are then not frozen at this configuration's level."""
    target = stream if stream is not None else _CurrentStderr()
    processors: list[Any]
    logger_factory: Any
    if fmt == "console":
        isatty = getattr(target, "isatty", None)
        processors = [
            structlog.contextvars.merge_contextvars,
            merge_caller,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.dev.ConsoleRenderer(colors=bool(isatty and isatty())),
        ]
        logger_factory = structlog.WriteLoggerFactory(file=target)  # type: ignore[arg-type]
    else:
        processors = [json_line_processor()]
        line_logger = LineLogger(_binary(target) if stream is not None
                                 else _CurrentStderrBytes())  # type: ignore[arg-type]
        logger_factory = lambda *args: line_logger  # noqa: E731  one writer for every logger
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # Caching the bound logger skips re-assembling the chain on every call: the hot path
        # logs one line per request.
        logger_factory=logger_factory,
        cache_logger_on_first_use=cache,
    )
    # Libraries that use stdlib logging (diffusers, aiohttp) still reach the same stream.
    logging.basicConfig(level=logging.WARNING, stream=target, format="%(name)s: %(message)s")
    # Model loading is reported by our own progress lines; the libraries' notices are noise.
    for noisy in ("transformers", "diffusers", "torch", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
