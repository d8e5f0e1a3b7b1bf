"""Signals against a real `meltguard serve`: SIGTERM stops taking work, lets what it took
finish and exits 0 within the drain deadline; SIGHUP with a broken policy keeps the old one."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.daemon.conftest import KEYS
from tests.fakenvml import FakeNvml, fake_nvml_library
from tests.hardening.conftest import hardening_policy
from tests.process import Daemon, metric_value

pytestmark = pytest.mark.slow
__all__ = ["fake_nvml_library"]

PRO = {"Authorization": f"Bearer {KEYS['pro']}"}
# 512x512 at 30 steps: about 1.6 s on the sim engine at speed 1 (SimEngineParams).
SLOW = {"prompt": "a slow one", "size": "512x512", "steps": 30}
SLOWER = {"prompt": "a slower one", "size": "512x512", "steps": 50}  # about 2.7 s


def _policy(**kwargs: Any) -> str:
    # Quotas count these big images as about one each, so none is refused for quota.
    return hardening_policy(stale_after="5s", reference="{size: 512x512, steps: 30}", **kwargs)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=4) as executor:
        yield executor


def _daemon(tmp_path: Path, *extra: str, policy: str | None = None,
            env: dict[str, str] | None = None) -> Daemon:
    path = tmp_path / "policy.yaml"
    path.write_text(policy if policy is not None else _policy())
    return Daemon(["--model", "sim", "--telemetry", "sim", "--store", "memory",
                   "--policy", str(path), *extra], log_path=tmp_path / "daemon.log", env=env)


def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def _log_lines(daemon: Daemon) -> list[dict[str, Any]]:
    """The daemon's JSON log lines (the log's tail may start mid-line: that one is skipped)."""
    lines = []
    for text in daemon.log().splitlines():
        with contextlib.suppress(ValueError):
            lines.append(json.loads(text))
    return [line for line in lines if isinstance(line, dict)]


def _inflight(daemon: Daemon) -> float:
    text = daemon.metrics()
    return sum(metric_value(text, "meltguard_inflight_requests", {"tier": t}) or 0
               for t in ("free", "plus", "pro"))


def _exit_code(daemon: Daemon, timeout: float) -> tuple[int, float]:
    assert daemon.process is not None
    started = time.monotonic()
    code = daemon.process.wait(timeout)
    return code, time.monotonic() - started


def test_sigterm_refuses_new_work_finishes_inflight_and_exits_0(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    daemon = _daemon(tmp_path, "--drain-timeout", "10",
                     policy=_policy(concurrency=1)).start()
    try:
        running = pool.submit(daemon.request, "POST", "/v1/images/generations", SLOW, PRO)
        _until(lambda: _inflight(daemon) == 1)
        queued = pool.submit(daemon.request, "POST", "/v1/images/generations", SLOW, PRO)
        _until(lambda: metric_value(daemon.metrics(), "meltguard_queue_depth",
                                    {"tier": "pro"}) == 1)
        daemon.signal(signal.SIGTERM)
        _until(lambda: daemon.request("GET", "/healthz")[2].get("status") == "draining")

        status, headers, body = daemon.request("POST", "/v1/images/generations",
                                               {"prompt": "too late"}, PRO)
        assert status == 503
        assert body["error"]["code"] == "shutting_down"
        assert 1 <= int(headers["Retry-After"]) <= 60
        assert daemon.request("GET", "/readyz")[0] == 503  # load balancers stop sending

        assert running.result(10)[0] == 200  # taken before SIGTERM: delivered
        assert queued.result(10)[0] == 200   # queued before SIGTERM: delivered too
        code, waited = _exit_code(daemon, 10)
        assert code == 0
        assert waited < 10
        assert any(line.get("event") == "meltguard.stopped" and line.get("abandoned") == 0
                   for line in _log_lines(daemon))
    finally:
        daemon.kill()


def test_drain_deadline_bounds_exit_and_still_answers(
    tmp_path: Path, pool: ThreadPoolExecutor
) -> None:
    """A generation longer than the drain deadline does not hold the process: it exits 0
    on time, and the abandoned client gets a 503 to retry on, not a reset connection."""
    drain = 1.0
    daemon = _daemon(tmp_path, "--drain-timeout", str(drain), "--sim-speed", "0.5").start()
    try:
        running: Future[Any] = pool.submit(daemon.request, "POST", "/v1/images/generations",
                                           SLOWER, PRO)
        _until(lambda: _inflight(daemon) == 1)
        daemon.signal(signal.SIGTERM)
        code, waited = _exit_code(daemon, drain + 10)
        assert code == 0
        assert waited < drain + 2.5
        status, headers, body = running.result(5)
        assert status == 503
        assert body["error"]["code"] == "shutting_down"
        assert "Retry-After" in headers
    finally:
        daemon.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_idle_daemon_exits_0_at_once(tmp_path: Path, sig: signal.Signals) -> None:
    daemon = _daemon(tmp_path).start()
    try:
        daemon.signal(sig)
        code, waited = _exit_code(daemon, 10)
        assert code == 0
        assert waited < 3
    finally:
        daemon.kill()


def test_sigterm_with_telemetry_hung_in_the_driver_exits_0(
    tmp_path: Path, fake_nvml_library: Path
) -> None:
    """A read stuck inside NVML cannot be interrupted; shutdown must not wait for it."""
    fake = FakeNvml(fake_nvml_library, tmp_path / "nvml-state")
    fake.write({"gpu_count": 1, "0.temperature": 50})
    path = tmp_path / "policy.yaml"
    path.write_text(hardening_policy(stale_after="5s"))
    daemon = Daemon(["--model", "sim", "--telemetry", "nvml", "--store", "memory",
                     "--policy", str(path)], env=fake.env(), log_path=tmp_path / "d.log")
    daemon.start()
    try:
        fake.update({"0.temperature.hang_ms": 120_000})
        _until(lambda: "telemetry.read_failed" in daemon.log())
        assert daemon.request("GET", "/healthz")[0] == 200
        daemon.signal(signal.SIGTERM)
        code, waited = _exit_code(daemon, 15)
        assert code == 0
        assert waited < 5
    finally:
        daemon.kill()
        fake.clear_hangs()


def test_sighup_with_a_broken_policy_keeps_the_old_one(tmp_path: Path) -> None:
    daemon = _daemon(tmp_path).start()
    try:
        before = daemon.request("GET", "/readyz")[2]["policy"]["sha256"]
        policy = tmp_path / "policy.yaml"
        policy.write_text("version: 1\ntiers: {free: {priority: banana}}\nbogus: [\n")
        daemon.signal(signal.SIGHUP)
        _until(lambda: any(line.get("trigger") == "sighup" for line in _log_lines(daemon))
               and "policy.reload_failed" in daemon.log())
        failures = metric_value(daemon.metrics(), "meltguard_policy_reloads_total",
                                {"result": "failure"})
        assert failures is not None and failures >= 1
        assert daemon.request("GET", "/readyz")[2]["policy"]["sha256"] == before
        status, _, _ = daemon.request("POST", "/v1/images/generations",
                                      {"prompt": "still here", "size": "64x64"}, PRO)
        assert status == 200

        # A good file afterwards is taken, so the failure did not wedge reloading.
        policy.write_text(_policy(free_quota=7))
        daemon.signal(signal.SIGHUP)
        _until(lambda: daemon.request("GET", "/readyz")[2]["policy"]["sha256"] != before)
        quota = daemon.request("GET", "/v1/quota",
                               headers={"Authorization": f"Bearer {KEYS['free']}"})[2]
        assert quota["windows"][0]["limit"] == 7
        assert daemon.stop() == 0
    finally:
        daemon.kill()
