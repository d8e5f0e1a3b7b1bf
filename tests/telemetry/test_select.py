"""open_source: auto, nvml, sim and replay:FILE."""

from __future__ import annotations

from pathlib import Path

import pytest

from meltguard.clock import FakeClock
from meltguard.daemon.telemetry.errors import NvmlUnavailable, TelemetrySpecError
from meltguard.daemon.telemetry.nvml import NvmlSource
from meltguard.daemon.telemetry.replay import ReplaySource
from meltguard.daemon.telemetry.select import open_source, requested_label
from meltguard.daemon.telemetry.simulated import SimulatedGpu
from meltguard.protocols import TelemetrySource
from tests.fakenvml import DRIVER_NOT_LOADED, FakeNvml

DATA = Path(__file__).with_name("data")


def open_(spec: str, **kwargs: object) -> tuple[TelemetrySource, str | None]:
    return open_source(
        spec,
        clock=FakeClock(),
        busy_seconds=lambda: 0.0,
        inflight=lambda: 0,
        environ={},
        **kwargs,  # type: ignore[arg-type]
    )


def test_auto_uses_nvml_when_it_works(fake_nvml: FakeNvml) -> None:
    source, reason = open_("auto")
    try:
        assert isinstance(source, NvmlSource) and reason is None
        assert source.kind == "nvml"
    finally:
        source.close()


def test_auto_falls_back_to_the_simulated_gpu_and_says_why(
    fake_nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_NVML_STATE", str(fake_nvml.state_path) + ".absent")
    source, reason = open_("auto", sim_speed=4.0)
    assert isinstance(source, SimulatedGpu) and source.speed == 4.0
    assert reason is not None
    assert reason.startswith("NVML unavailable (NVML library libnvidia-ml.so.1 not found")
    assert reason.endswith("using the simulated GPU")


def test_nvml_unusable_raises_with_one_line(fake_nvml: FakeNvml) -> None:
    fake_nvml.update({"init_error": DRIVER_NOT_LOADED})
    with pytest.raises(NvmlUnavailable) as caught:
        open_("nvml")
    assert "driver is not loaded" in str(caught.value)
    source, reason = open_("auto")
    assert isinstance(source, SimulatedGpu)
    assert reason is not None and "driver is not loaded" in reason


def test_nvml_passes_gpu_indices(fake_nvml: FakeNvml) -> None:
    source, _ = open_("nvml", gpu_indices=[1])
    try:
        assert isinstance(source, NvmlSource) and source.indices == (1,)
    finally:
        source.close()


def test_sim_and_replay() -> None:
    sim, reason = open_(" sim ")
    assert isinstance(sim, SimulatedGpu) and reason is None
    replay, reason = open_(f"replay:{DATA / 'h100_incident.csv'}", replay_loop=True)
    assert isinstance(replay, ReplaySource) and reason is None
    assert replay.read()[0].temperature_c == 55.0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gpu", "--telemetry must be auto, nvml, sim or replay:FILE, got 'gpu'"),
        ("sim:x", "--telemetry must be"),
        ("replay", "--telemetry replay needs a file: replay:FILE"),
        ("replay:", "--telemetry replay needs a file"),
        ("replay:/nonexistent/trace.csv", "/nonexistent/trace.csv:0: cannot read replay trace"),
    ],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(TelemetrySpecError) as caught:
        open_(spec)
    assert str(caught.value).startswith(message)


def test_requested_label() -> None:
    assert [requested_label(s) for s in ("auto", "NVML", "sim", "replay:/a/b.csv", "")] == [
        "auto",
        "nvml",
        "sim",
        "replay",
        "auto",
    ]
