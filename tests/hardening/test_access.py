"""Who gets in: keys exist only as SHA-256 in the policy and are compared in constant time,
keys and (by default) prompts never reach the log, admin routes need the admin key from a
loopback peer, and every way of holding the wrong key gets the same 401."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from meltguard.admission import auth as auth_module
from meltguard.admission.auth import KeyRing
from meltguard.cli import build_parser
from meltguard.daemon.policy_file import PolicyFileError, load_policy_file
from meltguard.daemon.settings import Settings
from meltguard.errors import ServiceError
from tests.daemon.conftest import KEYS, sha
from tests.hardening.conftest import (
    ADMIN,
    ADMIN_KEY,
    Probe,
    auth,
    client_for,
    hardening_policy,
)
from tests.process import Daemon

MARKER = "zebra-kaleidoscope-7f3a"  # a prompt no log line has any other reason to contain


# -- keys in the policy -----------------------------------------------------------------------


@pytest.mark.parametrize("entry", [
    '{key: "sk-live-plaintext-secret", tenant: t, tier: pro}',
    '{key_sha256: "sk-live-plaintext-secret", tenant: t, tier: pro}',
    '{key_sha256: "' + "a" * 63 + '", tenant: t, tier: pro}',
])
def test_policy_takes_keys_only_as_sha256(tmp_path: Path, entry: str) -> None:
    text = hardening_policy().replace("api_keys:\n", f"api_keys:\n  - {entry}\n")
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyFileError) as caught:
        load_policy_file(path)
    assert "sk-live-plaintext-secret" not in str(caught.value)  # errors are logged on reload
    assert "key_sha256" in str(caught.value)


def test_keys_are_compared_in_constant_time(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Every configured hash is compared, with hmac.compare_digest on fixed-length digests,
    whichever key (if any) matches, so timing says nothing about which or how much matched."""
    path = tmp_path / "policy.yaml"
    path.write_text(hardening_policy())
    ring = KeyRing(load_policy_file(path).policy)
    compared: list[tuple[int, int]] = []
    real = auth_module.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", counting)
    counts = []
    for header in (f"Bearer {KEYS['free']}", f"Bearer {KEYS['pro']}", "Bearer sk-unknown",
                   "Bearer " + "x" * 5000, "Basic abc"):
        compared.clear()
        with contextlib.suppress(ServiceError):
            ring.authenticate(header, "peer")
        counts.append(len(compared))
        assert set(compared) == {(32, 32)}, header
    assert counts == [len(KEYS)] * 5
    compared.clear()
    assert ring.is_admin(f"Bearer {ADMIN_KEY}") and not ring.is_admin("Bearer nope")
    assert set(compared) == {(32, 32)}


# -- the same 401 for every wrong key ---------------------------------------------------------


async def test_unknown_key_and_key_whose_tier_vanished_get_one_401(
    aiohttp_client: Any, build: Any, tmp_path: Path
) -> None:
    """A known key whose tier a reload removed, mid-request, is refused exactly like a key
    nobody ever issued: nothing tells a prober that the key was once good."""
    assembly = build(hardening_policy())
    probe = Probe(await client_for(aiohttp_client, assembly), assembly)
    unknown = await probe.post(None, headers={"Authorization": "Bearer sk-never-issued"})
    unknown_body = await unknown.read()
    assert unknown.status == 401

    reader, writer = await asyncio.open_connection("127.0.0.1", probe.client.port)
    body = json.dumps({"prompt": "x", "size": "64x64"}).encode()
    writer.write(b"POST /v1/images/generations HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                 b"Authorization: Bearer " + KEYS["plus"].encode() + b"\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                 + body[:5])
    await writer.drain()
    await asyncio.sleep(0.2)  # authenticated as plus, now waiting for the rest of the body
    without_plus = (hardening_policy()
                    .replace(f'  - {{key_sha256: "{sha(KEYS["plus"])}", tenant: plus-tenant, '
                             "tier: plus}\n", "")
                    .replace("  plus: {priority: 1,", "  gold: {priority: 1,")
                    .replace("plus: {reject: true}", "gold: {reject: true}"))
    await asyncio.to_thread(Path(assembly.runtime.settings.policy or "").write_text,
                            without_plus)
    assert assembly.runtime.reload("test")
    writer.write(body[5:])
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    probe.sent += 1
    head, _, vanished_body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401")
    assert vanished_body == unknown_body
    await probe.settled()


