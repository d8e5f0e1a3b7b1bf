"""File-descriptor exhaustion: one log line per interval, with a count, instead of a flood.

When the process runs out of descriptors, asyncio's accept loop reports every failed
`accept()` to the loop's exception handler, with a traceback, up to `backlog` times per wake-up
and again each time it re-arms (a measured 31,000 tracebacks, 13 MB, in 5 s). The formatting
alone then starves the requests the daemon could still serve on its open connections. This
handler counts those reports and logs one line per interval (the first at once); every other
exception goes to the handler that was there before.
"""

from __future__ import annotations

import asyncio
import errno
import resource
import time
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger("meltguard")

INTERVAL = 10.0
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]


class AcceptErrorLimiter:
    """A loop exception handler; `clock` is monotonic seconds (tests pass their own)."""

    def __init__(
        self,
        previous: ExceptionHandler | None,
        *,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._previous = previous
        self._interval = interval
        self._clock = clock
        self._unlogged = 0
        self._next_log = float("-inf")
        self.total = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _OUT_OF_RESOURCES:
            self.total += 1
            self._unlogged += 1
            now = self._clock()
            if now >= self._next_log:
                self._next_log = now + self._interval
                soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
                log.error("server.out_of_descriptors", error=errno.errorcode.get(exc.errno, "?"),
                          failures=self._unlogged, interval_s=self._interval,
                          open_files_limit=soft, message=context.get("message"))
                self._unlogged = 0
            return
        if self._previous is not None:
            self._previous(loop, context)
        else:
            loop.default_exception_handler(context)


def install(loop: asyncio.AbstractEventLoop, *, interval: float = INTERVAL) -> AcceptErrorLimiter:
    limiter = AcceptErrorLimiter(loop.get_exception_handler(), interval=interval)
    loop.set_exception_handler(limiter)
    return limiter
