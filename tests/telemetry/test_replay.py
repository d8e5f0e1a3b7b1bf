"""Replaying nvidia-smi CSV and JSONL traces against a clock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meltguard.clock import FakeClock
from meltguard.daemon.telemetry.replay import (
    ReplayFormatError,
    ReplaySource,
    frames_from_samples,
    parse_jsonl,
    parse_nvidia_smi_csv,
    parse_trace,
)
from meltguard.daemon.telemetry.samples import ThrottleUnknownSample, throttle_known
from tests.telemetry.helpers import gpu

DATA = Path(__file__).with_name("data")
MIB = 1024 * 1024

# Exactly the columns of the documented nvidia-smi command, two GPUs, with the odd cells nvidia-smi
# really prints.
SMI_CSV = """\
timestamp, index, uuid, name, temperature.gpu, utilization.gpu [%], memory.used [MiB], \
memory.total [MiB], power.draw [W], power.limit [W]
2026/11/25 07:38:44.123, 0, GPU-aaaa, NVIDIA H100 80GB HBM3, 45, 12 %, 1024 MiB, 81559 MiB, \
120.55 W, 700.00 W
2026/11/25 07:38:44.131, 1, GPU-bbbb, NVIDIA H100 80GB HBM3, 47, [N/A], 2048 MiB, 81559 MiB, \
[N/A], 700.00 W
2026/11/25 07:38:44.623, 0, GPU-aaaa, NVIDIA H100 80GB HBM3, 46, 90 %, 4096 MiB, 81559 MiB, \
450.00 W, 700.00 W
2026/11/25 07:38:44.630, 1, [GPU is lost], [GPU is lost], [GPU is lost], [GPU is lost], \
[GPU is lost], [GPU is lost], [GPU is lost], [GPU is lost]
"""


def test_parses_nvidia_smi_csv() -> None:
    frames = parse_nvidia_smi_csv(SMI_CSV)
    assert [f.offset for f in frames] == pytest.approx([0.0, 0.5])
    first, second = frames
    a, b = first.samples
    assert (a.index, a.uuid, a.name) == (0, "GPU-aaaa", "NVIDIA H100 80GB HBM3")
    assert a.temperature_c == 45.0
    assert a.utilization == pytest.approx(0.12)
    assert a.memory_used_bytes == 1024 * MIB
    assert a.memory_total_bytes == 81559 * MIB
    assert (a.power_w, a.power_limit_w) == (120.55, 700.0)
    assert a.slowdown_c is None  # nvidia-smi's query has no slowdown column
    assert not throttle_known(a)  # no reasons column: unknown, not "not throttling"
    assert b.utilization is None and b.power_w is None  # [N/A] is absent, never 0
    assert b.memory_used_bytes == 2048 * MIB
    lost = second.samples[1]
    assert lost.lost and lost.index == 1 and lost.temperature_c is None and lost.uuid == ""


def test_lost_rows_without_an_index_are_placed() -> None:
    lost = ", ".join(["[GPU is lost]"] * 3)
    text = (
        "timestamp, index, uuid, temperature.gpu\n"
        "2026/11/25 07:38:44.100, 0, GPU-a, 50\n"
        "2026/11/25 07:38:44.104, 1, GPU-b, 51\n"
        "2026/11/25 07:38:45.100, 0, GPU-a, 52\n"
        f"2026/11/25 07:38:45.104, {lost}\n"  # the pass's next GPU
        f"2026/11/25 07:38:46.100, {lost}\n"  # a new pass starts at GPU 0
        "2026/11/25 07:38:46.104, [GPU is lost], GPU-b, [GPU is lost]\n"  # known by UUID
    )
    frames = parse_nvidia_smi_csv(text)
    assert [[(s.index, s.lost) for s in f.samples] for f in frames] == [
        [(0, False), (1, False)],
        [(0, False), (1, True)],
        [(0, True), (1, True)],
    ]
    with pytest.raises(ReplayFormatError, match="<string>:2: index: must hold a GPU index"):
        parse_nvidia_smi_csv("timestamp, index\n2026/11/25 07:38:44.100, [N/A]\n")


def test_reasons_column_is_decoded() -> None:
    text = (
        "timestamp, index, temperature.gpu, clocks_event_reasons.active\n"
        "2026/11/25 07:38:44.123, 0, 88, 0x0000000000000060\n"
        "2026/11/25 07:38:45, 0, 40, 0x0000000000000001\n"
        "2026/11/25 07:38:46.000, 0, 40, [N/A]\n"
    )
    hot, idle, unknown = (f.samples[0] for f in parse_nvidia_smi_csv(text))
    assert hot.throttle == {"sw_thermal", "hw_thermal"} and throttle_known(hot)
    assert idle.throttle == {"gpu_idle"}
    assert isinstance(unknown, ThrottleUnknownSample)


def test_example_incident_trace() -> None:
    frames = parse_trace((DATA / "h100_incident.csv").read_text())
    temps = [f.samples[0].temperature_c for f in frames]
    assert temps[0] == 55.0
    assert max(t for t in temps if t is not None) == 88.0
    peak = temps.index(88.0)
    assert 0 < peak < len(temps) - 1
    assert temps[-1] is not None and temps[-1] < 60.0  # it cools again
    assert any("hw_thermal" in f.samples[0].throttle for f in frames)
    assert frames[-1].offset == pytest.approx(180.0, abs=0.1)


def test_plays_frames_by_offset_and_stops_at_the_end() -> None:
    clock = FakeClock()
    source = ReplaySource(parse_nvidia_smi_csv(SMI_CSV), clock=clock)
    assert source.kind == "replay"
    clock.advance(100)  # nothing before the first read counts
    first = source.read()
    assert [s.temperature_c for s in first] == [45.0, 47.0]
    assert all(s.taken_at == clock.monotonic() for s in first)
    clock.advance(0.49)
    assert source.read()[0].temperature_c == 45.0
    clock.advance(0.02)
    assert source.read()[0].temperature_c == 46.0
    clock.advance(0.45)  # the last frame holds for one typical gap (0.5 s)
    assert source.read()[1].lost
    clock.advance(0.05)
    assert source.read() == []
    clock.advance(60)
    assert source.read() == []


def test_loop_restarts() -> None:
    clock = FakeClock()
    source = ReplaySource(parse_nvidia_smi_csv(SMI_CSV), clock=clock, loop=True)
    assert source.duration == pytest.approx(1.0)
    temps = []
    for _ in range(6):
        temps.append(source.read()[0].temperature_c)
        clock.advance(0.5)
    assert temps == [45.0, 46.0] * 3


def test_parses_jsonl() -> None:
    lines = [
        {"t": 0, "index": 0, "temperature_c": 50, "throttle": [], "memory_used_bytes": 10},
        {"t": 0, "index": 1, "lost": True, "uuid": "GPU-b"},
        {"t": 2.5, "index": 0, "temperature_c": 80.5, "throttle": ["hw_thermal"]},
        {"t": 2.5, "index": 1, "utilization": None, "power_w": 300},
    ]
    text = "# recorded by hand\n" + "\n".join(json.dumps(line) for line in lines) + "\n\n"
    frames = parse_trace(text, origin="x.jsonl")
    assert [f.offset for f in frames] == [0.0, 2.5]
    a, b = frames[0].samples
    assert (a.temperature_c, a.memory_used_bytes, a.throttle) == (50.0, 10, frozenset())
    assert throttle_known(a)
    assert b.lost and b.uuid == "GPU-b"
    c, d = frames[1].samples
    assert c.throttle == {"hw_thermal"}
    assert isinstance(d, ThrottleUnknownSample) and d.utilization is None and d.power_w == 300.0


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"index": 0}', "x.jsonl:1: t: a number of seconds is required"),
        ('{"t": 0}', "x.jsonl:1: index: a GPU index (integer >= 0) is required"),
        ('{"t": 0, "index": 0, "temp": 3}', "x.jsonl:1: temp: unknown field"),
        ('{"t": 0, "index": 0, "throttle": ["hot"]}', "x.jsonl:1: throttle: unknown reason 'hot'"),
        ('{"t": 0, "index": 0, "power_w": "3 W"}', "x.jsonl:1: power_w: must be a number or null"),
        ("[1]", "x.jsonl:1: each line must be a JSON object"),
        ('{"t": 0, "index": 0', "x.jsonl:1: not JSON"),
    ],
)
def test_jsonl_errors_name_the_line(line: str, message: str) -> None:
    with pytest.raises(ReplayFormatError) as caught:
        parse_jsonl(line, origin="x.jsonl")
    assert str(caught.value).startswith(message)


def test_jsonl_rejects_time_going_backwards_and_duplicates() -> None:
    with pytest.raises(ReplayFormatError, match=r"x:2: time goes backwards"):
        parse_jsonl('{"t": 1, "index": 0}\n{"t": 0, "index": 0}', origin="x")
    with pytest.raises(ReplayFormatError, match=r"x:2: GPU 0 appears twice"):
        parse_jsonl('{"t": 1, "index": 0}\n{"t": 1, "index": 0}', origin="x")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("index, temperature.gpu\n0, 50\n",
         "t.csv:1: this looks like a CSV, but its header names no time column"),
        ("timestamp, index\nyesterday, 0\n", "t.csv:2: timestamp 'yesterday' is not like"),
        ("timestamp, index, temperature.gpu\n2026/11/25 07:38:44.123, 0, hot\n",
         "t.csv:2: temperature.gpu: not a number: 'hot'"),
        ("timestamp, index, temperature.gpu\n2026/11/25 07:38:44.123, 0\n", "t.csv:2: 2 cells"),
        ("timestamp, index\n", "t.csv:0: trace holds no samples"),
    ],
)
def test_csv_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(ReplayFormatError) as caught:
        parse_nvidia_smi_csv(text, origin="t.csv")
    assert str(caught.value).startswith(message)


def test_from_file_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text('{"t": 0, "index": 0, "temperature_c": 42}\n')
    source = ReplaySource.from_file(path, clock=FakeClock())
    assert source.read()[0].temperature_c == 42.0
    with pytest.raises(ReplayFormatError, match="cannot read replay trace"):
        ReplaySource.from_file(tmp_path / "absent.csv", clock=FakeClock())


def test_single_frame_lasts_one_second() -> None:
    clock = FakeClock()
    source = ReplaySource(frames_from_samples([(0.0, [gpu(0)])]), clock=clock)
    assert source.read()
    clock.advance(0.99)
    assert source.read()
    clock.advance(0.02)
    assert source.read() == []


def test_open_source_passes_read_options(tmp_path: Path) -> None:
    from meltguard.daemon.telemetry.select import open_source

    path = tmp_path / "noheader.csv"
    path.write_text("2026/02/22 23:20:03.856, 0, 65\n2026/02/22 23:20:04.856, 0, 66\n")
    source, note = open_source(f"replay:{path}?columns=timestamp,index,temperature.gpu",
                               clock=FakeClock(), busy_seconds=lambda: 0.0, inflight=lambda: 0)
    assert isinstance(source, ReplaySource) and note is None
    assert source.read()[0].temperature_c == 65.0