async def test_missing_unknown_and_malformed_keys_share_one_shape(
    aiohttp_client: Any, build: Any
) -> None:
    assembly = build(hardening_policy())
    probe = Probe(await client_for(aiohttp_client, assembly), assembly)
    headers: list[dict[str, str]] = [
        {}, {"Authorization": "Bearer sk-unknown"}, {"Authorization": "Basic c2s6c2s="},
        {"Authorization": f"Bearer {ADMIN_KEY}"},  # the admin key is not an API key
    ]
    bodies = []
    for header in headers:
        resp = await probe.post(None, headers=header)
        assert resp.status == 401
        assert "Retry-After" not in resp.headers
        bodies.append((await resp.json())["error"])
    assert {(b["type"], b["code"], b["param"]) for b in bodies} == {
        ("invalid_request_error", "invalid_api_key", None)}
    # Only "you sent nothing" reads differently; every wrong key reads the same.
    assert len({b["message"] for b in bodies[1:]}) == 1
    await probe.settled()


# -- admin ------------------------------------------------------------------------------------


def _peer(address: str) -> Any:
    @web.middleware
    async def from_peer(request: web.Request, handler: Any) -> web.StreamResponse:
        return await handler(request.clone(remote=address))
    return from_peer


@pytest.mark.asyncio
async def test_admin_needs_the_admin_key(aiohttp_client: Any, build: Any) -> None:
    assembly = build(hardening_policy())
    client = await client_for(aiohttp_client, assembly)
    refusals = []
    for header in ({}, {"Authorization": "Bearer sk-unknown"}, auth("pro")):
        for method, path in (("GET", "/admin/state"), ("POST", "/admin/reload")):
            resp = await client.request(method, path, headers=header)
            assert resp.status == 401, (header, path)
            refusals.append(await resp.read())
    assert len(set(refusals)) == 1  # a user's key and a made-up one look alike
    state = await client.get("/admin/state", headers=ADMIN)
    assert state.status == 200
    process = (await state.json())["process"]
    assert process["asyncio_tasks"] > 0 and process["rss_bytes"] > 0
    assert (await client.post("/admin/reload", headers=ADMIN)).status == 200


@pytest.mark.asyncio
async def test_admin_without_an_admin_key_in_the_policy_is_closed(
    aiohttp_client: Any, build: Any
) -> None:
    client = await client_for(aiohttp_client, build(hardening_policy(admin=False)))
    for header in ({}, ADMIN, auth("pro")):
        assert (await client.get("/admin/state", headers=header)).status == 401


@pytest.mark.asyncio
@pytest.mark.parametrize(("peer", "admin_remote", "status"), [
    ("203.0.113.7", False, 403),
    ("2001:db8::1", False, 403),
    ("::ffff:203.0.113.7", False, 403),
    ("::ffff:127.0.0.1", False, 200),  # a dual-stack listener's view of a local client
    ("127.0.0.2", False, 200),
    ("::1", False, 200),
    ("203.0.113.7", True, 200),
])
async def test_admin_answers_loopback_peers_unless_configured(
    aiohttp_client: Any, build: Any, peer: str, admin_remote: bool, status: int
) -> None:
    assembly = build(hardening_policy(), admin_remote=admin_remote)
    assembly.app.middlewares.insert(0, _peer(peer))
    client = await client_for(aiohttp_client, assembly)
    resp = await client.get("/admin/state", headers=ADMIN)
    assert resp.status == status
    if status == 403:
        assert (await resp.json())["error"]["code"] == "permission_denied"


def test_listens_on_loopback_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MELTGUARD_HOST", raising=False)
    monkeypatch.delenv("MELTGUARD_ADMIN_REMOTE", raising=False)
    args = build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and Settings().host == "127.0.0.1"
    assert args.admin_remote is False and Settings().admin_remote is False


