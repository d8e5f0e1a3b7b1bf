"""Build the real app (assemble) with injected parts; helpers for keys and policies."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from meltguard.admission.quota_memory import MemoryQuotaStore
from meltguard.clock import SystemClock
from meltguard.daemon.serve import Assembly, assemble
from meltguard.daemon.settings import Settings
from meltguard.values import EngineHealth, GenerationJob, GpuSample

KEYS = {"free": "sk-free-test", "plus": "sk-plus-test", "pro": "sk-pro-test"}


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def policy_yaml(
    *, anonymous: str | None = "null", free_quotas: str = "[{limit: 100, per: 1d}]",
    extra: str = "", reference: str = "{size: 64x64, steps: 2}", concurrency: int = 2,
) -> str:
    keys = "\n".join(
        f'  - {{key_sha256: "{sha(key)}", tenant: {tier}-tenant, tier: {tier}}}'
        for tier, key in KEYS.items()
    )
    return f"""version: 1
anonymous_tier: {anonymous}
tiers:
  free: {{priority: 0, quotas: {free_quotas}, max_concurrent: 1, max_queue_wait: 20s}}
  plus: {{priority: 1, quotas: [{{limit: 1000, per: 1d}}], max_concurrent: 2, max_queue_wait: 60s}}
  pro:  {{priority: 2, quotas: [{{limit: 1000, per: 1d}}], max_concurrent: 4, max_queue_wait: 120s}}
api_keys:
{keys}
cost: {{reference: {reference}}}
limits: {{max_n: 4, max_size: 512x512, max_steps: 50, default_size: 64x64, default_steps: 2}}
concurrency: {{limit: {concurrency}}}
pressure:
  sample_interval: 100ms
  stale_after: 5s
  on_stale: high
  levels:
    elevated: {{enter: {{temperature_c: 78}}, exit: {{temperature_c: 74}}, min_dwell: 0s}}
    high:     {{enter: {{temperature_c: 84}}, exit: {{temperature_c: 80}}, min_dwell: 0s}}
    critical: {{enter: {{temperature_c: 90, gpu_lost: true}}, exit: {{temperature_c: 86}}}}
actions:
  elevated: {{free: {{max_steps: 1}}}}
  high: {{free: {{reject: true}}}}
  critical: {{free: {{reject: true}}, plus: {{reject: true}}}}
{extra}"""


def auth(tier: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tier]}"}


@dataclass
class FixedSource:
    """A TelemetrySource of our own: whatever the test last put in `samples`."""

    samples: list[GpuSample] = field(default_factory=list)
    kind: str = "simulated"

    def read(self) -> Sequence[GpuSample]:
        now = time.monotonic()
        return [dataclasses.replace(sample, taken_at=now) for sample in self.samples]

    def close(self) -> None:
        return None


def gpu(temperature: float, *, lost: bool = False, at: float = 0.0) -> GpuSample:
    return GpuSample(index=0, uuid="GPU-test", name="Test GPU", taken_at=at,
                     temperature_c=temperature, slowdown_c=87.0, shutdown_c=92.0,
                     memory_used_bytes=1 << 30, memory_total_bytes=80 << 30, utilization=0.5,
                     power_w=300.0, power_limit_w=700.0, lost=lost)


class ScriptedEngine:
    """An Engine of our own whose generate runs a test-supplied coroutine."""

    def __init__(self, behaviour: Callable[[GenerationJob], Awaitable[list[bytes]]]) -> None:
        self.behaviour = behaviour
        self.calls: list[GenerationJob] = []

    @property
    def name(self) -> str:
        return "scripted"

    async def warm_up(self) -> None:
        return None

    async def generate(self, job: GenerationJob) -> list[bytes]:
        self.calls.append(job)
        return await self.behaviour(job)

    def health(self) -> EngineHealth:
        return EngineHealth(ready=True, detail="scripted", device="cpu")

    def edit_support(self, kind: str) -> str | None:
        return None

    def busy_seconds(self) -> float:
        return 0.0

    async def close(self) -> None:
        return None


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(policy_yaml())
    return path


BuildApp = Callable[..., Assembly]


@pytest.fixture
def build(tmp_path: Path) -> BuildApp:
    def _build(policy: str | None = None, *, engine: Any = None, source: Any = None,
               store: Any = None, **overrides: Any) -> Assembly:
        path = tmp_path / "policy.yaml"
        path.write_text(policy if policy is not None else policy_yaml())
        settings = Settings(policy=str(path), model=overrides.pop("model", "sim"),
                            telemetry="sim", store="memory", policy_poll=0, **overrides)
        return assemble(
            settings, SystemClock(), CollectorRegistry(), engine=engine,
            source=source if source is not None else FixedSource([gpu(50)]),
            store=store if store is not None else MemoryQuotaStore(),
        )
    return _build


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)
