"""One error vocabulary for every layer; daemon/errors.py is the one place that maps it to HTTP."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

from meltguard.values import QuotaOutcome


class ErrorCode(StrEnum):
    """What a client is told went wrong: the `code` of OpenAI's error body, and the `reason`
    label in metrics and on the `admission.decided` line. Stable: clients and alerts match on
    these strings. The HTTP status of each is chosen in daemon/errors.py alone."""

    INVALID_REQUEST = "invalid_request_error"
    INVALID_API_KEY = "invalid_api_key"
    PERMISSION_DENIED = "permission_denied"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    REQUEST_TIMEOUT = "request_timeout"
    RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"
    DAILY_QUOTA_EXCEEDED = "daily_quota_exceeded"  # a window of a day or longer: don't retry
    SERVER_OVERLOADED = "server_overloaded"  # shed for GPU pressure: policy.overload_status
    QUEUE_TIMEOUT = "queue_timeout"
    GPU_OUT_OF_MEMORY = "gpu_out_of_memory"
    QUOTA_STORE_UNAVAILABLE = "quota_store_unavailable"
    GENERATION_FAILED = "generation_failed"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL_ERROR = "internal_error"


RETRY_AFTER_MIN = 1.0
RETRY_AFTER_MAX = 60.0  # the openai SDK ignores a longer Retry-After and retries at once


def clamp_retry(seconds: float) -> float:
    """Every Retry-After lies in [1, 60] s."""
    if math.isnan(seconds):
        return RETRY_AFTER_MIN
    return min(max(seconds, RETRY_AFTER_MIN), RETRY_AFTER_MAX)


@dataclass(frozen=True, slots=True)
class Refused:
    """A request refused: an answer, returned as a value by the admission gate.
    `retry_after` is seconds; `quota` the caller's windows when the store answered, for the
    rate-limit headers."""

    code: ErrorCode
    message: str
    retry_after: float | None = None
    param: str | None = None
    quota: QuotaOutcome | None = None

    def error(self) -> ServiceError:
        """The same refusal as an exception, for code paths that raise."""
        return ServiceError(self.code, self.message, param=self.param,
                            retry_after=self.retry_after, quota=self.quota)


class ServiceError(Exception):
    """An outcome a client is told about, raised where a handler cannot go on."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        param: str | None = None,
        retry_after: float | None = None,
        quota: QuotaOutcome | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.retry_after = retry_after
        self.quota = quota

    @property
    def refused(self) -> Refused:
        return Refused(self.code, self.message, self.retry_after, self.param, self.quota)


def invalid(param: str | None, message: str) -> ServiceError:
    return ServiceError(ErrorCode.INVALID_REQUEST, message, param=param)
