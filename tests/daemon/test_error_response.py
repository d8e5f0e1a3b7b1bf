"""error_response: OpenAI's error shape with the refusal's headers, and the memo that answers a
flood of one refusal without building its fields again."""

from __future__ import annotations

import json

from meltguard.daemon.errors import error_response
from meltguard.errors import ErrorCode, ServiceError


def _over_quota(retry_after: float) -> ServiceError:
    return ServiceError(ErrorCode.DAILY_QUOTA_EXCEEDED, "Quota exceeded.",
                        retry_after=retry_after, should_retry=False)


def test_a_refusal_in_openai_shape_with_its_headers() -> None:
    response = error_response(_over_quota(12.2), {"RateLimit": '"day";r=0;t=13'})
    assert response.status == 429
    assert response.headers["Retry-After"] == "13"
    assert response.headers["retry-after-ms"] == "12200"
    assert response.headers["x-should-retry"] == "false"
    assert response.headers["RateLimit"] == '"day";r=0;t=13'
    assert response.content_type == "application/json"
    assert response.body is not None
    assert json.loads(bytes(response.body)) == {"error": {
        "message": "Quota exceeded.", "type": "rate_limit_error", "param": None,
        "code": "daily_quota_exceeded"}}


def test_a_repeated_refusal_gets_equal_answers_of_its_own() -> None:
    error, headers = _over_quota(60.0), {"RateLimit": '"day";r=0;t=60'}
    first = error_response(error, headers)
    first.headers["x-request-id"] = "the edge adds this to one response"
    second = error_response(error, headers)
    assert second is not first
    assert "x-request-id" not in second.headers
    assert second.status == first.status and second.body == first.body
    assert dict(second.headers) == {k: v for k, v in first.headers.items()
                                    if k != "x-request-id"}


def test_another_error_or_other_headers_are_answered_afresh() -> None:
    headers = {"RateLimit": '"day";r=0;t=60'}
    assert error_response(_over_quota(60.0), headers).headers["Retry-After"] == "60"
    assert error_response(_over_quota(5.0), headers).headers["Retry-After"] == "5"
    error = _over_quota(5.0)
    error_response(error, headers)
    later = error_response(error, {"RateLimit": '"day";r=0;t=59'})
    assert later.headers["RateLimit"] == '"day";r=0;t=59'
    assert error_response(error).headers.get("RateLimit") is None
