"""structlog set-up: one JSON (or console) line per event, request context from contextvars.

JSON lines follow structlog's performance guide: orjson renders bytes, a bytes logger writes
them, and bound loggers are cached on first use.
"""

from __future__ import annotations

import io
import logging
import sys
from typing import Any, BinaryIO, Literal

import orjson
import structlog

LogFormat = Literal["json", "console"]


def bind_caller(tenant: str, tier: str) -> None:
    """Name the caller on every line written from here on in this context (a line's own
    tenant and tier win)."""
    structlog.contextvars.bind_contextvars(tenant=tenant, tier=tier)


def start_request_context(request_id: str) -> None:
    """A request's log context: its id, nothing left from an earlier one."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)


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

    def write(self, data: bytes) -> int:
        buffer = getattr(sys.stderr, "buffer", None)
        if buffer is not None:
            return int(buffer.write(data))
        return int(sys.stderr.write(data.decode("utf-8", "replace")))

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def _binary(stream: Any) -> BinaryIO:
    if isinstance(stream, io.RawIOBase | io.BufferedIOBase):
        return stream  # type: ignore[return-value]
    buffer = getattr(stream, "buffer", None)
    if isinstance(buffer, io.RawIOBase | io.BufferedIOBase):
        return buffer  # type: ignore[return-value]
    return _TextSink(stream)  # type: ignore[return-value]


class _TextOf:
    """The text side of a binary target, for the console renderer and stdlib logging."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def write(self, text: str) -> int:
        self._target.write(text.encode("utf-8", "replace"))
        return len(text)

    def flush(self) -> None:
        self._target.flush()

    def isatty(self) -> bool:
        isatty = getattr(self._target, "isatty", None)
        return bool(isatty and isatty())


def configure_logging(
    fmt: LogFormat = "json", level: int = logging.INFO, *, stream: Any = None, cache: bool = True
) -> None:
    """`stream` (default: stderr) takes text or bytes.

    `cache=False` is for commands that run inside another program (tests call the CLI
    in-process): loggers are then not frozen at this configuration's level."""
    target: Any = _binary(stream) if stream is not None else _CurrentStderr()
    text = stream if stream is not None and not isinstance(
        stream, io.RawIOBase | io.BufferedIOBase) else _TextOf(target)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    logger_factory: Any
    if fmt == "console":
        isatty = getattr(text, "isatty", None)
        processors = [*shared, structlog.dev.ConsoleRenderer(colors=bool(isatty and isatty()))]
        logger_factory = structlog.WriteLoggerFactory(file=text)  # type: ignore[arg-type]
    else:
        processors = [*shared, structlog.processors.JSONRenderer(serializer=orjson.dumps)]
        logger_factory = structlog.BytesLoggerFactory(file=target)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=logger_factory,
        cache_logger_on_first_use=cache,
    )
    # Libraries that use stdlib logging (diffusers, aiohttp) still reach the same stream.
    logging.basicConfig(level=logging.WARNING, stream=text, format="%(name)s: %(message)s")
    # Model loading is reported by our own progress lines; the libraries' notices are noise.
    for noisy in ("transformers", "diffusers", "torch", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
