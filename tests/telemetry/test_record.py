"""`meltguard record` over the real pynvml bindings and the fake libnvidia-ml, read back."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meltguard.clock import FakeClock
from meltguard.daemon.cli import build_parser, main
from meltguard.daemon.record import record, run_record, sample_line
from meltguard.daemon.telemetry.errors import TelemetryError
from meltguard.daemon.telemetry.nvml import open_nvml
from meltguard.daemon.telemetry.replay import load_trace_file, parse_text
from meltguard.daemon.telemetry.samples import ThrottleUnknownSample, throttle_known
from meltguard.values import THROTTLE_REASONS, GpuSample
from tests.fakenvml import NOT_SUPPORTED, FakeNvml, StateValue
from tests.telemetry.helpers import ScriptedSource, gpu

GIB = 1024**3
HOT: dict[str, StateValue] = {
    "0.name": "NVIDIA H100 80GB HBM3",
    "0.temperature": 80,
    "0.slowdown": 87,
    "0.shutdown": 92,
    "0.memory_total": 80 * GIB,
    "0.memory_used": 70 * GIB,
    "0.util_gpu": 97,
    "0.power_mw": 651_250,
    "0.power_limit_mw": 700_000,
    "0.clocks_reasons": 0x24,  # sw_power_cap + sw_thermal
    "1.clocks_event_reasons.error": NOT_SUPPORTED,
    "1.clocks_throttle_reasons.error": NOT_SUPPORTED,
}


def test_records_every_field_and_replay_reads_it_back(fake_nvml: FakeNvml, tmp_path: Path) -> None:
    fake_nvml.update(HOT)
    clock = FakeClock()
    source = open_nvml(clock=clock, environ={})
    expected = [replace(s, taken_at=0.0) for s in source.read()]

    def sleep(seconds: float) -> None:
        clock.advance(seconds)
        fake_nvml.update({"0.temperature": 85})  # heats after the first frame

    path = tmp_path / "trace.jsonl"
    with path.open("w") as out:
        done = record(source, out, clock=clock, sleep=sleep, interval=0.5, duration=2.0,
                      header="meltguard record: test")
    source.close()
    assert (done.frames, done.failed_reads, done.gpus) == (4, 0, frozenset({0, 1}))
    assert path.read_text().startswith("# meltguard record: test\n{\"t\": 0.0, \"index\": 0, ")

    trace = load_trace_file(path)
    assert trace.format == "meltguard JSONL"
    assert [f.offset for f in trace.frames] == [0.0, 0.5, 1.0, 1.5]
    assert list(trace.frames[0].samples) == expected
    hot, blind = trace.frames[0].samples
    assert (hot.slowdown_c, hot.shutdown_c, hot.power_w, hot.power_limit_w) == (
        87.0, 92.0, 651.25, 700.0)
    assert hot.throttle == {"sw_power_cap", "sw_thermal"} and throttle_known(hot)
    assert isinstance(blind, ThrottleUnknownSample)  # null, not "not throttling"
    assert [f.samples[0].temperature_c for f in trace.frames] == [80.0, 85.0, 85.0, 85.0]


def test_a_lost_gpu_is_recorded_lost(fake_nvml: FakeNvml) -> None:
    fake_nvml.update({"1.lost": 1})
    clock = FakeClock()
    source = open_nvml(clock=clock, environ={})
    out = io.StringIO()
    record(source, out, clock=clock, sleep=clock.advance, interval=1.0, duration=1.0, header="h")
    source.close()
    frame = parse_text(out.getvalue(), "mem").frames[0]
    assert [(s.index, s.lost) for s in frame.samples] == [(0, False), (1, True)]


def test_slow_reads_skip_grid_points_and_failed_reads_leave_gaps() -> None:
    clock = FakeClock()

    def slow() -> list:  # type: ignore[type-arg]
        clock.advance(0.7)  # longer than the 0.5 s interval
        return [gpu(0)]

    out = io.StringIO()
    done = record(ScriptedSource([slow]), out, clock=clock, sleep=clock.advance, interval=0.5,
                  duration=2.5, header="h")
    assert [f.offset for f in parse_text(out.getvalue(), "m").frames] == [0.0, 1.0, 2.0]
    assert done.frames == 3

    failing = ScriptedSource([[gpu(0)], TelemetryError("nvml_unknown", "boom"), [gpu(0)]])
    out = io.StringIO()
    done = record(failing, out, clock=clock, sleep=clock.advance, interval=1.0, duration=3.0,
                  header="h")
    assert (done.frames, done.failed_reads, done.last_error) == (2, 1, "nvml_unknown: boom")
    assert [f.offset for f in parse_text(out.getvalue(), "m").frames] == [0.0, 2.0]


def test_record_command(fake_nvml: FakeNvml, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    fake_nvml.update(HOT)
    path = tmp_path / "incident.jsonl"
    args = build_parser().parse_args(
        ["record", "--out", str(path), "--interval", "250ms", "--duration", "1s", "--gpus", "0"])
    clock = FakeClock()
    assert run_record(args, clock=clock, sleep=clock.advance) == 0
    err = capsys.readouterr().err
    assert err == (f"recorded 4 frames of 1 GPU(s) over 0.8 s to {path}, 0 failed read(s); "
                   f"replay it with --telemetry replay:{path}\n")
    first = path.read_text().splitlines()[0]
    assert first == ("# meltguard record: nvml, driver 550.54.15, interval 0.25 s, started "
                     "2026-01-01T00:16:40+00:00")
    assert main(["gpus", "--telemetry", f"replay:{path}"]) == 0
    summary = capsys.readouterr().out.splitlines()
    assert summary[1] == "format: meltguard JSONL   started: 2026-01-01T00:16:40+00:00"
    assert summary[2].startswith("GPUs: 1 (0)   duration: 0.8s   frames: 4, every 0.25 s")
    row = summary[4]
    for cell in ("80 (80 at 0.0s)", "87", "651", "700", "70.0/80.0 (88%)",
                 "sw_power_cap (4), sw_thermal (4)"):
        assert cell in row


def test_record_refusals(fake_nvml: FakeNvml, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "t.jsonl")
    assert main(["record", "--out", out, "--interval", "soon"]) == 2
    assert capsys.readouterr().err == (
        "meltguard record: expected a duration like 500ms, 10s, 1m, 2h or 1d, got 'soon'\n")
    for interval in ("0s", "5ms"):
        assert main(["record", "--out", out, "--interval", interval]) == 2
        assert "--interval must be at least 10ms" in capsys.readouterr().err
    assert main(["record", "--out", out, "--duration", "0s"]) == 2
    assert "--duration above zero" in capsys.readouterr().err
    assert main(["record", "--out", str(tmp_path / "no" / "dir.jsonl"), "--duration", "1s"]) == 2
    assert "cannot write" in capsys.readouterr().err
    monkeypatch.setenv("FAKE_NVML_STATE", str(fake_nvml.state_path) + ".absent")
    assert main(["record", "--out", out, "--duration", "1s"]) == 1
    assert capsys.readouterr().err.startswith(
        "meltguard record: NVML unavailable: NVML library libnvidia-ml.so.1 not found")


_reading = st.none() | st.floats(min_value=-50, max_value=2000, allow_nan=False)
_bytes = st.none() | st.integers(min_value=0, max_value=2**48)


@st.composite
def _samples(draw: st.DrawFn) -> GpuSample:
    fields: dict[str, Any] = {
        "index": draw(st.integers(min_value=0, max_value=15)),
        "uuid": draw(st.text(max_size=12)),
        "name": draw(st.text(max_size=24)),
        "taken_at": 0.0,
    }
    kind = draw(st.sampled_from(["known", "unknown", "lost"]))
    if kind == "lost":
        return GpuSample(**fields, lost=True)
    for field in ("temperature_c", "slowdown_c", "shutdown_c", "utilization", "power_w",
                  "power_limit_w"):
        fields[field] = draw(_reading)
    for field in ("memory_used_bytes", "memory_total_bytes"):
        fields[field] = draw(_bytes)
    if kind == "unknown":
        return ThrottleUnknownSample(**fields)
    return GpuSample(**fields, throttle=draw(st.frozensets(st.sampled_from(THROTTLE_REASONS))))


@given(st.lists(_samples(), min_size=1, max_size=6, unique_by=lambda s: s.index))
def test_every_sample_survives_the_round_trip(samples: list[GpuSample]) -> None:
    text = "".join(sample_line(1.5, s) + "\n" for s in samples)
    (frame,) = parse_text(text, "prop.jsonl").frames
    expected = sorted(samples, key=lambda s: s.index)
    assert list(frame.samples) == expected
    # Unknown throttle state stays unknown: it is not read back as "not throttling".
    assert [type(s) for s in frame.samples] == [type(s) for s in expected]


def test_record_to_stdout_until_interrupted(fake_nvml: FakeNvml,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    clock = FakeClock()
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 3:
            raise KeyboardInterrupt  # Ctrl-C during the third wait
        clock.advance(seconds)

    args = build_parser().parse_args(["record", "--out", "-", "--interval", "1s"])
    assert run_record(args, clock=clock, sleep=sleep) == 0
    out, err = capsys.readouterr()
    trace = parse_text(out, "stdout")
    assert [f.offset for f in trace.frames] == [0.0, 1.0, 2.0]
    assert err.startswith("recorded 3 frames of 2 GPU(s) over 2.0 s to stdout")
