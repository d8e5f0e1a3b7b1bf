"""A thousand connections that never send a whole request: the daemon keeps answering, and
(with an idle timeout) closes them itself, so they cannot pile up for an hour."""

from __future__ import annotations

import contextlib
import io
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from meltguard.cli import build_parser
from tests.daemon.conftest import KEYS
from tests.hardening.conftest import ADMIN, hardening_policy
from tests.process import Daemon

pytestmark = pytest.mark.slow
CONNECTIONS = 1000
IDLE_TIMEOUT = 2.0


def _has_idle_timeout_flag() -> bool:
    with contextlib.redirect_stderr(io.StringIO()), contextlib.suppress(SystemExit):
        build_parser().parse_args(["serve", "--idle-timeout", "1"])
        return True
    return False


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    policy = tmp_path / "policy.yaml"
    policy.write_text(hardening_policy(stale_after="5s"))
    extra = ["--idle-timeout", str(IDLE_TIMEOUT)] if _has_idle_timeout_flag() else []
    with Daemon(["--model", "sim", "--telemetry", "sim", "--store", "memory",
                 "--policy", str(policy), *extra], log_path=tmp_path / "d.log") as running:
        yield running


def _open_fds(daemon: Daemon) -> int:
    status, _, body = daemon.request("GET", "/admin/state", headers=ADMIN)
    assert status == 200, body
    return int(body["process"]["open_fds"])


def _closed_by_peer(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_thousand_idle_connections(daemon: Daemon) -> None:
    baseline = _open_fds(daemon)
    sockets: list[socket.socket] = []
    try:
        for index in range(CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=5)
            if index % 2:
                # Half are slowloris: a request line and a header that never end.
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")
            sockets.append(sock)
        accepted_deadline = time.monotonic() + 10
        while _open_fds(daemon) < baseline + CONNECTIONS:
            assert time.monotonic() < accepted_deadline, "the daemon did not accept them all"
            time.sleep(0.05)

        started = time.monotonic()
        status, _, body = daemon.request("GET", "/healthz", timeout=5)
        assert status == 200 and body == {"status": "ok"}
        assert time.monotonic() - started < 1.0
        status, _, _ = daemon.request("POST", "/v1/images/generations",
                                      {"prompt": "still serving", "size": "64x64"},
                                      headers={"Authorization": f"Bearer {KEYS['pro']}"})
        assert status == 200

        if not _has_idle_timeout_flag():
            pytest.skip("`meltguard serve --idle-timeout` is not there yet: aiohttp's default "
                        "keeps an idle connection for 3630 s")
        deadline = time.monotonic() + IDLE_TIMEOUT + 10
        while not all(_closed_by_peer(sock) for sock in sockets):
            assert time.monotonic() < deadline, "idle connections were not closed"
            time.sleep(0.2)
        deadline = time.monotonic() + 10
        while _open_fds(daemon) > baseline + 5:
            assert time.monotonic() < deadline, "the daemon still holds the sockets"
            time.sleep(0.1)
    finally:
        for sock in sockets:
            sock.close()
    assert daemon.request("GET", "/healthz")[0] == 200
