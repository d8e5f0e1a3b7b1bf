"""The aiohttp application: routes, the edge middleware, and resource lifecycles (the images
routes' request path is images.py).

Everything is injected (settings, engine, gate, clock, registry) so tests build the same app
the CLI runs, with fakes of our own Protocols where they want them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from meltguard.daemon.admission_events import RequestLine, open_request_line
from meltguard.daemon.app_keys import CALLER, INFLIGHT, METRICS, RUNTIME, InflightRequests
from meltguard.daemon.edit_route import create_edit
from meltguard.daemon.errors import error_response, from_http_exception
from meltguard.daemon.http_guard import body_guard, expect_handler
from meltguard.daemon.images import create_image, get_image_file, refusal_response
from meltguard.daemon.logs import start_request_context
from meltguard.daemon.metrics import Metrics
from meltguard.daemon.openapi import openapi_document
from meltguard.daemon.ratelimit_headers import ratelimit_headers
from meltguard.daemon.runtime import Runtime
from meltguard.daemon.stores.lifecycle import QUOTA_STORE
from meltguard.daemon.stores.lifecycle import readiness as store_readiness
from meltguard.errors import ErrorCode, ServiceError, invalid

log = structlog.get_logger("meltguard")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(runtime: Runtime, registry: CollectorRegistry) -> web.Application:
    """The daemon's aiohttp application: the OpenAI Images routes, quota, health, metrics and
    admin routes behind the edge middleware, on `runtime`'s gate and engine. It owns the
    engine's warm-up and close and, at shutdown, waits for the gate's refunds."""
    max_body = runtime.settings.max_body_bytes
    app = web.Application(
        client_max_size=max_body,
        middlewares=[edge_middleware, body_guard(max_body, ("/v1/images/generations",))],
    )
    app[RUNTIME] = runtime
    app[INFLIGHT] = InflightRequests()
    metrics = Metrics(registry, runtime.view)
    metrics.prime(runtime.loaded.policy.tiers, runtime.engine.name, runtime.gate.store_name)
    runtime.metrics = metrics
    app[METRICS] = metrics
    app.cleanup_ctx.append(_engine_ctx)
    server_log = logging.getLogger("aiohttp.server")
    if _quiet_protocol_errors not in server_log.filters:
        server_log.addFilter(_quiet_protocol_errors)
    app.router.add_post("/v1/images/generations", create_image,
                        expect_handler=expect_handler(max_body))
    app.router.add_post("/v1/images/edits", create_edit)
    app.router.add_get("/v1/images/files/{name}", get_image_file)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/quota", get_quota)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/openapi.json", openapi_handler)
    app.router.add_get("/admin/state", admin_state)
    app.router.add_post("/admin/reload", admin_reload)
    return app


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]

    async def warm() -> None:
        started = time.monotonic()
        try:
            await runtime.engine.warm_up()
        except Exception as exc:
            log.error("engine.warm_up_failed", engine=runtime.engine.name, error=str(exc))
            return
        log.info("engine.ready", engine=runtime.engine.name,
                 seconds=round(time.monotonic() - started, 2))

    task = asyncio.create_task(warm(), name="engine-warm-up")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await runtime.gate.drain()
    await runtime.engine.close()


# -- edge -------------------------------------------------------------------------------------


def _quiet_protocol_errors(record: logging.LogRecord) -> bool:
    """A request aiohttp cannot parse never reaches the app; aiohttp answers it with a
    plain-text 400 and logs the offending bytes, which for a bad header quote its value: an
    Authorization header's key would reach the log. Log the kind of error only."""
    exc = record.exc_info[1] if record.exc_info else None
    if not isinstance(exc, HttpProcessingError):
        return True
    peer = record.args[0] if isinstance(record.args, tuple) and record.args else None
    log.warning("http.malformed_request", status=exc.code, error=type(exc).__name__,
                peer=str(peer) if peer is not None else None)
    return False


