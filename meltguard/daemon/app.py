"""The aiohttp application: routes, the edge middleware, and resource lifecycles.

Everything is injected (settings, engine, gate, clock, registry) so tests build the same app
the CLI runs, with fakes of our own Protocols where they want them.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
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

from meltguard.admission.auth import Caller
from meltguard.admission.cost import ImageAsk
from meltguard.admission.gate import Permit
from meltguard.daemon.admission_events import RequestLine, open_request_line
from meltguard.daemon.errors import error_response, from_http_exception
from meltguard.daemon.http_guard import body_guard, expect_handler
from meltguard.daemon.image_request import parse_image_request
from meltguard.daemon.logs import bind_caller, start_request_context
from meltguard.daemon.metrics import Metrics
from meltguard.daemon.openapi import openapi_document
from meltguard.daemon.ratelimit_headers import ratelimit_headers
from meltguard.daemon.runtime import Runtime
from meltguard.daemon.stores.lifecycle import QUOTA_STORE
from meltguard.daemon.stores.lifecycle import readiness as store_readiness
from meltguard.errors import ErrorCode, ServiceError, invalid
from meltguard.inference.errors import EngineOutOfMemory
from meltguard.values import EditInput, GenerationJob, QuotaOutcome


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

log = structlog.get_logger("meltguard")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(runtime: Runtime, registry: CollectorRegistry) -> web.Application:
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
    # Imported here: the edits route builds on this module's request path.
    from meltguard.daemon.edit_route import create_edit

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
        response = await refusal_response(request, exc)
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


async def refusal_response(request: web.Request, exc: ServiceError) -> web.Response:
    """The error in OpenAI's shape, with the caller's rate-limit headers once it is known."""
    caller = request.get(CALLER)
    if caller is None:
        return error_response(exc)
    runtime = request.app[RUNTIME]
    outcome = exc.quota if isinstance(exc.quota, QuotaOutcome) else None
    # The store just failed; asking it again for headers would double the outage's cost.
    if outcome is None and exc.code is not ErrorCode.QUOTA_STORE_UNAVAILABLE:
        try:
            outcome = await runtime.gate.quota_status(caller)
        except Exception:  # the store being down must not turn a 4xx into a 500
            outcome = None
    if outcome is None:
        return error_response(exc)
    return error_response(exc, ratelimit_headers(outcome, runtime.clock.wall()))


# -- images -----------------------------------------------------------------------------------


async def _read_body(request: web.Request, seconds: float) -> bytes:
    try:
        async with asyncio.timeout(seconds):
            return await request.read()
    except TimeoutError:
        raise ServiceError(ErrorCode.REQUEST_TIMEOUT,
                           f"The request body did not arrive within {seconds:g} s.") from None


async def create_image(request: web.Request) -> web.Response:
    runtime, caller = image_caller(request)
    body = await _read_body(request, runtime.settings.body_timeout)
    parsed = parse_image_request(body, request.content_type)
    return await serve_images(request, runtime, caller, parsed.ask, model=parsed.model,
                              response_format=parsed.response_format)


def image_caller(request: web.Request) -> tuple[Runtime, Caller]:
    """The first steps of both images routes: refuse while draining, authenticate."""
    runtime = request.app[RUNTIME]
    if not runtime.accepting:
        raise ServiceError(ErrorCode.SHUTTING_DOWN, "The server is shutting down; retry shortly.",
                           retry_after=2.0)
    caller = runtime.gate.authenticate(request.headers.get("Authorization"),
                                       request.remote or "unknown")
    request[CALLER] = caller  # the request's line names the tenant and tier from here on
    return runtime, caller


async def serve_images(
    request: web.Request, runtime: Runtime, caller: Caller, ask: ImageAsk, *,
    model: str | None, response_format: str, edit: EditInput | None = None,
) -> web.Response:
    """Admit `ask`, run it (as an edit of `edit` when given) and answer with its images."""
    if model is not None and model != runtime.engine.name:
        raise invalid("model", f"Unknown model {_clip(model)!r}; this server runs "
                               f"{runtime.engine.name!r} (see /v1/models).")
    if runtime.settings.log_prompts:
        structlog.contextvars.bind_contextvars(prompt=ask.prompt)
    if not runtime.engine.health().ready:
        raise ServiceError(ErrorCode.SERVER_OVERLOADED, "The model is still loading.",
                           retry_after=5.0)
    if edit is not None:
        unsupported = runtime.engine.edit_support(edit.kind)
        if unsupported is not None:
            raise invalid("mask" if edit.mask is not None else "image",
                          f"This server cannot run this edit: {unsupported}.")

    gate = runtime.gate
    runtime.request_started()
    try:
        permit = await gate.decide(caller, ask)
        if isinstance(permit, ServiceError):
            # Answered here rather than raised to the edge: a flood of refusals is answered
            # as often as anything the daemon does.
            return await refusal_response(request, permit)
        # For the lines written while the image is made (the engine's, a refund's).
        bind_caller(caller.tenant, caller.tier)
        # The admitted (maybe degraded) job; an edit's picture joins it after admission.
        job = permit.job if edit is None else dataclasses.replace(permit.job, edit=edit)
        # Metered by the very job object the engine batches.
        with runtime.energy.metering(job, caller.tier) as metered:
            pngs = await _generate(runtime, permit, caller, job)
    finally:
        runtime.request_finished()

    now = runtime.clock.wall()
    if response_format == "url":
        base = runtime.settings.base_url
        data = [{"url": f"{base}/v1/images/files/{runtime.images.put(png, now)}.png"}
                for png in pngs]
    else:
        data = [{"b64_json": base64.b64encode(png).decode("ascii")} for png in pngs]
    job = permit.job
    usage: dict[str, object] = {"images": len(pngs), "size": str(job.size), "steps": job.steps,
                                "cost": round(permit.cost, 6)}
    if metered.joules is not None:
        usage["energy_j"] = round(metered.joules, 3)
    body_out = {"created": int(now), "data": data, "usage": usage}
    headers = dict(ratelimit_headers(permit.quota, now)) if permit.quota is not None else {}
    if permit.degraded:
        headers["x-meltguard-degraded"] = ", ".join(permit.degraded)
    headers["x-meltguard-seed"] = str(job.seed)
    return web.json_response(body_out, headers=headers)


async def _generate(runtime: Runtime, permit: Permit, caller: Caller,
                    job: GenerationJob) -> list[bytes]:
    clock = runtime.clock
    started = clock.monotonic()
    try:
        pngs = await runtime.engine.generate(job)
    except EngineOutOfMemory:
        permit.settle("dropped")
        raise ServiceError(ErrorCode.GPU_OUT_OF_MEMORY,
                           "The GPU ran out of memory; your quota was refunded.",
                           retry_after=runtime.gate.retry_hint()) from None
    except asyncio.CancelledError:
        permit.settle("ignored")
        raise
    except Exception as exc:
        permit.settle("failed")
        detail = f"{type(exc).__name__}: {exc}"
        if not runtime.settings.log_prompts:
            # Engines quote their input in errors (tokenizers do); prompts stay private.
            prompt = permit.job.prompt
            for form in (prompt, repr(prompt)[1:-1]):
                detail = detail.replace(form, "<prompt>")
        log.error("engine.failed", error=detail)
        raise ServiceError(ErrorCode.GENERATION_FAILED,
                           "Image generation failed; your quota was refunded.") from None
    seconds = clock.monotonic() - started
    permit.settle("success", seconds=seconds)
    metrics = runtime.metrics
    if metrics is not None:
        metrics.generation.labels(runtime.engine.name).observe(seconds)
        metrics.images.labels(caller.tier).inc(len(pngs))
    return pngs


async def get_image_file(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    name = request.match_info["name"].removesuffix(".png")
    png = runtime.images.get(name, runtime.clock.wall())
    if png is None:
        raise ServiceError(ErrorCode.NOT_FOUND, "Unknown or expired image.")
    return web.Response(body=png, content_type="image/png")


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


def _clip(text: str, limit: int = 64) -> str:
    """Echo at most `limit` characters of client input: a 1 MiB field must not come back."""
    return text if len(text) <= limit else text[:limit] + "..."


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

