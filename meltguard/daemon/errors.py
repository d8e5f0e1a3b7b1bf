"""The one place that maps the error vocabulary to HTTP responses in OpenAI's error shape."""

from __future__ import annotations

import json
import math

from aiohttp import web

from meltguard.errors import ErrorCode, ServiceError

# The openai SDK ignores Retry-After above 60 s and falls back to its own backoff.
MAX_RETRY_AFTER = 60.0

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


def status_of(error: ServiceError) -> int:
    return error.status or _STATUS[error.code][0]


def retry_after_headers(seconds: float) -> dict[str, str]:
    capped = min(max(seconds, 0.0), MAX_RETRY_AFTER)
    return {
        "Retry-After": str(max(1, math.ceil(capped))),
        "retry-after-ms": str(max(1, round(capped * 1000))),
    }


def error_response(error: ServiceError) -> web.Response:
    status = status_of(error)
    body = {
        "error": {
            "message": error.message,
            "type": _STATUS[error.code][1],
            "param": error.param,
            "code": error.code.value,
        }
    }
    headers: dict[str, str] = {}
    if error.retry_after is not None or status in (429, 503):
        headers.update(retry_after_headers(error.retry_after if error.retry_after else 1.0))
    if error.should_retry is not None:
        headers["x-should-retry"] = "true" if error.should_retry else "false"
    return web.Response(
        status=status, text=json.dumps(body), content_type="application/json", headers=headers
    )


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
    return ServiceError(ErrorCode.INVALID_REQUEST, exc.reason or "Bad request.", status=exc.status)