@web.middleware
async def edge_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, the request's one log line, requests_total, and every error in OpenAI's
    shape."""
    runtime = request.app[RUNTIME]
    inflight = request.app[INFLIGHT]
    incoming = request.headers.get("x-request-id", "")
    request_id = incoming if _REQUEST_ID.match(incoming) else uuid.uuid4().hex
    start_request_context(request_id)
    line = open_request_line()
    started = time.perf_counter()
    task = asyncio.current_task()
    if task is not None:
        inflight.tasks.add(task)
    try:
        response = await handler(request)
    except ServiceError as exc:
        response = await refusal_response(request, exc.refused)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(from_http_exception(exc))
        # RFC 9110: a 405 names the methods that would work.
        if "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
    except asyncio.CancelledError:
        if not (inflight.abandoned and _peer_connected(request)):
            _account(request, runtime, line, 499, started)
            raise
        # The drain deadline passed with this request unfinished; the client is still there,
        # so it gets an answer it can retry on rather than a reset connection. Its permit
        # already settled as "ignored" on the way out, which refunded its quota.
        if task is not None:
            task.uncancel()
        response = error_response(ServiceError(
            ErrorCode.SHUTTING_DOWN,
            "The server shut down before your request finished; nothing was charged. Retry.",
            retry_after=2.0))
    except Exception:
        log.exception("http.unhandled", path=request.path)
        response = error_response(
            ServiceError(ErrorCode.INTERNAL_ERROR, "Internal error; it has been logged.")
        )
    finally:
        if task is not None:
            inflight.tasks.discard(task)
    response.headers["x-request-id"] = request_id
    if response.status in (408, 413):
        # Part of the body is still unread, so the connection is out of step: close it
        # after this answer instead of parsing the rest of the body as the next request.
        response.force_close()
    _account(request, runtime, line, response.status, started)
    return response


def _peer_connected(request: web.Request) -> bool:
    transport = request.transport
    return transport is not None and not transport.is_closing()


def abandon_inflight(app: web.Application) -> int:
    """Cancel every request still being served; each answers 503 `shutting_down` (its quota
    refunded) while its client is connected. For the end of a drain; returns how many."""
    inflight = app[INFLIGHT]
    inflight.abandoned = True
    tasks = [task for task in inflight.tasks if not task.done()]
    for task in tasks:
        task.cancel("drain deadline passed")
    return len(tasks)


def _account(
    request: web.Request, runtime: Runtime, line: RequestLine, status: int, started: float
) -> None:
    caller = request.get(CALLER)
    path = request.path
    metrics = runtime.metrics
    if metrics is not None and path.startswith("/v1/"):
        metrics.request_done(caller.tier if caller else "none", status)
    line.write(request.method, path, status, caller,
               round((time.perf_counter() - started) * 1000, 2))


# -- the rest of the API ----------------------------------------------------------------------


async def list_models(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    caller = runtime.gate.authenticate(request.headers.get("Authorization"),
                                       request.remote or "unknown")
    request[CALLER] = caller
    started = int(runtime.clock.wall())
    return web.json_response({"object": "list", "data": [
        {"id": runtime.engine.name, "object": "model", "created": started, "owned_by": "meltguard"}
    ]})


async def get_quota(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    caller = runtime.gate.authenticate(request.headers.get("Authorization"),
                                       request.remote or "unknown")
    request[CALLER] = caller
    outcome = await runtime.gate.quota_status(caller)
    now = runtime.clock.wall()
    windows = [
        {
            "window": int(state.window.period),
            "limit": state.window.limit,
            "used": round(state.used, 6),
            "remaining": round(state.remaining, 6),
            "resets_at": int(state.reset_at),
            "resets_in_seconds": round(max(state.reset_at - now, 0.0), 3),
        }
        for state in outcome.windows
    ]
    body = {"tenant": caller.tenant, "tier": caller.tier, "level": runtime.level.label,
            "windows": windows}
    return web.json_response(body, headers=ratelimit_headers(outcome, now))


async def healthz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    return web.json_response({"status": "ok" if runtime.accepting else "draining"})


async def readyz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    health = runtime.engine.health()
    store_ready, store = await store_readiness(
        request.app.get(QUOTA_STORE),
        fails_closed=runtime.loaded.policy.on_store_error == "closed")
    ready = health.ready and runtime.accepting and store_ready
    body = {
        "ready": ready,
        "engine": {"name": runtime.engine.name, "ready": health.ready, "detail": health.detail,
                   "device": health.device},
        "telemetry": {"source": runtime.telemetry_kind, "note": runtime.telemetry_note},
        "pressure": runtime.level.label,
        "policy": {"mode": runtime.loaded.policy.mode, "sha256": runtime.loaded.sha256},
        "accepting": runtime.accepting,
        "store": store,
    }
    return web.json_response(body, status=200 if ready else 503)


async def metrics_handler(request: web.Request) -> web.Response:
    registry = request.app[METRICS].registry
    return web.Response(body=generate_latest(registry),
                        headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi_handler(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(request.app[RUNTIME].loaded.policy))


# -- admin ------------------------------------------------------------------------------------


def _is_loopback(remote: str | None) -> bool:
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return False
    # A dual-stack listener reports IPv4 peers as ::ffff:127.0.0.1.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _require_admin(request: web.Request) -> None:
    runtime = request.app[RUNTIME]
    if not runtime.settings.admin_remote and not _is_loopback(request.remote):
        raise ServiceError(ErrorCode.PERMISSION_DENIED, "Admin routes answer on loopback only.")
    if not runtime.gate.is_admin(request.headers.get("Authorization")):
        raise ServiceError(ErrorCode.INVALID_API_KEY,
                           "Admin routes need the admin key (admin_key_sha256 in the policy).")


async def admin_state(request: web.Request) -> web.Response:
    _require_admin(request)
    runtime = request.app[RUNTIME]
    snap = runtime.gate.snapshot()
    pressure = runtime.pressure
    return web.json_response({
        "level": runtime.level.label,
        "pressure": None if pressure is None else {
            "stale": pressure.stale, "reasons": list(pressure.reasons),
            "gpus": [{"index": g.index, "level": g.level.label} for g in pressure.gpus]},
        "concurrency_limit": snap.concurrency_limit,
        "queue_depth": dict(snap.queue_depth),
        "inflight": dict(snap.inflight),
        "policy": {"mode": runtime.loaded.policy.mode, "sha256": runtime.loaded.sha256,
                   "path": runtime.settings.policy},
        "telemetry": {"source": runtime.telemetry_kind, "note": runtime.telemetry_note},
        "requests": {"active": runtime.active_requests, "accepting": runtime.accepting},
        "process": _process_state(runtime),
    })


def _process_state(runtime: Runtime) -> dict[str, Any]:
    """What a soak test watches for leaks: tasks, threads, memory, descriptors."""
    return {
        "pid": os.getpid(),
        "asyncio_tasks": len(asyncio.all_tasks()),
        "threads": threading.active_count(),
        "rss_bytes": _rss_bytes(),
        "open_fds": _open_fds(),
        "uptime_s": round(runtime.clock.monotonic() - runtime.started_at, 3),
    }


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None  # not Linux: nothing cheap and current to report


def _open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


async def admin_reload(request: web.Request) -> web.Response:
    _require_admin(request)
    runtime = request.app[RUNTIME]
    if not runtime.reload("admin"):
        raise invalid("policy", "The policy file is invalid; the previous policy stays in force "
                                "(see the log or `meltguard policy check`).")
    return web.json_response({"reloaded": True, "sha256": runtime.loaded.sha256})

