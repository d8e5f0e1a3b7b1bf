"""The one map from the error vocabulary to HTTP: OpenAI's error body, the status of each code,
Retry-After in [1, 60] s, and what an engine failure means to a client."""

from __future__ import annotations

import asyncio
import json

import pytest

from meltguard.daemon.errors import (
    engine_detail,
    engine_error,
    error_response,
    outcome_of,
    status_of,
)
from meltguard.errors import ErrorCode, Refused, ServiceError
from meltguard.inference.errors import EngineFailure, EngineOutOfMemory


def _over_quota(retry_after: float) -> Refused:
    return Refused(ErrorCode.DAILY_QUOTA_EXCEEDED, "Quota exceeded.", retry_after)


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


@pytest.mark.parametrize(("seconds", "header", "ms"), [
    (None, "1", "1000"), (0.2, "1", "1000"), (59.5, "60", "59500"), (3600.0, "60", "60000")])
def test_every_retry_after_lies_between_one_and_sixty_seconds(
    seconds: float | None, header: str, ms: str,
) -> None:
    response = error_response(Refused(ErrorCode.QUEUE_TIMEOUT, "Busy.", seconds))
    assert (response.headers["Retry-After"], response.headers["retry-after-ms"]) == (header, ms)
    assert "x-should-retry" not in response.headers


def test_the_status_comes_from_the_code_and_the_overload_status() -> None:
    overloaded = Refused(ErrorCode.SERVER_OVERLOADED, "Hot.", 5.0)
    assert status_of(overloaded) == 503
    assert error_response(overloaded, overload_status=429).status == 429
    assert status_of(ServiceError(ErrorCode.INVALID_API_KEY, "No.")) == 401
    assert error_response(Refused(ErrorCode.INVALID_REQUEST, "Bad.", param="n")).status == 400
    for code in ErrorCode:
        assert 400 <= status_of(Refused(code, "x")) < 600


def test_engine_failures_in_the_vocabulary() -> None:
    oom = engine_error(EngineOutOfMemory("CUDA out of memory"), retry_after=7.0)
    assert oom.code is ErrorCode.GPU_OUT_OF_MEMORY and oom.retry_after == 7.0
    failed = engine_error(EngineFailure("boom"), retry_after=7.0)
    assert failed.code is ErrorCode.GENERATION_FAILED and failed.retry_after is None
    assert outcome_of(EngineOutOfMemory()) == "dropped"
    assert outcome_of(asyncio.CancelledError()) == "ignored"
    assert outcome_of(EngineFailure()) == "failed"


def test_the_engine_detail_keeps_prompts_private() -> None:
    exc = ValueError("cannot tokenize 'a secret fox\\n'")
    assert engine_detail(exc, "a secret fox\n") == "ValueError: cannot tokenize '<prompt>'"
    assert "secret" in engine_detail(exc, None)
