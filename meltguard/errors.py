"""One error vocabulary for every layer; daemon/errors.py is the one place that maps it to HTTP."""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    INVALID_REQUEST = "invalid_request_error"
    INVALID_API_KEY = "invalid_api_key"
    PERMISSION_DENIED = "permission_denied"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    REQUEST_TIMEOUT = "request_timeout"
    RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"
    DAILY_QUOTA_EXCEEDED = "daily_quota_exceeded"
    SERVER_OVERLOADED = "server_overloaded"
    QUEUE_TIMEOUT = "queue_timeout"
    GPU_OUT_OF_MEMORY = "gpu_out_of_memory"
    QUOTA_STORE_UNAVAILABLE = "quota_store_unavailable"
    GENERATION_FAILED = "generation_failed"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL_ERROR = "internal_error"


class ServiceError(Exception):
    """An outcome a client is told about. `retry_after` is seconds (capped when rendered)."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        param: str | None = None,
        retry_after: float | None = None,
        should_retry: bool | None = None,
        status: int | None = None,
        quota: Any = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.retry_after = retry_after
        self.should_retry = should_retry
        self.status = status  # overrides the default status for the code (overload_status)
        self.quota = quota  # a values.QuotaOutcome when known, for the rate-limit headers


def invalid(param: str | None, message: str) -> ServiceError:
    return ServiceError(ErrorCode.INVALID_REQUEST, message, param=param)
