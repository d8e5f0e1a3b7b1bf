"""The application's typed state: what handlers in every daemon module read from the app and
the request."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from meltguard.admission.auth import Caller
from meltguard.daemon.metrics import Metrics
from meltguard.daemon.runtime import Runtime


class InflightRequests:
    """Handler tasks of the requests being served now. A drain that runs out of time cancels
    them through `abandon_inflight`, and each answers 503 instead of losing its connection."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()
        self.abandoned = False


RUNTIME = web.AppKey("runtime", Runtime)
METRICS = web.AppKey("metrics", Metrics)
INFLIGHT = web.AppKey("inflight", InflightRequests)
CALLER = web.RequestKey("caller", Caller)
