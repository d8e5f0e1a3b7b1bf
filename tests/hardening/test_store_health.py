"""Issue 17 items 4, 6 and 10 against real daemons: an unusable SQLite file stops startup in
one line, one that breaks while running makes /readyz and the metric say so, a Redis password
is never shown, and one bad policy edit is one failed reload."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.hardening.conftest import ADMIN_KEY, hardening_policy
from tests.process import ROOT, Daemon, free_port, metric_value

pytestmark = pytest.mark.slow


def _daemon(tmp_path: Path, store: str, *, env: dict[str, str] | None = None,
            policy: str | None = None) -> Daemon:
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(policy or hardening_policy())
    return Daemon(["--model", "sim", "--telemetry", "sim", "--policy", str(policy_path),
                   "--store", store, "--log-format", "json"],
                  env=env, log_path=tmp_path / "daemon.log")


def _serve_fails(tmp_path: Path, store: str) -> str:
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(hardening_policy())
    done = subprocess.run(
        [sys.executable, "-m", "meltguard", "serve", "--port", str(free_port()), "--model",
         "sim", "--telemetry", "sim", "--policy", str(policy_path), "--store", store],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1, done
    return done.stderr


@pytest.mark.parametrize("fault", ["not a database", "a file where its directory should be"])
def test_an_unusable_sqlite_store_is_a_startup_error_in_one_line(
    tmp_path: Path, fault: str
) -> None:
    if fault == "not a database":
        path = tmp_path / "quota.sqlite3"
        path.write_bytes(b"garbage, not sqlite " * 300)
    else:
        (tmp_path / "blocker").write_text("x")
        path = tmp_path / "blocker" / "quota.sqlite3"
    stderr = _serve_fails(tmp_path, f"sqlite:{path}")
    # JSON log lines of the parts that did start aside, the reason is one plain line.
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("meltguard: quota store unusable: ")
    assert "Traceback" not in stderr


def _ready(daemon: Daemon) -> tuple[int, dict[str, object]]:
    status, _, body = daemon.request("GET", "/readyz", timeout=10)
    return status, body


def test_a_sqlite_store_broken_while_running_makes_readyz_say_so(tmp_path: Path) -> None:
    path = tmp_path / "quota.sqlite3"
    daemon = _daemon(tmp_path, f"sqlite:{path}")
    daemon.start(60)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        status, body = _ready(daemon)
        assert status == 200 and body["store"]["ok"] is True, body
        # Another process takes the write lock and keeps it: every store call now fails
        # after busy_timeout; the request itself is admitted (on_store_error: open).
        holder.execute("BEGIN EXCLUSIVE")
        status, _, _ = daemon.request("POST", "/v1/images/generations", {"prompt": "x"},
                                      {"Authorization": "Bearer sk-free-test"}, timeout=10)
        assert status == 200
        status, body = _ready(daemon)
        assert status == 503, body
        assert body["store"]["ok"] is False and body["store"]["name"] == "sqlite", body
        assert "locked" in body["store"]["error"]
        assert metric_value(daemon.metrics(), "meltguard_quota_store_up",
                            {"store": "sqlite"}) == 0.0
        holder.execute("ROLLBACK")
        # Readiness comes back by itself: /readyz asks the store again.
        status, body = _ready(daemon)
        assert status == 200 and body["store"]["ok"] is True, body
        assert metric_value(daemon.metrics(), "meltguard_quota_store_up",
                            {"store": "sqlite"}) == 1.0
    finally:
        holder.close()
        daemon.stop()


def test_no_redis_password_in_any_log_line_metric_or_admin_answer(tmp_path: Path) -> None:
    secret = "s3cret-Pw-17"
    port = free_port()  # nothing listens: every store call fails and is logged
    daemon = _daemon(tmp_path, f"redis://:{secret}@127.0.0.1:{port}/0")
    (tmp_path / "query").mkdir()
    query_daemon = _daemon(tmp_path / "query", f"redis://127.0.0.1:{port}/0?password={secret}")
    (tmp_path / "env").mkdir()
    env_daemon = _daemon(tmp_path / "env", f"redis://127.0.0.1:{port}/0",
                         env={"MELTGUARD_REDIS_PASSWORD": secret})
    every = (daemon, query_daemon, env_daemon)
    for d in every:
        d.start(60, ready=False)
    try:
        seen: list[str] = []
        for d in every:
            d.request("POST", "/v1/images/generations", {"prompt": "x"},
                      {"Authorization": "Bearer sk-free-test"}, timeout=10)
            d.request("GET", "/v1/quota", headers={"Authorization": "Bearer sk-free-test"})
            for path in ("/readyz", "/healthz", "/metrics", "/admin/state"):
                _, _, answer = d.request("GET", path,
                                         headers={"Authorization": f"Bearer {ADMIN_KEY}"})
                seen.append(str(answer))
            d.signal(signal.SIGHUP)
        time.sleep(0.5)
        for d in every:
            d.stop()
            seen.append(d.log_path.read_text() if d.log_path else "")
        text = "\n".join(seen)
        assert "meltguard.listening" in text and "quota_store" in text
        assert secret not in text
    finally:
        for d in every:
            d.kill()


def test_one_bad_policy_edit_is_one_failed_reload(tmp_path: Path) -> None:
    daemon = _daemon(tmp_path, "memory")
    daemon.start(60)
    try:
        (tmp_path / "policy.yaml").write_text("version: 1\ntiers: {free: {priority: nope}}\n")
        daemon.signal(signal.SIGHUP)  # the operator's SIGHUP, and the watcher sees the file
        time.sleep(3.0)  # the watcher polls every second or so
        failures = metric_value(daemon.metrics(), "meltguard_policy_reloads_total",
                                {"result": "failure"})
        assert failures == 1.0
    finally:
        daemon.stop()
