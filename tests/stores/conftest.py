"""A real redis-server for the store tests: one per session, on a free port, in a temp dir.

Tests that stop, restart or pause it leave it running again (the `redis_server` fixture
checks that on the way out), so test order does not matter.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as syncredis

from meltguard.daemon.stores import RedisQuotaStore


def relaxed_store(url: str, *, caller_clock: bool = False) -> RedisQuotaStore:
    """A Redis store for tests about answers rather than failures: the production timeouts
    (50 ms) are for a healthy Redis next door, not for a loaded CI box under `python -X dev`."""
    return RedisQuotaStore(
        url, caller_clock=caller_clock, connect_timeout=2.0, socket_timeout=2.0, deadline=5.0
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server child process that tests can stop, start, pause and resume."""

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is missing: run `make apt` (Debian's redis-server)")
        self.binary = binary
        self.dir = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _write_config(self) -> Path:
        conf = self.dir / "redis.conf"
        # "save 3600 1" never triggers in a test run, but makes SIGTERM write a snapshot, so a
        # restart keeps the counters, as a production Redis with persistence would.
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\nprotected-mode no\ndir {self.dir}\n"
            "save 3600 1\nappendonly no\ndaemonize no\nlogfile redis.log\n"
        )
        return conf

    def start(self, timeout: float = 10.0, *, may_move: bool = False) -> None:
        """Start and wait for PING. `may_move`: on a lost port race, take another free port
        (only before any store holds the URL)."""
        assert self.proc is None, "already running"
        for _ in range(3):
            conf = self._write_config()
            self.proc = subprocess.Popen([self.binary, str(conf)], cwd=self.dir)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self._answers():
                    self.paused = False
                    return
                time.sleep(0.02)
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            if not may_move:
                break
            self.port = free_port()
        raise RuntimeError(f"redis-server did not start; see {self.dir / 'redis.log'}")

    def _answers(self) -> bool:
        try:
            client = syncredis.Redis(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except (syncredis.RedisError, OSError):
            return False

    def stop(self) -> None:
        """SIGTERM, as systemd would: Redis writes its snapshot and exits."""
        if self.proc is None:
            return
        if self.paused:
            self.resume()
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: the socket still accepts connections, nothing answers."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def client(self) -> syncredis.Redis:
        return syncredis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=2)

    def ensure_running(self) -> None:
        if self.paused:
            self.resume()
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            self.start()

    def command_calls(self, command: str) -> int:
        """How many times the server ran `command` (INFO commandstats), e.g. "evalsha"."""
        client = self.client()
        try:
            stats = client.info("commandstats")
        finally:
            client.close()
        entry = stats.get(f"cmdstat_{command.lower()}")
        return int(entry["calls"]) if entry else 0


@pytest.fixture(scope="session")
def redis_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start(may_move=True)
    try:
        yield server
    finally:
        server.ensure_running()
        server.stop()


@pytest.fixture
def redis_server(redis_session: RedisServer) -> Iterator[RedisServer]:
    """The session's server, running and empty; left running whatever the test did to it."""
    redis_session.ensure_running()
    client = redis_session.client()
    try:
        client.flushall()
    finally:
        client.close()
    try:
        yield redis_session
    finally:
        redis_session.ensure_running()


@pytest.fixture
def tenant() -> str:
    """A fresh hash-tagged key prefix, so no two tests share counters."""
    return "{mg:t-" + uuid.uuid4().hex[:12] + "}"
