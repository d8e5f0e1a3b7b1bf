"""NvmlSource over the real pynvml bindings and the fake libnvidia-ml.so.1."""

from __future__ import annotations

import ctypes.util
import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from meltguard.clock import FakeClock
from meltguard.daemon.telemetry.errors import NvmlUnavailable, TelemetryError
from meltguard.daemon.telemetry.nvml import NvmlSource, open_nvml, resolve_visible_devices
from meltguard.daemon.telemetry.samples import ThrottleUnknownSample, throttle_known
from tests.fakenvml import (
    DRIVER_NOT_LOADED,
    FUNCTION_NOT_FOUND,
    GPU_IS_LOST,
    NO_PERMISSION,
    NOT_SUPPORTED,
    UNKNOWN,
    FakeNvml,
)

GIB = 1024**3
NO_ENV: dict[str, str] = {}


@pytest.fixture
def source(fake_nvml: FakeNvml) -> Iterator[NvmlSource]:
    src = open_nvml(clock=FakeClock(), environ=NO_ENV)
    yield src
    src.close()


def test_reads_two_gpus(fake_nvml: FakeNvml) -> None:
    fake_nvml.update(
        {
            "0.temperature": 61,
            "0.memory_total": 80 * GIB,
            "0.memory_used": 20 * GIB,
            "0.memory_reserved": 1 * GIB,
            "0.util_gpu": 45,
            "0.power_mw": 312_500,
            "0.power_limit_mw": 650_000,
            "0.clocks_reasons": 0x60,
            "1.name": "NVIDIA H200",
            "1.uuid": "GPU-22222222-aaaa-4bbb-8ccc-dddddddddddd",
            "1.temperature": 74,
            "1.slowdown": 90,
            "1.shutdown": 95,
            "1.clocks_reasons": 0,
        }
    )
    clock = FakeClock(start=50.0)
    src = open_nvml(clock=clock, environ=NO_ENV)
    try:
        assert src.kind == "nvml"
        assert src.indices == (0, 1)
        assert src.driver_version == "550.54.15"
        first, second = src.read()
    finally:
        src.close()
    assert first.index == 0
    assert first.name == "NVIDIA H100 80GB HBM3"
    assert first.uuid == "GPU-fa4e0000-0000-4000-8000-000000000000"
    assert first.taken_at == 50.0
    assert first.temperature_c == 61.0
    assert (first.slowdown_c, first.shutdown_c) == (87.0, 92.0)
    # v1 memory info: reserved memory counts as used, which is what admission needs.
    assert first.memory_used_bytes == 21 * GIB
    assert first.memory_total_bytes == 80 * GIB
    assert first.utilization == pytest.approx(0.45)
    assert first.power_w == pytest.approx(312.5)
    assert first.power_limit_w == pytest.approx(650.0)
    assert first.throttle == {"sw_thermal", "hw_thermal"}
    assert not first.lost
    assert (second.index, second.name, second.temperature_c) == (1, "NVIDIA H200", 74.0)
    assert (second.slowdown_c, second.shutdown_c) == (90.0, 95.0)
    assert second.throttle == frozenset()
    assert throttle_known(second)


def test_values_follow_the_state_between_reads(fake_nvml: FakeNvml, source: NvmlSource) -> None:
    fake_nvml.update({"0.temperature": 50})
    assert source.read()[0].temperature_c == 50.0
    fake_nvml.update({"0.temperature": 83})
    assert source.read()[0].temperature_c == 83.0


def test_not_supported_fields_are_absent_not_zero(fake_nvml: FakeNvml, source: NvmlSource) -> None:
    fake_nvml.update(
        {
            "0.utilization.error": NOT_SUPPORTED,
            "0.power.error": NOT_SUPPORTED,
            "0.shutdown.error": NOT_SUPPORTED,
            "0.memory.error": NO_PERMISSION,
            "0.clocks_event_reasons.error": NOT_SUPPORTED,
        }
    )
    sample = source.read()[0]
    assert sample.utilization is None
    assert sample.power_w is None
    assert sample.shutdown_c is None
    assert sample.memory_used_bytes is None and sample.memory_total_bytes is None
    assert isinstance(sample, ThrottleUnknownSample)
    assert not throttle_known(sample)
    assert sample.temperature_c == 40.0  # the rest is still read
    assert sample.power_limit_w == 700.0


def test_lost_gpu_is_flagged_and_the_other_still_read(
    fake_nvml: FakeNvml, source: NvmlSource
) -> None:
    fake_nvml.update({"1.name": "NVIDIA H100 PCIe", "0.temperature": 66})
    assert not any(s.lost for s in source.read())
    fake_nvml.update({"1.lost": 1})
    healthy, lost = source.read()
    assert (healthy.lost, healthy.temperature_c) == (False, 66.0)
    assert lost.lost
    # The card is named from what was read before it fell off the bus.
    assert lost.name == "NVIDIA H100 PCIe"
    assert lost.temperature_c is None and lost.memory_used_bytes is None
    fake_nvml.remove("1.lost")
    assert not source.read()[1].lost


def test_gpu_lost_mid_read_on_one_call(fake_nvml: FakeNvml, source: NvmlSource) -> None:
    fake_nvml.update({"0.power.error": GPU_IS_LOST})
    first, second = source.read()
    assert first.lost and not second.lost


def test_gpu_lost_before_first_read_has_no_name(fake_nvml: FakeNvml) -> None:
    fake_nvml.update({"1.lost": 1})
    src = open_nvml(clock=FakeClock(), environ=NO_ENV)
    try:
        lost = src.read()[1]
    finally:
        src.close()
    assert lost.lost and lost.name == "" and lost.uuid == ""


