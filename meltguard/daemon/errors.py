"""The one place that maps the error vocabulary to HTTP responses in OpenAI's error shape."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping

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


_JSON = "application/json; charset=utf-8"
# A flood of refusals repeats a handful of messages (one tenant over its quota gets the same
# words until its window resets): each body is encoded once.
_BODIES: dict[tuple[str, str | None, ErrorCode], bytes] = {}
_BODIES_MAX = 256


def _body(message: str, param: str | None, code: ErrorCode) -> bytes:
    key = (message, param, code)
    body = _BODIES.get(key)
    if body is None:
        if len(_BODIES) >= _BODIES_MAX:
            _BODIES.clear()
        body = _BODIES[key] = json.dumps({
            "error": {"message": message, "type": _STATUS[code][1], "param": param,
                      "code": code.value},
        }).encode()
    return body


class _Answered:
    """The last error answered, with the rate-limit headers it came with, and its response's
    fields. A flood of refusals answers one error object (see the gate's refusal memory) with
    one headers mapping (see ratelimit_headers) again and again: its fields are built once.
    Errors are not changed once raised or returned, nor rate-limit headers once handed out
    (the mapping is read-only), so the objects' identities name them."""

    __slots__ = ("body", "error", "extra", "headers", "status")

    def __init__(self) -> None:
        self.error: ServiceError | None = None
        self.extra: Mapping[str, str] | None = None
        self.status = 500
        self.headers: dict[str, str] = {}  # handed to aiohttp, which copies it
        self.body = b""


_last = _Answered()


def error_response(
    error: ServiceError, extra_headers: Mapping[str, str] | None = None
) -> web.Response:
    """The error in OpenAI's shape; `extra_headers` (rate-limit fields) are added in the same
    step, since a refusal under a flood is answered as often as anything the daemon does."""
    last = _last
    if error is last.error and extra_headers is last.extra:
        return web.Response(status=last.status, body=last.body, headers=last.headers)
    status = error.status or _STATUS[error.code][0]
    headers = dict(extra_headers) if extra_headers else {}
    retry_after = error.retry_after
    if retry_after is not None or status in (429, 503):
        headers["Retry-After"], headers["retry-after-ms"] = _retry_fields(retry_after or 1.0)
    if error.should_retry is not None:
        headers["x-should-retry"] = "true" if error.should_retry else "false"
    headers["Content-Type"] = _JSON
    body = _body(error.message, error.param, error.code)
    last.error, last.extra, last.status, last.headers, last.body = (
        error, extra_headers, status, headers, body)
    return web.Response(status=status, body=body, headers=headers)


@functools.lru_cache(maxsize=256)
def _retry_fields(seconds: float) -> tuple[str, str]:
    """Retry-After and retry-after-ms. A flood of refusals repeats a few values (the 60 s cap
    above all), so each is formatted once."""
    capped = min(max(seconds, 0.0), MAX_RETRY_AFTER)
    return str(max(1, math.ceil(capped))), str(max(1, round(capped * 1000)))


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
