"""Every route, every bad input, the edge headers, and the event loop staying free."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from typing import Any

import pytest
from PIL import Image

from tests.daemon.conftest import ScriptedEngine, auth, policy_yaml, wait_until

pytestmark = pytest.mark.asyncio


async def _client(aiohttp_client: Any, build: Any, **kwargs: Any) -> Any:
    assembly = build(**kwargs)
    client = await aiohttp_client(assembly.app)
    await wait_until(lambda: assembly.runtime.engine.health().ready)
    return client


def _png_size(b64: str) -> tuple[int, int]:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as image:
        return image.size


async def test_generate_b64_with_headers(aiohttp_client: Any, build: Any) -> None:
    client = await _client(aiohttp_client, build)
    resp = await client.post("/v1/images/generations", headers=auth("pro"),
                             json={"prompt": "a red fox", "n": 2, "size": "64x64", "seed": 7})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert len(body["data"]) == 2
    assert all(_png_size(item["b64_json"]) == (64, 64) for item in body["data"])
    assert isinstance(body["created"], int)
    assert body["usage"]["images"] == 2
    assert resp.headers["x-request-id"]
    assert resp.headers["x-ratelimit-limit-requests"] == "1000"
    assert int(resp.headers["x-ratelimit-remaining-requests"]) == 998
    assert resp.headers["RateLimit-Policy"] == '"day";q=1000;w=86400'
    assert resp.headers["RateLimit"].startswith('"day";r=998;t=')


async def test_same_seed_same_pixels(aiohttp_client: Any, build: Any) -> None:
    client = await _client(aiohttp_client, build)
    bodies = []
    for _ in range(2):
        resp = await client.post("/v1/images/generations", headers=auth("pro"),
                                 json={"prompt": "same", "size": "64x64", "seed": 42})
        bodies.append((await resp.json())["data"][0]["b64_json"])
    assert bodies[0] == bodies[1]


async def test_url_format_served_then_unknown(aiohttp_client: Any, build: Any) -> None:
    client = await _client(aiohttp_client, build)
    resp = await client.post("/v1/images/generations", headers=auth("pro"),
                             json={"prompt": "x", "size": "64x64", "response_format": "url"})
    url = (await resp.json())["data"][0]["url"]
    path = url[url.index("/v1/images/files/"):]
    image = await client.get(path)
    assert image.status == 200 and image.content_type == "image/png"
    missing = await client.get("/v1/images/files/nope.png")
    assert missing.status == 404
    assert (await missing.json())["error"]["code"] == "not_found"


async def test_models_quota_health_ready_metrics_openapi(aiohttp_client: Any, build: Any) -> None:
    client = await _client(aiohttp_client, build)
    models = await (await client.get("/v1/models", headers=auth("free"))).json()
    assert models["data"][0]["id"] == "sim"
    await client.post("/v1/images/generations", headers=auth("free"),
                      json={"prompt": "x", "size": "64x64"})
    quota = await (await client.get("/v1/quota", headers=auth("free"))).json()
    assert quota["tier"] == "free" and quota["tenant"] == "free-tenant"
    assert quota["windows"][0]["used"] == pytest.approx(1.0)
    assert quota["windows"][0]["remaining"] == pytest.approx(99.0)
    assert (await (await client.get("/healthz")).json())["status"] == "ok"
    ready = await client.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["engine"]["ready"] is True
    text = await (await client.get("/metrics")).text()
    assert 'meltguard_images_generated_total{tier="free"} 1.0' in text
    assert 'meltguard_requests_total{code="200",tier="free"}' in text
    assert "meltguard_generation_seconds_count" in text
    spec = await (await client.get("/openapi.json")).json()
    assert "/v1/images/generations" in spec["paths"]


async def test_unknown_route_and_method_in_error_shape(aiohttp_client: Any, build: Any) -> None:
    client = await _client(aiohttp_client, build)
    for resp in (await client.get("/v2/nothing"), await client.get("/v1/images/generations")):
        body = await resp.json()
        assert resp.status in (404, 405)
        assert set(body["error"]) == {"message", "type", "param", "code"}


async def test_missing_and_unknown_key_same_401(aiohttp_client: Any, build: Any) -> None:
    client = await _client(aiohttp_client, build)
    payload = {"prompt": "x"}
    responses = [
        await client.post("/v1/images/generations", json=payload),
        await client.post("/v1/images/generations", json=payload,
                          headers={"Authorization": "Bearer sk-unknown"}),
        await client.post("/v1/images/generations", json=payload,
                          headers={"Authorization": "Basic abc"}),
    ]
    bodies = [await r.json() for r in responses]
    assert [r.status for r in responses] == [401, 401, 401]
    assert {b["error"]["code"] for b in bodies} == {"invalid_api_key"}
    assert "sk-unknown" not in json.dumps(bodies)


BAD_BODIES = [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x" * 4001}, "prompt"),
    ({"prompt": "x", "size": "big"}, "size"),
    ({"prompt": "x", "size": "60x64"}, "size"),
    ({"prompt": "x", "size": "1024x1024"}, "size"),
    ({"prompt": "x", "size": 64}, "size"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 5}, "n"),
    ({"prompt": "x", "n": 1.5}, "n"),
    ({"prompt": "x", "n": True}, "n"),
    ({"prompt": "x", "response_format": "jpeg"}, "response_format"),
    ({"prompt": "x", "steps": 0}, "steps"),
    ({"prompt": "x", "steps": 51}, "steps"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "model": "dall-e-3"}, "model"),
    ({"prompt": "x", "bogus": 1}, "bogus"),
]


@pytest.mark.parametrize(("payload", "param"), BAD_BODIES)
async def test_bad_input_is_400_with_param(
    aiohttp_client: Any, build: Any, payload: dict[str, Any], param: str
) -> None:
    client = await _client(aiohttp_client, build)
    resp = await client.post("/v1/images/generations", headers=auth("pro"), json=payload)
    body = await resp.json()
    assert resp.status == 400, body
    assert body["error"]["code"] == "invalid_request_error"
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == param
    assert body["error"]["message"]


@pytest.mark.parametrize(
    ("data", "content_type", "fragment"),
    [
        (b"{not json", "application/json", "not valid JSON"),
        (b"[1, 2]", "application/json", "JSON object"),
        (b'"text"', "application/json", "JSON object"),
        (b'{"prompt": "x"}', "text/plain", "Content-Type"),
        (b"\xff\xfe\x00", "application/json", "UTF-8"),
    ],
)
async def test_malformed_bodies(
    aiohttp_client: Any, build: Any, data: bytes, content_type: str, fragment: str
) -> None:
    client = await _client(aiohttp_client, build)
    resp = await client.post("/v1/images/generations", data=data,
                             headers={**auth("pro"), "Content-Type": content_type})
    body = await resp.json()
    assert resp.status == 400
    assert fragment in body["error"]["message"]


async def test_body_over_one_mib_is_413(aiohttp_client: Any, build: Any) -> None:
    client = await _client(aiohttp_client, build)
    big = json.dumps({"prompt": "x" * (1 << 20)})
    resp = await client.post("/v1/images/generations", data=big,
                             headers={**auth("pro"), "Content-Type": "application/json"})
    assert resp.status == 413
    assert (await resp.json())["error"]["code"] == "payload_too_large"


async def test_healthz_answers_while_generation_runs(aiohttp_client: Any, build: Any) -> None:
    release = asyncio.Event()
    order: list[str] = []

    async def slow(job: Any) -> list[bytes]:
        await release.wait()
        return [b"png"] * job.n

    engine = ScriptedEngine(slow)
    client = await _client(aiohttp_client, build, engine=engine)

    async def generate() -> None:
        resp = await client.post("/v1/images/generations", headers=auth("pro"),
                                 json={"prompt": "slow", "size": "64x64"})
        order.append(f"generation {resp.status}")

    task = asyncio.create_task(generate())
    await wait_until(lambda: len(engine.calls) == 1)
    health = await client.get("/healthz")
    order.append(f"healthz {health.status}")
    release.set()
    await task
    assert order == ["healthz 200", "generation 200"]


async def test_engine_failure_refunds_and_is_500_shape(aiohttp_client: Any, build: Any) -> None:
    async def broken(job: Any) -> list[bytes]:
        raise RuntimeError("boom")

    client = await _client(aiohttp_client, build, engine=ScriptedEngine(broken))
    resp = await client.post("/v1/images/generations", headers=auth("free"),
                             json={"prompt": "x", "size": "64x64"})
    body = await resp.json()
    assert resp.status == 500
    assert body["error"]["code"] == "generation_failed"
    assert "boom" not in json.dumps(body)
    await asyncio.sleep(0.05)
    quota = await (await client.get("/v1/quota", headers=auth("free"))).json()
    assert quota["windows"][0]["used"] == pytest.approx(0.0)


async def test_anonymous_tier_when_policy_allows(aiohttp_client: Any, build: Any) -> None:
    client = await _client(aiohttp_client, build, policy=policy_yaml(anonymous="free"))
    resp = await client.post("/v1/images/generations", json={"prompt": "x", "size": "64x64"})
    assert resp.status == 200
    assert "x-ratelimit-remaining-requests" in resp.headers


async def test_a_flood_of_refusals_is_answered_in_full_with_one_line_per_request(
    aiohttp_client: Any, build: Any
) -> None:
    from structlog.testing import capture_logs

    with capture_logs() as logs:
        client = await _client(aiohttp_client, build,
                               policy=policy_yaml(free_quotas="[{limit: 1, per: 1d}]"))
        ok = await client.post("/v1/images/generations", headers=auth("free"),
                               json={"prompt": "a fox", "size": "64x64"})
        assert ok.status == 200
        for _ in range(5):
            resp = await client.post("/v1/images/generations", headers=auth("free"),
                                     json={"prompt": "a fox", "size": "64x64"})
            assert resp.status == 429
            body = await resp.json()
            assert body["error"]["code"] == "daily_quota_exceeded"
            assert resp.headers["x-should-retry"] == "false"
            assert 1 <= int(resp.headers["Retry-After"]) <= 60
            assert resp.headers["RateLimit"].startswith('"day";r=0;t=')
        await client.close()
    # One line per request: the decision and the answer together.
    decided = [line for line in logs if line["event"] == "admission.decided"]
    assert [(line["decision"], line["status"]) for line in decided] == [
        ("admit", 200)] + [("reject", 429)] * 5
    assert all(line["reason"] == "daily_quota_exceeded" for line in decided[1:])
    assert not any(line["event"] == "http.request" for line in logs)
