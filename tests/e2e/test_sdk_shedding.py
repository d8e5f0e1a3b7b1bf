"""The official `openai` SDK, unchanged, against a daemon that sheds, rate-limits and refuses:
its error classes carry our codes, its retries wait what our Retry-After says, and
`x-should-retry: false` stops it from retrying a daily quota refusal."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import openai
import pytest
from openai.types import ImagesResponse

from tests.e2e.conftest import KEYS, Daemons, metric, policy_yaml, pressure_level, wait_for
from tests.fakenvml import FakeNvml
from tests.process import Daemon

pytestmark = pytest.mark.slow

HIGH_DWELL = 4.0
# The SDK sleeps exactly retry-after-ms; what a loaded 2-core box adds is scheduling noise.
RETRY_TOLERANCE = 0.35
REQUESTS = "meltguard_requests_total"


@dataclass
class Exchange:
    status: int
    retry_after_ms: int | None
    sent_at: float
    answered_at: float


@dataclass
class Recorder:
    """httpx event hooks on the SDK's own client: when each attempt left and what came back."""

    exchanges: list[Exchange] = field(default_factory=list)
    _sent: list[float] = field(default_factory=list)

    def on_request(self, request: object) -> None:
        self._sent.append(time.monotonic())

    def on_response(self, response: object) -> None:
        headers = response.headers  # type: ignore[attr-defined]
        ms = headers.get("retry-after-ms")
        self.exchanges.append(Exchange(
            status=response.status_code,  # type: ignore[attr-defined]
            retry_after_ms=int(ms) if ms is not None else None,
            sent_at=self._sent[-1],
            answered_at=time.monotonic(),
        ))


def sdk(daemon: Daemon, tenant: str, *, max_retries: int,
        recorder: Recorder | None = None) -> openai.OpenAI:
    http_client = None
    if recorder is not None:
        http_client = openai.DefaultHttpxClient(
            event_hooks={"request": [recorder.on_request], "response": [recorder.on_response]}
        )
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key=KEYS[tenant][1],
                         max_retries=max_retries, timeout=30.0, http_client=http_client)


def generate(client: openai.OpenAI) -> ImagesResponse:
    return client.images.generate(prompt="a lighthouse", size="64x64",
                                  response_format="b64_json", extra_body={"steps": 2})


@pytest.fixture
def daemon(daemons: Daemons) -> Iterator[Daemon]:
    d = daemons.make(
        policy=policy_yaml(free_quota="{limit: 3, per: 1d}", metered_quota="{limit: 1, per: 3s}",
                           elevated_dwell="0s", high_dwell=f"{HIGH_DWELL:g}s"),
        store="memory",
    )
    daemons.start(d)
    wait_for(lambda: pressure_level(d) == 0, "normal pressure")
    yield d


def test_shedding_is_an_internal_server_error_and_the_retry_waits_our_retry_after(
    daemon: Daemon, fake_gpu: FakeNvml
) -> None:
    fake_gpu.update({"0.temperature": 88})
    wait_for(lambda: pressure_level(daemon) == 2, "high pressure")

    with pytest.raises(openai.InternalServerError) as caught:
        generate(sdk(daemon, "free-a", max_retries=0))
    err = caught.value
    assert err.status_code == 503
    assert err.code == "server_overloaded"
    assert isinstance(err.body, dict) and err.body["code"] == "server_overloaded"
    assert err.body["type"] == "server_error" and err.body["message"]
    assert 1 <= int(err.response.headers["retry-after"]) <= 60
    assert err.response.headers.get("x-request-id")
    assert generate(sdk(daemon, "pro", max_retries=0)).data

    # Cooled below every exit line, the level is held only by min_dwell: Retry-After is then
    # what is left of the dwell, short enough for the SDK's retry to be timed.
    fake_gpu.update({"0.temperature": 60})
    wait_for(lambda: metric(daemon, "meltguard_gpu_temperature_celsius", {"gpu": "0"}) == 60,
             "the daemon to read 60 °C")
    before = metric(daemon, REQUESTS, {"tier": "free", "code": "503"})
    recorder = Recorder()
    try:
        generate(sdk(daemon, "free-a", max_retries=1, recorder=recorder))
    except openai.InternalServerError as exc:
        # The retry may land a tick before the level drops; still our code, not a 500.
        assert exc.code == "server_overloaded"
    first, second = _two_attempts(recorder)
    assert first.status == 503 and first.retry_after_ms is not None
    assert first.retry_after_ms <= HIGH_DWELL * 1000, "Retry-After was not the dwell left"
    waited = second.sent_at - first.answered_at
    assert waited == pytest.approx(first.retry_after_ms / 1000, abs=RETRY_TOLERANCE)
    assert second.status in (200, 503)
    after = metric(daemon, REQUESTS, {"tier": "free", "code": "503"})
    assert after - before == (1 if second.status == 200 else 2)


def test_rate_limit_is_a_rate_limit_error_and_the_retry_waits_for_the_window(
    daemon: Daemon,
) -> None:
    client = sdk(daemon, "metered", max_retries=0)
    # One image per 3 s window: keep asking until one is refused (a window may turn over
    # between two asks).
    for _ in range(5):
        try:
            generate(client)
        except openai.RateLimitError as exc:
            err = exc
            break
    else:
        pytest.fail("the metered tier was never rate limited")
    assert err.status_code == 429
    assert err.code == "rate_limit_exceeded"
    assert isinstance(err.body, dict) and err.body["type"] == "rate_limit_error"
    assert err.response.headers.get("x-should-retry") is None
    ms = int(err.response.headers["retry-after-ms"])
    assert 1000 <= ms <= 3000

    for _ in range(3):
        recorder = Recorder()
        with contextlib.suppress(openai.RateLimitError):
            generate(sdk(daemon, "metered", max_retries=1, recorder=recorder))
        if len(recorder.exchanges) == 2:
            break
        # The first attempt opened a fresh window and was served: nothing to time. The next
        # try starts inside that window, so it is refused.
    first, second = _two_attempts(recorder)
    assert first.status == 429 and first.retry_after_ms is not None
    waited = second.sent_at - first.answered_at
    assert waited == pytest.approx(first.retry_after_ms / 1000, abs=RETRY_TOLERANCE)
    # The window Retry-After pointed at has begun, so the retry is served.
    assert second.status == 200


def test_daily_quota_refusal_is_not_retried(daemon: Daemon) -> None:
    client = sdk(daemon, "free-b", max_retries=0)
    for _ in range(3):
        generate(client)
    before_429 = metric(daemon, REQUESTS, {"tier": "free", "code": "429"})
    before_200 = metric(daemon, REQUESTS, {"tier": "free", "code": "200"})

    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as caught:
        generate(sdk(daemon, "free-b", max_retries=2))  # the SDK's default would retry twice
    elapsed = time.monotonic() - started
    err = caught.value
    assert err.code == "daily_quota_exceeded"
    assert err.response.headers["x-should-retry"] == "false"
    assert "reference images per day" in str(err.body["message"])  # type: ignore[index]
    # Exactly one request reached the daemon, and the SDK did not sleep on a Retry-After.
    assert metric(daemon, REQUESTS, {"tier": "free", "code": "429"}) - before_429 == 1
    assert metric(daemon, REQUESTS, {"tier": "free", "code": "200"}) == before_200
    assert elapsed < 1.0


def _two_attempts(recorder: Recorder) -> tuple[Exchange, Exchange]:
    assert len(recorder.exchanges) == 2, (
        f"expected one attempt and one retry, got {[e.status for e in recorder.exchanges]}"
    )
    return recorder.exchanges[0], recorder.exchanges[1]