def test_other_errors_fail_the_read_with_a_named_error(
    fake_nvml: FakeNvml, source: NvmlSource
) -> None:
    fake_nvml.update({"1.temperature.error": UNKNOWN})
    with pytest.raises(TelemetryError) as caught:
        source.read()
    assert caught.value.name == "nvml_unknown"
    fake_nvml.update({"1.temperature.error": 10})
    with pytest.raises(TelemetryError, match="nvml_timeout"):
        source.read()


def test_older_driver_entry_points_are_used_as_fallback(
    fake_nvml: FakeNvml, source: NvmlSource
) -> None:
    fake_nvml.update(
        {
            "0.clocks_event_reasons.error": FUNCTION_NOT_FOUND,
            "0.clocks_reasons": 0x44,
            "0.temperature": 71,
        }
    )
    sample = source.read()[0]
    assert sample.throttle == {"sw_power_cap", "hw_thermal"}
    fake_nvml.update({"0.clocks_throttle_reasons.error": FUNCTION_NOT_FOUND})
    assert not throttle_known(source.read()[0])


def test_driver_not_loaded_at_init(fake_nvml: FakeNvml) -> None:
    fake_nvml.update({"init_error": DRIVER_NOT_LOADED})
    with pytest.raises(NvmlUnavailable) as caught:
        open_nvml(clock=FakeClock(), environ=NO_ENV)
    reason = caught.value.reason
    assert "NVIDIA driver is not loaded" in reason
    assert "\n" not in reason


def test_missing_library_reads_like_a_machine_without_a_driver(
    fake_nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_NVML_STATE", str(fake_nvml.state_path) + ".absent")
    with pytest.raises(NvmlUnavailable, match=r"libnvidia-ml\.so\.1 not found"):
        open_nvml(clock=FakeClock(), environ=NO_ENV)


def test_no_gpus_is_unavailable(fake_nvml: FakeNvml) -> None:
    fake_nvml.update({"gpu_count": 0})
    with pytest.raises(NvmlUnavailable, match="no GPUs"):
        open_nvml(clock=FakeClock(), environ=NO_ENV)


def test_explicit_indices_and_bad_index(fake_nvml: FakeNvml) -> None:
    src = open_nvml(clock=FakeClock(), gpu_indices=[1], environ={"CUDA_VISIBLE_DEVICES": "0"})
    try:
        assert [s.index for s in src.read()] == [1]
    finally:
        src.close()
    with pytest.raises(NvmlUnavailable, match="GPU index 2 requested, but NVML sees 2"):
        open_nvml(clock=FakeClock(), gpu_indices=[2], environ=NO_ENV)


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        ("1", (1,)),
        ("1,0", (1, 0)),
        ("GPU-22222222", (1,)),
        ("gpu-22222222-aaaa,0", (1, 0)),
        ("0,MIG-abc,1", (0,)),  # CUDA stops at the first token it cannot use
        ("7", (0, 1)),  # names nothing here: watch every GPU rather than none
        ("", (0, 1)),
        ("-1", (0, 1)),
    ],
)
def test_cuda_visible_devices(fake_nvml: FakeNvml, visible: str, expected: tuple[int, ...]) -> None:
    fake_nvml.update({"1.uuid": "GPU-22222222-aaaa-4bbb-8ccc-dddddddddddd"})
    src = open_nvml(clock=FakeClock(), environ={"CUDA_VISIBLE_DEVICES": visible})
    try:
        assert src.indices == expected
        assert (src.selection_note is None) == (visible not in ("7", "", "-1"))
    finally:
        src.close()


def test_resolve_visible_devices_is_pure() -> None:
    uuids = ["GPU-aaaa1111", "GPU-aaaa2222", None]
    assert resolve_visible_devices("2, 0", uuids) == (2, 0)
    assert resolve_visible_devices("0,0,1", uuids) == (0, 1)
    assert resolve_visible_devices("GPU-aaaa2", uuids) == (1,)
    assert resolve_visible_devices("GPU-aaaa", uuids) == ()  # ambiguous prefix
    assert resolve_visible_devices("3", uuids) == ()


def test_close_is_idempotent_and_read_after_close_fails(fake_nvml: FakeNvml) -> None:
    src = open_nvml(clock=FakeClock(), environ=NO_ENV)
    src.close()
    src.close()
    with pytest.raises(TelemetryError, match="nvml_closed"):
        src.read()


_CHILD = """
import json
from meltguard.clock import SystemClock
from meltguard.daemon.telemetry.errors import NvmlUnavailable
from meltguard.daemon.telemetry.nvml import open_nvml
try:
    src = open_nvml(clock=SystemClock(), environ={})
except NvmlUnavailable as exc:
    print(json.dumps({"unavailable": exc.reason}))
else:
    print(json.dumps([[s.index, s.temperature_c, s.lost] for s in src.read()]))
    src.close()
"""


def test_subprocess_loads_the_fake_from_ld_library_path(fake_nvml: FakeNvml) -> None:
    fake_nvml.update({"0.temperature": 77, "1.lost": 1})
    out = subprocess.run(
        [sys.executable, "-c", _CHILD],
        env=fake_nvml.env(),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert json.loads(out.stdout) == [[0, 77.0, False], [1, None, True]]


@pytest.mark.skipif(
    ctypes.util.find_library("nvidia-ml") is not None, reason="this machine has a real NVML"
)
def test_subprocess_without_a_driver_gets_a_readable_reason() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    reason = json.loads(out.stdout)["unavailable"]
    assert reason.startswith("NVML library libnvidia-ml.so.1 not found")
