"""Work deferred to the end of the event-loop turn: the request path records, the turn's end
applies, all of the turn's together.

Every request writes its answer to a socket, and the kernel's work there evicts the CPU
caches, so work done between two writes runs at several times its warm cost; done once at the
end of the turn, for every request of the turn, it runs warm and once. The log writer's flush,
the per-request series and the admission events' lines all use this."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class EndOfTurn:
    """Runs `callback` at the end of the current loop turn, once however often it is asked for
    in that turn; outside a running loop (CLI commands, other threads), at once."""

    __slots__ = ("_callback", "_loop")

    def __init__(self, callback: Callable[[], None]) -> None:
        self._callback = callback
        self._loop: asyncio.AbstractEventLoop | None = None

    def request(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._callback()
            return
        # Keyed by loop: a loop that closed with a run still pending must not leave later
        # loops waiting for it.
        if self._loop is not loop:
            self._loop = loop
            loop.call_soon(self._run)

    def _run(self) -> None:
        self._loop = None
        self._callback()
