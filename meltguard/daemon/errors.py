"""The one place that maps the error vocabulary to HTTP: status codes, OpenAI's error body,
Retry-After, and what an engine failure means to a client."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping

import orjson
from aiohttp import web

from meltguard.admission.events import Outcome
from meltguard.errors import ErrorCode, Refused, ServiceError, clamp_retry
from meltguard.inference.errors import EngineOutOfMemory

# code -> (HTTP status, OpenAI error type)
_STATUS: dict[ErrorCode, tuple[int, str]] = {
    ErrorCode.INVALID_REQUEST: (400, "invalid_request_error"),
    ErrorCode.INVALID_API_KEY: (401, "invalid_request_error"),
    ErrorCode.PERMISSION_DENIED: (403, "invalid_request_error"),
    ErrorCode.NOT_FOUND: (404, "invalid_request_error"),
    ErrorCode.METHOD_NOT_ALLOWED: (405, "invalid_request_error"),
    ErrorCode.REQUEST_TIMEOUT: (408, "invalid_request_error"),
    ErrorCode.PAYLOAD_TOO_LARGE: (413, "invalid_request_error"),
    ErrorCode.RATE_LIMIT_EXCEEDED: (429, "rate_limit_error"),
    ErrorCode.DAILY_QUOTA_EXCEEDED: (429, "rate_limit_error"),
    ErrorCode.SERVER_OVERLOADED: (503, "server_error"),
    ErrorCode.QUEUE_TIMEOUT: (503, "server_error"),
    ErrorCode.GPU_OUT_OF_MEMORY: (503, "server_error"),
    ErrorCode.QUOTA_STORE_UNAVAILABLE: (503, "server_error"),
    ErrorCode.SHUTTING_DOWN: (503, "server_error"),
    ErrorCode.GENERATION_FAILED: (500, "server_error"),
    ErrorCode.INTERNAL_ERROR: (500, "server_error"),
}
_JSON = "application/json; charset=utf-8"


def status_of(error: Refused | ServiceError, overload_status: int = 503) -> int:
    """The HTTP status of an error. `overload_status` is the policy's choice (503 or 429) for
    `server_overloaded`."""
    if error.code is ErrorCode.SERVER_OVERLOADED:
        return overload_status
    return _STATUS[error.code][0]


def error_response(
    error: Refused | ServiceError,
    extra_headers: Mapping[str, str] | None = None,
    *,
    overload_status: int = 503,
) -> web.Response:
    """The error in OpenAI's shape; `extra_headers` are the caller's rate-limit fields.
    Every 429 and 503 says when to retry; a daily quota says not to retry at all."""
    status = status_of(error, overload_status)
    headers = dict(extra_headers) if extra_headers else {}
    if error.retry_after is not None or status in (429, 503):
        seconds = clamp_retry(error.retry_after or 1.0)
        headers["Retry-After"] = str(math.ceil(seconds))
        headers["retry-after-ms"] = str(round(seconds * 1000))
    if error.code is ErrorCode.DAILY_QUOTA_EXCEEDED:
        headers["x-should-retry"] = "false"
    headers["Content-Type"] = _JSON
    body = orjson.dumps({"error": {"message": error.message, "type": _STATUS[error.code][1],
                                   "param": error.param, "code": error.code.value}})
    return web.Response(status=status, body=body, headers=headers)


def from_http_exception(exc: web.HTTPException) -> ServiceError:
    """aiohttp's own refusals (404, 405, 413, ...) in our vocabulary."""
    if exc.status == 404:
        return ServiceError(ErrorCode.NOT_FOUND, "Unknown route; see /openapi.json.")
    if exc.status == 405:
        return ServiceError(ErrorCode.METHOD_NOT_ALLOWED, f"Method not allowed: {exc.reason}.")
    if exc.status == 413:
        return ServiceError(
            ErrorCode.PAYLOAD_TOO_LARGE, "Request body is larger than 1 MiB.", param="body"
        )
    if exc.status == 408:
        return ServiceError(ErrorCode.REQUEST_TIMEOUT, "The request body did not arrive in time.")
    return ServiceError(ErrorCode.INVALID_REQUEST, exc.reason or "Bad request.")


# -- engine failures --------------------------------------------------------------------------


def outcome_of(exc: BaseException) -> Outcome:
    """How a permit settles when generation raised: out of memory is `dropped` (a signal to
    tighten), a client that left is `ignored`, anything else `failed`; all three refund."""
    if isinstance(exc, EngineOutOfMemory):
        return "dropped"
    if isinstance(exc, asyncio.CancelledError):
        return "ignored"
    if isinstance(exc, ServiceError) and exc.code is ErrorCode.GPU_OUT_OF_MEMORY:
        return "dropped"
    return "failed"


def engine_error(exc: Exception, retry_after: float) -> ServiceError:
    """What the client is told when the engine raised (the quota was refunded)."""
    if isinstance(exc, EngineOutOfMemory):
        return ServiceError(ErrorCode.GPU_OUT_OF_MEMORY,
                            "The GPU ran out of memory; your quota was refunded.",
                            retry_after=retry_after)
    return ServiceError(ErrorCode.GENERATION_FAILED,
                        "Image generation failed; your quota was refunded.")


def engine_detail(exc: BaseException, prompt: str | None) -> str:
    """The engine's error for the log line. Engines quote their input in errors (tokenizers
    do): unless `prompt` is None (prompts may be logged), it is replaced by `<prompt>`."""
    detail = f"{type(exc).__name__}: {exc}"
    if prompt:
        for form in (prompt, repr(prompt)[1:-1]):
            detail = detail.replace(form, "<prompt>")
    return detail
