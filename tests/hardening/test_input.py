"""Hostile input at the HTTP edge: every one is a 4xx in OpenAI's error shape, never a 500,
and the daemon serves the next request as if nothing happened."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from typing import Any

import pytest

from tests.daemon.conftest import KEYS
from tests.hardening.conftest import Probe, client_for, hardening_policy

pytestmark = pytest.mark.asyncio

EMOJI = "\U0001f525"  # 4 bytes in UTF-8, 12 as a JSON \ud83d\udd25 escape

# (body, expected param); body is bytes sent verbatim, or an object sent as JSON.
HOSTILE: list[tuple[str, Any, str | None]] = [
    ("nul escape", {"prompt": "a\u0000b"}, "prompt"),
    ("nul only", {"prompt": "\u0000"}, "prompt"),
    ("raw nul byte", b'{"prompt": "a\x00b"}', None),
    ("invalid utf-8", b'{"prompt": "caf\xe9"}', None),
    ("overlong utf-8", b'{"prompt": "\xc0\xaf"}', None),
    ("truncated utf-8", b'{"prompt": "\xf0\x9f\x94"}', None),
    ("lone high surrogate", b'{"prompt": "a\\ud800b"}', "prompt"),
    ("lone low surrogate", b'{"prompt": "\\udc00"}', "prompt"),
    ("surrogate in user", b'{"prompt": "x", "user": "\\ud83d"}', "user"),
    ("1 MB of emoji", json.dumps({"prompt": EMOJI * 250_000}, ensure_ascii=False).encode(),
     "prompt"),
    ("deep nesting", b"[" * 200_000, None),
    ("deep object", b'{"prompt": ' + b'{"a": ' * 100_000, None),
    ("huge integer literal", b'{"prompt": "x", "n": ' + b"9" * 5000 + b"}", None),
    ("empty body", b"", None),
    ("json null", b"null", None),
    ("json array", b'[{"prompt": "x"}]', None),
    ("duplicate key", b'{"prompt": "x", "prompt": 5}', "prompt"),
    ("unknown key 1 MB long", json.dumps({"prompt": "x", "k" * 500_000: 1}).encode(), None),
    *[(f"n={value!r}", {"prompt": "x", "n": value}, "n") for value in
      (-1, 0, 5, 2**64, 10**400, 1.5, -0.5, "2", True, [], {})],
    ("n=1e400", b'{"prompt": "x", "n": 1e400}', "n"),
    ("n=NaN", b'{"prompt": "x", "n": NaN}', "n"),
    ("n=-Infinity", b'{"prompt": "x", "n": -Infinity}', "n"),
    *[(f"steps={value!r}", {"prompt": "x", "steps": value}, "steps") for value in
      (-5, 0, 51, 10**30, 2.5, "10", False)],
    *[(f"seed={value!r}", {"prompt": "x", "seed": value}, "seed") for value in
      (-1, 2**63, 2**200, 0.5, "7", [7])],
    *[(f"size={value!r}", {"prompt": "x", "size": value}, "size") for value in
      ("-64x64", "0x0", "64x-64", "99999999x99999999", "64.5x64", "\uff16\uff14x64",
       "64X64x64", "", "   ", "x", "64x64\u0000", "1e3x8", "8" * 1_000 + "x8",
       "1024x1024", "60x64", 64, 6.4, [64, 64], {"w": 64})],
    ("response_format=0", {"prompt": "x", "response_format": 0}, "response_format"),
    ("stream=0", {"prompt": "x", "stream": 0}, "stream"),
    ("model=1 MB", {"prompt": "x", "model": "m" * 900_000}, "model"),
]


async def _rig(aiohttp_client: Any, build: Any, **settings: Any) -> Probe:
    assembly = build(hardening_policy(), **settings)
    return Probe(await client_for(aiohttp_client, assembly), assembly)


def _assert_error_shape(body: Any) -> dict[str, Any]:
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    return dict(error)


@pytest.mark.parametrize(("payload", "param"), [(b, p) for _, b, p in HOSTILE],
                         ids=[name for name, _, _ in HOSTILE])
async def test_hostile_body_is_a_4xx_in_our_shape(
    aiohttp_client: Any, build: Any, payload: Any, param: str | None
) -> None:
    probe = await _rig(aiohttp_client, build)
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    probe.sent += 1
    resp = await probe.client.post(
        "/v1/images/generations", data=data,
        headers={"Authorization": f"Bearer {KEYS['pro']}", "Content-Type": "application/json"})
    error = _assert_error_shape(await resp.json())
    assert resp.status in (400, 413), error
    if resp.status == 400:
        assert error["code"] == "invalid_request_error"
        if param is not None:
            assert error["param"] == param, error
    # Nothing the client sent comes back at length.
    assert len(error["message"]) < 400, error["message"][:100]
    assert (await probe.generate("pro"))[0] == 200
    await probe.settled()


async def test_one_mb_of_escaped_emoji_is_413(aiohttp_client: Any, build: Any) -> None:
    probe = await _rig(aiohttp_client, build)
    body = json.dumps({"prompt": EMOJI * 250_000})  # ASCII escapes: about 3 MB
    probe.sent += 1
    resp = await probe.client.post("/v1/images/generations", data=body, headers={
        "Authorization": f"Bearer {KEYS['pro']}", "Content-Type": "application/json"})
    assert resp.status == 413
    assert _assert_error_shape(await resp.json())["code"] == "payload_too_large"
    await probe.settled()


async def test_gzip_bomb_is_refused_without_inflating(aiohttp_client: Any, build: Any) -> None:
    probe = await _rig(aiohttp_client, build)
    bomb = gzip.compress(b'{"prompt": "' + b"a" * (64 << 20) + b'"}', compresslevel=9)
    assert len(bomb) < 200_000
    probe.sent += 1
    resp = await probe.client.post("/v1/images/generations", data=bomb, headers={
        "Authorization": f"Bearer {KEYS['pro']}", "Content-Type": "application/json",
        "Content-Encoding": "gzip"})
    assert resp.status in (400, 413)
    _assert_error_shape(await resp.json())
    await probe.settled()


@pytest.mark.parametrize("authorization", [
    "Bearer " + "k" * 7000, "Bearer", "Bearer a b c", "bearer\tsk", "Basic " + "=" * 100,
    "Bearer \u00e9\u00e8", "Bearer sk-pro-tes", "Bearer sk-pro-testX", "Token sk-pro-test",
])
async def test_hostile_authorization_is_401(aiohttp_client: Any, build: Any,
                                            authorization: str) -> None:
    probe = await _rig(aiohttp_client, build)
    reader, writer = await asyncio.open_connection("127.0.0.1", probe.client.port)
    body = b'{"prompt": "x"}'
    writer.write(b"POST /v1/images/generations HTTP/1.1\r\nHost: t\r\n"
                 b"Content-Type: application/json\r\nAuthorization: "
                 + authorization.encode("utf-8")
                 + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    await writer.drain()
    status, payload = _parse(await asyncio.wait_for(reader.read(), 5))
    writer.close()
    probe.sent += 1
    assert status == 401
    assert _assert_error_shape(payload)["code"] == "invalid_api_key"
    assert "k" * 20 not in json.dumps(payload)
    await probe.settled()


async def test_body_that_never_finishes_is_408(aiohttp_client: Any, build: Any) -> None:
    probe = await _rig(aiohttp_client, build, body_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", probe.client.port)
    writer.write(b"POST /v1/images/generations HTTP/1.1\r\nHost: t\r\n"
                 b"Authorization: Bearer " + KEYS["pro"].encode() + b"\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                 b'{"prompt": "')
    await writer.drain()
    started = time.monotonic()
    status, headers, payload = await asyncio.wait_for(_read_response(reader), 10)
    elapsed = time.monotonic() - started
    writer.close()
    probe.sent += 1
    assert status == 408
    assert _assert_error_shape(payload)["code"] == "request_timeout"
    assert headers.get("connection") == "close"  # the stream is out of step; never reuse it
    assert 0.4 < elapsed < 3
    assert (await probe.generate("pro"))[0] == 200
    await probe.settled()


async def test_chunked_body_that_never_ends_is_408(aiohttp_client: Any, build: Any) -> None:
    probe = await _rig(aiohttp_client, build, body_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", probe.client.port)
    writer.write(b"POST /v1/images/generations HTTP/1.1\r\nHost: t\r\n"
                 b"Authorization: Bearer " + KEYS["pro"].encode() + b"\r\n"
                 b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"5\r\n{\"pro\r\n")
    await writer.drain()
    for _ in range(3):  # a trickle that never completes does not reset the deadline
        await asyncio.sleep(0.15)
        writer.write(b"1\r\na\r\n")
        await writer.drain()
    status, _, payload = await asyncio.wait_for(_read_response(reader), 10)
    writer.close()
    probe.sent += 1
    assert status == 408
    assert _assert_error_shape(payload)["code"] == "request_timeout"
    await probe.settled()


async def test_unauthenticated_slow_body_is_refused_at_once(aiohttp_client: Any, build: Any
                                                            ) -> None:
    """No key, no waiting: the body of a caller we would refuse is never awaited."""
    probe = await _rig(aiohttp_client, build, body_timeout=5)
    reader, writer = await asyncio.open_connection("127.0.0.1", probe.client.port)
    writer.write(b"POST /v1/images/generations HTTP/1.1\r\nHost: t\r\n"
                 b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    writer.close()
    probe.sent += 1
    assert head.startswith(b"HTTP/1.1 401")
    await probe.settled()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], Any]:
    """One response by its Content-Length, as a client does; the server may keep the socket
    open afterwards to drain the unread request body (aiohttp lingers up to 10 s)."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    lines = head.split("\r\n")
    headers = {k.strip().lower(): v.strip()
               for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers["content-length"]))
    return int(lines[0].split(" ", 2)[1]), headers, json.loads(body)


def _parse(raw: bytes) -> tuple[int, Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)
