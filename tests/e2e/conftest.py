"""Shared rig for the end-to-end tests: real `meltguard serve` processes on the fake NVML
library, a real redis-server, and small helpers to talk to them and read their metrics.

The daemons run `--model sim` (no torch, ~50 ms per 64x64 image) and `--telemetry nvml`
against the fake libnvidia-ml.so.1, so the GPU temperature is whatever a test writes and the
pressure level is deterministic; the simulated GPU would heat up on its own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.fakenvml import FakeNvml, fake_nvml_library
from tests.process import Daemon, metric_value, sha
from tests.stores.conftest import RedisServer, redis_server, redis_session

__all__ = [
    "KEYS",
    "Daemons",
    "RedisServer",
    "daemons",
    "fake_gpu",
    "fake_nvml_library",
    "redis_server",
    "redis_session",
]

# One key per tenant; a test picks the tenants it needs so their counters never mix.
KEYS = {
    "free-a": ("free", "sk-e2e-free-a"),
    "free-b": ("free", "sk-e2e-free-b"),
    "metered": ("metered", "sk-e2e-metered"),
    "pro": ("pro", "sk-e2e-pro"),
    "team": ("team", "sk-e2e-team"),
}

# Requests cost exactly one reference image (the policy's reference is this size and steps),
# so quota arithmetic in the tests is in whole images.
IMAGE = {"prompt": "a lighthouse at dusk", "size": "64x64", "steps": 2}


def policy_yaml(
    *,
    free_quota: str = "{limit: 3, per: 1d}",
    team_quota: str = "{limit: 5, per: 1d}",
    metered_quota: str = "{limit: 1, per: 3s}",
    on_store_error: str = "open",
    elevated_dwell: str = "1s",
    high_dwell: str = "1s",
) -> str:
    keys = "\n".join(
        f'  - {{key_sha256: "{sha(secret)}", tenant: {tenant}, tier: {tier}}}'
        for tenant, (tier, secret) in KEYS.items()
    )
    return f"""version: 1
on_store_error: {on_store_error}
tiers:
  free: {{priority: 0, quotas: [{free_quota}], max_concurrent: 1, max_queue_wait: 20s}}
  metered: {{priority: 1, quotas: [{metered_quota}], max_concurrent: 2, max_queue_wait: 20s}}
  team: {{priority: 2, quotas: [{team_quota}], max_concurrent: 32, max_queue_wait: 60s}}
  pro: {{priority: 3, quotas: [{{limit: 1000, per: 1d}}], max_concurrent: 4, max_queue_wait: 60s}}
api_keys:
{keys}
cost: {{reference: {{size: 64x64, steps: 2}}}}
limits: {{max_n: 4, max_size: 512x512, max_steps: 50, default_size: 64x64, default_steps: 2}}
concurrency: {{limit: 4}}
pressure:
  sample_interval: 100ms
  stale_after: 5s
  on_stale: high
  levels:
    elevated:
      {{enter: {{temperature_c: 78}}, exit: {{temperature_c: 74}}, min_dwell: {elevated_dwell}}}
    high: {{enter: {{temperature_c: 84}}, exit: {{temperature_c: 80}}, min_dwell: {high_dwell}}}
    critical: {{enter: {{temperature_c: 95}}, exit: {{temperature_c: 92}}, min_dwell: 1s}}
actions:
  high: {{free: {{reject: true}}}}
  critical: {{free: {{reject: true}}, metered: {{reject: true}}}}
"""


def auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant][1]}"}


def generate(
    daemon: Daemon, tenant: str, *, timeout: float = 30.0
) -> tuple[int, dict[str, str], Any]:
    return daemon.request("POST", "/v1/images/generations", IMAGE, auth(tenant), timeout=timeout)


def error_code(body: Any) -> str | None:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = body["error"].get("code")
        return str(code) if code is not None else None
    return None


def header(headers: Mapping[str, str], name: str) -> str | None:
    """Case-insensitive lookup: urllib keeps the server's spelling."""
    lowered = name.lower()
    return next((v for k, v in headers.items() if k.lower() == lowered), None)


def metric(daemon: Daemon, name: str, labels: Mapping[str, str] | None = None) -> float:
    """One series' value now; an absent series reads as 0 (counters not yet incremented)."""
    return metric_value(daemon.metrics(), name, labels) or 0.0


def metric_sum(daemon: Daemon, name: str, labels: Mapping[str, str]) -> float:
    """The sum over every series of `name` whose labels include `labels`."""
    total = 0.0
    for line in daemon.metrics().splitlines():
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] != name or line.startswith("#"):
            continue
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


def wait_for(
    predicate: Callable[[], bool], what: str, *, timeout: float = 10.0, every: float = 0.05
) -> float:
    """Poll until `predicate` holds; returns the seconds it took. The box is shared and
    loaded, so waits are for conditions, never fixed sleeps."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)
    return time.monotonic() - started


def pressure_level(daemon: Daemon) -> float | None:
    return metric_value(daemon.metrics(), "meltguard_pressure_level", {"gpu": "all"})


def log_events(daemon: Daemon, event: str) -> list[dict[str, Any]]:
    """The daemon's JSON log lines for one event name."""
    assert daemon.log_path is not None
    found = []
    for line in daemon.log_path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == event:
            found.append(record)
    return found


@dataclass
class Daemons:
    """Starts daemons with their logs in the test's temp dir and stops every one on teardown,
    whatever the test did, so a failure never leaves a process behind."""

    directory: Path
    fake: FakeNvml
    started: list[Daemon]

    def make(
        self, *, policy: str, store: str, name: str = "daemon", args: Sequence[str] = ()
    ) -> Daemon:
        policy_path = self.directory / f"{name}-policy.yaml"
        policy_path.write_text(policy)
        return Daemon(
            ["--model", "sim", "--telemetry", "nvml", "--policy", str(policy_path),
             "--store", store, *args],
            env=self.fake.env(),
            log_path=self.directory / f"{name}.log",
        )

    def start(self, *daemons: Daemon) -> None:
        """Start several at once: each start is mostly waiting for imports and /readyz."""
        self.started.extend(daemons)
        with ThreadPoolExecutor(max_workers=len(daemons)) as pool:
            for future in [pool.submit(d.start, 60.0) for d in daemons]:
                future.result()

    def policy_path(self, name: str = "daemon") -> Path:
        return self.directory / f"{name}-policy.yaml"

    def stop_all(self) -> None:
        for daemon in self.started:
            try:
                daemon.stop(timeout=15)
            except Exception:
                daemon.kill()


@pytest.fixture
def fake_gpu(fake_nvml_library: Path, tmp_path: Path) -> FakeNvml:
    """One cool fake GPU (60 °C) for daemons started with `fake_gpu.env()`."""
    fake = FakeNvml(fake_nvml_library, tmp_path / "nvml-state")
    fake.write({"gpu_count": 1, "driver_version": "550.54.15", "0.temperature": 60})
    return fake


@pytest.fixture
def daemons(tmp_path: Path, fake_gpu: FakeNvml) -> Iterator[Daemons]:
    rig = Daemons(tmp_path, fake_gpu, [])
    try:
        yield rig
    finally:
        rig.stop_all()
