"""Issue 17 items 7 and 8 over raw sockets against a real daemon: a corrupt gzip/deflate body
is a 400 in OpenAI's shape, an over-limit Content-Length is a 413 at once (with or without
`Expect: 100-continue`)."""

from __future__ import annotations

import json
import socket
import time
import zlib
from collections.abc import Iterator

import pytest

from tests.daemon.conftest import KEYS
from tests.hardening.conftest import hardening_policy
from tests.process import Daemon

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("guard")
    policy = tmp / "policy.yaml"
    policy.write_text(hardening_policy())
    with Daemon(["--model", "sim", "--telemetry", "sim", "--store", "memory", "--policy",
                 str(policy), "--log-format", "json"], log_path=tmp / "d.log") as running:
        yield running


def _head(length: int, extra: str = "") -> bytes:
    return (
        "POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {KEYS['free']}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(lines[0].split()[1]), headers, rest[:length]


def _exchange(daemon: Daemon, payload: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
        sock.sendall(payload)
        return _read_response(sock)


def _code(body: bytes) -> str:
    return str(json.loads(body)["error"]["code"])


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_corrupt_compressed_body_is_a_400(daemon: Daemon, encoding: str) -> None:
    good = zlib.compress(json.dumps({"prompt": "a fox"}).encode())
    corrupt = good[:4] + b"\x00\xff" * 20 + good[-4:]
    if encoding == "gzip":
        corrupt = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + corrupt
    status, headers, body = _exchange(
        daemon, _head(len(corrupt), f"Content-Encoding: {encoding}\r\n") + corrupt)
    assert status == 400, body
    assert _code(body) == "invalid_request_error"
    assert json.loads(body)["error"]["param"] == "body"
    assert headers["content-type"].startswith("application/json")
    log = daemon.log_path.read_text() if daemon.log_path else ""
    assert "Traceback" not in log and "http.unhandled" not in log


def test_an_over_limit_content_length_is_refused_at_once(daemon: Daemon) -> None:
    started = time.monotonic()
    status, headers, body = _exchange(daemon, _head(10**12) + b"{")
    assert status == 413, body
    assert _code(body) == "payload_too_large"
    assert time.monotonic() - started < 2.0  # not after the 10 s body timeout
    assert headers.get("connection", "").lower() == "close"


def test_expect_100_continue_over_the_limit_gets_413_not_continue(daemon: Daemon) -> None:
    status, _, body = _exchange(daemon, _head(10 * 1024 * 1024, "Expect: 100-continue\r\n"))
    assert status == 413, body
    assert _code(body) == "payload_too_large"


def test_expect_100_continue_within_the_limit_continues(daemon: Daemon) -> None:
    payload = json.dumps({"prompt": "a fox", "size": "64x64", "steps": 2}).encode()
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        sock.sendall(_head(len(payload), "Expect: 100-continue\r\n"))
        status, _, _ = _read_response(sock)
        assert status == 100
        sock.sendall(payload)
        status, _, body = _read_response(sock)
    assert status == 200, body


def test_an_upload_route_keeps_its_own_limits(daemon: Daemon) -> None:
    # /v1/images/edits takes multipart uploads bounded part by part (max_upload_bytes), so a
    # body over the JSON limit is not refused up front there.
    head = (
        "POST /v1/images/edits HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {KEYS['free']}\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\n"
        f"Content-Length: {2 * 1024 * 1024}\r\nExpect: 100-continue\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
        sock.sendall(head)
        status, _, _ = _read_response(sock)
    assert status == 100