# -- what reaches the log ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_unparseable_header_never_logs_its_value(
    aiohttp_client: Any, build: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp refuses a header with a NUL itself, quoting the raw bytes in its log line:
    with an Authorization header, that would be the key."""
    client = await client_for(aiohttp_client, build(hardening_policy()))
    reader, writer = await asyncio.open_connection("127.0.0.1", client.port)
    with caplog.at_level(logging.DEBUG), capture_logs() as logs:
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer "
                     + KEYS["pro"].encode() + b"\x00\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert head.split(b" ", 2)[1] == b"400"
    assert KEYS["pro"] not in caplog.text
    assert any(entry["event"] == "http.malformed_request" for entry in logs)
    assert KEYS["pro"] not in repr(logs)


def _policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(hardening_policy(anonymous="free"))
    return path


@pytest.fixture
def logged_daemon(tmp_path: Path) -> Iterator[Daemon]:
    daemon = Daemon(["--model", "sim", "--telemetry", "sim", "--store", "memory",
                     "--policy", str(_policy_file(tmp_path))], log_path=tmp_path / "d.log")
    with daemon:
        yield daemon


def _exercise(daemon: Daemon) -> None:
    """One of everything that carries a key or a prompt past the daemon."""
    prompt = {"prompt": f"a {MARKER} at dawn", "size": "64x64"}
    for key in (*KEYS.values(), "sk-never-issued-" + MARKER, ADMIN_KEY):
        daemon.request("POST", "/v1/images/generations", prompt,
                       headers={"Authorization": f"Bearer {key}"})
        daemon.request("GET", "/v1/quota", headers={"Authorization": f"Bearer {key}"})
        daemon.request("GET", "/admin/state", headers={"Authorization": f"Bearer {key}"})
    daemon.request("POST", "/v1/images/generations", prompt)  # anonymous tier
    daemon.request("POST", "/v1/images/generations", {**prompt, "n": 99},
                   headers={"Authorization": f"Bearer {KEYS['pro']}"})
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer "
                     + KEYS["free"].encode() + b"\x00\r\n\r\n")
        sock.recv(4096)


def _wait_for_log(daemon: Daemon, text: str) -> str:
    log = ""
    for _ in range(100):
        log = daemon.log_path.read_text(errors="replace") if daemon.log_path else ""
        if text in log:
            return log
        time.sleep(0.05)
    return log


@pytest.mark.slow
def test_keys_and_prompts_never_logged_by_default(logged_daemon: Daemon) -> None:
    _exercise(logged_daemon)
    logged_daemon.signal(signal.SIGHUP)  # a reload logs the policy; it must not log keys
    log = _wait_for_log(logged_daemon, "policy.reloaded")
    assert "admission.decided" in log and "http.malformed_request" in log  # it did log
    secrets = [*KEYS.values(), ADMIN_KEY, MARKER]
    hashes = [hashlib.sha256(key.encode()).hexdigest() for key in (*KEYS.values(), ADMIN_KEY)]
    for secret in secrets + hashes:
        assert secret not in log, secret
    for line in log.splitlines():
        if line.startswith("{"):
            assert "prompt" not in json.loads(line), line


@pytest.mark.slow
def test_prompts_logged_only_when_opted_in(tmp_path: Path) -> None:
    daemon = Daemon(["--model", "sim", "--telemetry", "sim", "--store", "memory",
                     "--policy", str(_policy_file(tmp_path)), "--log-prompts"],
                    log_path=tmp_path / "d.log")
    with daemon:
        status, _, _ = daemon.request("POST", "/v1/images/generations",
                                      {"prompt": f"a {MARKER}", "size": "64x64"},
                                      headers={"Authorization": f"Bearer {KEYS['pro']}"})
        assert status == 200
        log = _wait_for_log(daemon, MARKER)
    decided = [json.loads(line) for line in log.splitlines()
               if line.startswith("{") and '"admission.decided"' in line]
    assert decided and decided[0]["prompt"] == f"a {MARKER}"
    assert KEYS["pro"] not in log
