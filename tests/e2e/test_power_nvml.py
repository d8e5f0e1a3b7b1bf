"""Issue 19 end to end: a real daemon over the fake NVML library moves the card's power limit
with the pressure level (0.8, then 0.7 of the default), restores the default on cooling and at
SIGTERM, and serves on with admission alone when the driver refuses it permission."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import (
    Daemons,
    error_code,
    generate,
    log_events,
    metric,
    policy_yaml,
    pressure_level,
    wait_for,
)
from tests.fakenvml import FakeNvml
from tests.process import Daemon

pytestmark = pytest.mark.slow

POWER = "power: {elevated: 0.8, high: 0.7, critical: 0.6}\n"
LIMIT = "meltguard_gpu_power_limit_watts"
CHANGES = "meltguard_power_limit_changes_total"


def _limit(daemon: Daemon) -> float:
    return metric(daemon, LIMIT, {"gpu": "0"})


def test_the_limit_follows_the_level_and_is_restored_on_cooling_and_at_sigterm(
    daemons: Daemons, fake_gpu: FakeNvml
) -> None:
    fake_gpu.update({"0.energy_mj": 5_000_000, "0.power_mw": 300_000})
    daemon = daemons.make(policy=policy_yaml() + POWER, store="memory")
    daemons.start(daemon)
    wait_for(lambda: pressure_level(daemon) == 0, "normal pressure at 60 °C")
    assert _limit(daemon) == 700
    assert fake_gpu.limits_set() == []  # nothing to change at normal: the card is not touched
    assert metric(daemon, "meltguard_gpu_energy_joules_total", {"gpu": "0"}) == 5000

    fake_gpu.update({"0.temperature": 80})
    wait_for(lambda: _limit(daemon) == 560, "0.8 of the 700 W default at elevated")
    assert pressure_level(daemon) == 1
    fake_gpu.update({"0.temperature": 86})
    wait_for(lambda: _limit(daemon) == 490, "0.7 of the default at high")
    assert pressure_level(daemon) == 2

    # Admission goes on beside the lever: pro is served, with its share of the card's energy.
    status, _, body = generate(daemon, "pro")
    assert status == 200, body
    assert body["usage"]["energy_j"] > 0
    assert metric(daemon, "meltguard_energy_joules_total", {"tier": "pro"}) == pytest.approx(
        body["usage"]["energy_j"], abs=0.01)

    fake_gpu.update({"0.temperature": 60})
    wait_for(lambda: pressure_level(daemon) == 0 and _limit(daemon) == 700,
             "the default restored after cooling", timeout=15)
    # Each change set once. At 60 °C every exit holds and elevated's dwell ended before high's,
    # so the level drops straight to normal.
    assert fake_gpu.limits_set() == [560_000, 490_000, 700_000]

    fake_gpu.update({"0.temperature": 86})
    wait_for(lambda: _limit(daemon) == 490, "capped again when hot")
    assert metric(daemon, CHANGES, {"gpu": "0", "result": "success"}) == 4
    assert daemon.stop(timeout=20) == 0
    assert fake_gpu.limits_set()[-1] == 700_000
    restored = [e for e in log_events(daemon, "power.limit_set") if e.get("why") == "shutdown"]
    assert [(e["gpu"], e["watts"]) for e in restored] == [(0, 700.0)]
    assert fake_gpu.limits_set() == [560_000, 490_000, 700_000, 490_000, 700_000]


def test_without_permission_the_daemon_says_so_once_and_serves_on(
    daemons: Daemons, fake_gpu: FakeNvml
) -> None:
    fake_gpu.update({"unprivileged": 1})
    daemon = daemons.make(policy=policy_yaml() + POWER, store="memory")
    daemons.start(daemon)
    wait_for(lambda: pressure_level(daemon) == 0, "normal pressure at 60 °C")

    fake_gpu.update({"0.temperature": 86})
    wait_for(lambda: pressure_level(daemon) == 2, "high pressure at 86 °C")
    wait_for(lambda: metric(daemon, CHANGES, {"gpu": "0", "result": "nvml_no_permission"}) == 1,
             "the refusal counted")
    status, _, body = generate(daemon, "pro")
    assert status == 200, body
    status, _, body = generate(daemon, "free-a")
    assert status == 503 and error_code(body) == "server_overloaded", body

    fake_gpu.update({"0.temperature": 96})
    wait_for(lambda: pressure_level(daemon) == 3, "critical pressure at 96 °C")
    status, _, body = generate(daemon, "pro")
    assert status == 200, body
    assert daemon.stop(timeout=20) == 0

    assert fake_gpu.limits_set() == []
    unavailable = log_events(daemon, "power.lever_unavailable")
    assert len(unavailable) == 1, unavailable
    assert unavailable[0]["result"] == "nvml_no_permission"
    assert "CAP_SYS_ADMIN" in unavailable[0]["hint"]
