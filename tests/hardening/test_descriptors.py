"""Issue 17 item 9: out of file descriptors, the daemon logs one line per interval with a
count (not a traceback per failed accept) and keeps serving the connections it has."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http.client
import json
import resource
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from meltguard.daemon.fd_guard import AcceptErrorLimiter
from tests.hardening.conftest import hardening_policy
from tests.process import Daemon


def test_one_line_per_interval_with_the_count() -> None:
    now = [0.0]
    passed: list[dict[str, Any]] = []
    limiter = AcceptErrorLimiter(lambda loop, ctx: passed.append(ctx), interval=10.0,
                                 clock=lambda: now[0])
    loop = asyncio.new_event_loop()
    try:
        emfile = {"message": "socket.accept() out of system resource",
                  "exception": OSError(errno.EMFILE, "Too many open files")}
        with capture_logs() as logs:
            for step in range(250):
                now[0] = step * 0.1  # 25 s of failures, ten a second
                limiter(loop, emfile)
            limiter(loop, {"message": "something else", "exception": ValueError("x")})
    finally:
        loop.close()
    lines = [line for line in logs if line["event"] == "server.out_of_descriptors"]
    assert [line["failures"] for line in lines] == [1, 100, 100]
    assert limiter.total == 250
    assert [ctx["message"] for ctx in passed] == ["something else"]


@pytest.mark.slow
def test_exhausted_descriptors_log_once_and_keep_serving(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(hardening_policy())
    log_path = tmp_path / "d.log"
    daemon = Daemon(["--model", "sim", "--telemetry", "sim", "--store", "memory", "--policy",
                     str(policy), "--log-format", "json"], log_path=log_path)
    daemon.start(60)
    kept = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=5)
    flood: list[socket.socket] = []
    try:
        kept.request("GET", "/healthz")
        assert kept.getresponse().read()
        assert daemon.process is not None
        _, hard = resource.prlimit(daemon.process.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(daemon.process.pid, resource.RLIMIT_NOFILE, (128, hard))
        for _ in range(400):
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", daemon.port))
            flood.append(sock)
        time.sleep(2.0)  # the accept loop fails over and over meanwhile
        # The connection it already has is still served, and fast.
        started = time.monotonic()
        kept.request("GET", "/healthz")
        response = kept.getresponse()
        assert response.status == 200 and json.loads(response.read())["status"] == "ok"
        assert time.monotonic() - started < 1.0
    finally:
        for sock in flood:
            sock.close()
        kept.close()
        daemon.stop()
    text = log_path.read_text()
    assert "Traceback" not in text
    lines = [json.loads(line) for line in text.splitlines()
             if "server.out_of_descriptors" in line]
    assert len(lines) == 1 and lines[0]["failures"] >= 1, lines
    assert lines[0]["open_files_limit"] == 128
