"""The images routes' shared request path: authenticate, admit, generate, answer (or refuse
with the caller's rate-limit headers)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses

import orjson
import structlog
from aiohttp import web

from meltguard.admission.auth import Caller
from meltguard.admission.cost import ImageAsk
from meltguard.admission.permit import Permit
from meltguard.daemon.app_keys import CALLER, RUNTIME
from meltguard.daemon.errors import engine_detail, engine_error, error_response
from meltguard.daemon.image_request import parse_image_request
from meltguard.daemon.logs import bind_caller
from meltguard.daemon.ratelimit_headers import ratelimit_headers
from meltguard.daemon.runtime import Runtime
from meltguard.errors import ErrorCode, Refused, ServiceError, invalid
from meltguard.values import EditInput, GenerationJob

log = structlog.get_logger("meltguard")


async def refusal_response(request: web.Request, refused: Refused) -> web.Response:
    """The refusal in OpenAI's shape, with the caller's rate-limit headers once it is known."""
    runtime = request.app[RUNTIME]
    overload_status = runtime.gate.overload_status
    caller = request.get(CALLER)
    if caller is None:
        return error_response(refused, overload_status=overload_status)
    outcome = refused.quota
    # The store just failed; asking it again for headers would double the outage's cost.
    if outcome is None and refused.code is not ErrorCode.QUOTA_STORE_UNAVAILABLE:
        try:
            outcome = await runtime.gate.quota_status(caller)
        except Exception:  # the store being down must not turn a 4xx into a 500
            outcome = None
    headers = ratelimit_headers(outcome, runtime.clock.wall()) if outcome is not None else None
    return error_response(refused, headers, overload_status=overload_status)


async def _read_body(request: web.Request, seconds: float) -> bytes:
    if request.content.is_eof():
        # The whole body came in with the headers (small JSON bodies do): nothing to wait for.
        return await request.read()
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
        if isinstance(permit, Refused):
            return await refusal_response(request, permit)
        # For the lines written while the image is made (the engine's, a refund's).
        bind_caller(caller.tenant, caller.tier)
        # The admitted (maybe degraded) job; an edit's picture joins it after admission.
        job = permit.job if edit is None else dataclasses.replace(permit.job, edit=edit)
        # Metered by the very job object the engine batches.
        with runtime.energy.metering(job, caller.tier) as metered:
            pngs = await _generate(runtime, permit, job)
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
    headers = ratelimit_headers(permit.quota, now) if permit.quota is not None else {}
    if permit.degraded:
        headers["x-meltguard-degraded"] = ", ".join(permit.degraded)
    headers["x-meltguard-seed"] = str(job.seed)
    return web.Response(body=orjson.dumps(body_out), headers=headers,
                        content_type="application/json")


async def _generate(runtime: Runtime, permit: Permit, job: GenerationJob) -> list[bytes]:
    """Run `job` (the permit's, with an edit's picture); the permit settles on the way out
    (see admission/permit.py)."""
    clock = runtime.clock
    try:
        async with permit:
            started = clock.monotonic()
            pngs = await runtime.engine.generate(job)
            seconds = clock.monotonic() - started
            permit.settle("success", seconds=seconds)
    except Exception as exc:
        error = engine_error(exc, runtime.gate.retry_hint())
        if error.code is ErrorCode.GENERATION_FAILED:
            prompt = None if runtime.settings.log_prompts else permit.job.prompt
            log.error("engine.failed", error=engine_detail(exc, prompt))
        raise error from None
    metrics = runtime.metrics
    if metrics is not None:
        metrics.generation.labels(runtime.engine.name).observe(seconds)
        metrics.images.labels(permit.tier).inc(len(pngs))
    return pngs


async def get_image_file(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    name = request.match_info["name"].removesuffix(".png")
    png = runtime.images.get(name, runtime.clock.wall())
    if png is None:
        raise ServiceError(ErrorCode.NOT_FOUND, "Unknown or expired image.")
    return web.Response(body=png, content_type="image/png")


def _clip(text: str, limit: int = 64) -> str:
    """Echo at most `limit` characters of client input: a 1 MiB field must not come back."""
    return text if len(text) <= limit else text[:limit] + "..."
