"""Each format the replay reader detects, from small fixtures written for it (tests/telemetry/data),
and the `FILE?columns=...` options."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from meltguard.daemon.telemetry.replay import (
    ReplayFormatError,
    Trace,
    load_trace_file,
    parse_text,
    split_spec,
)
from meltguard.daemon.telemetry.samples import ThrottleUnknownSample, throttle_known
from meltguard.values import GpuSample

DATA = Path(__file__).with_name("data")
MIB = 1024 * 1024
GIB = 1024 * MIB


def temps(trace: Trace, index: int = 0) -> list[float | None]:
    return [s.temperature_c for f in trace.frames for s in f.samples if s.index == index]


def only(trace: Trace, frame: int, index: int) -> GpuSample:
    (sample,) = (s for s in trace.frames[frame].samples if s.index == index)
    return sample


# ---- meltguard JSONL ---------------------------------------------------------------------------


def test_a_recording_with_its_comment_line() -> None:
    trace = load_trace_file(DATA / "recorded.jsonl")
    assert trace.format == "meltguard JSONL"
    assert trace.started == "2026-12-07T14:00:00+00:00"
    assert [f.offset for f in trace.frames] == [0.0, 0.5]
    hot = only(trace, 1, 0)
    assert hot.slowdown_c == 87.0 and hot.throttle == {"sw_power_cap", "sw_thermal"}
    assert isinstance(only(trace, 0, 1), ThrottleUnknownSample)
    assert only(trace, 1, 1).lost and only(trace, 1, 1).uuid == "GPU-7a3e9b10"


# ---- nvidia-smi dmon ----------------------------------------------------------------------------


def test_dmon_without_times_takes_passes_one_second_apart() -> None:
    trace = load_trace_file(DATA / "dmon.txt")
    assert trace.format == "nvidia-smi dmon"
    assert [f.offset for f in trace.frames] == [0.0, 1.0, 2.0]
    assert [len(f.samples) for f in trace.frames] == [2, 2, 2]  # repeated headers skipped
    assert temps(trace, 0) == [41.0, 62.0, 71.0]
    busy = only(trace, 1, 0)
    assert (busy.power_w, busy.utilization, busy.memory_used_bytes) == (251.0, 0.97, 30000 * MIB)
    assert busy.memory_total_bytes is None and busy.slowdown_c is None
    assert only(trace, 1, 1).utilization is None  # "-" is absent, never 0
    assert isinstance(busy, ThrottleUnknownSample)  # dmon has no reasons column
    assert any("1 s apart" in note for note in trace.notes)
    assert trace.started is None  # dmon without -o DT says nothing of when


def test_dmon_interval_option() -> None:
    trace = load_trace_file(f"{DATA / 'dmon.txt'}?interval=5s")
    assert [f.offset for f in trace.frames] == [0.0, 5.0, 10.0]


def test_dmon_date_and_time_columns_cross_midnight() -> None:
    trace = load_trace_file(DATA / "dmon_dt.txt")
    assert trace.format == "nvidia-smi dmon"
    assert [f.offset for f in trace.frames] == [0.0, 1.0, 3.0]
    assert temps(trace) == [83.0, 85.0, 84.0]
    assert trace.started == "20261207 23:59:58"


def test_dmon_time_only_wraps_at_midnight() -> None:
    text = (
        "#Time        gpu    pwr  gtemp     sm\n"
        "#HH:MM:SS    Idx      W      C      %\n"
        " 23:59:59      0    100     50     10\n"
        " 00:00:00      0    101     51     11\n"
    )
    trace = parse_text(text, "t.txt")
    assert [f.offset for f in trace.frames] == [0.0, 1.0]


def test_dmon_refusals() -> None:
    header = "# gpu    pwr  gtemp\n# Idx      W      C\n"
    with pytest.raises(ReplayFormatError) as caught:
        parse_text(header + "    0    100\n", "d.txt")
    assert str(caught.value) == "d.txt:3: 2 columns, the dmon header has 3: '0    100'"
    with pytest.raises(ReplayFormatError) as caught:
        parse_text(header + "    0    100   nan\n", "d.txt")
    assert str(caught.value).startswith("d.txt:3: gtemp: 'nan' is not a reading (NaN and")


# ---- DCGM exporter ------------------------------------------------------------------------------


def test_dcgm_scrapes_become_frames() -> None:
    trace = load_trace_file(DATA / "dcgm.prom")
    assert trace.format == "DCGM exporter metrics"
    assert [f.offset for f in trace.frames] == [0.0, 15.0]
    assert trace.started == "2025-12-07 16:00:00 UTC"  # from the ms timestamps
    first = only(trace, 0, 0)
    assert first.uuid == "GPU-5fd4e1a0-1111-2222-3333-444455556666"
    assert first.name == "NVIDIA H100 80GB HBM3"
    assert (first.temperature_c, first.power_w, first.utilization) == (61.0, 512.25, 0.97)
    assert first.memory_used_bytes == 70000 * MIB
    assert first.memory_total_bytes == 81559 * MIB  # FB_USED + FB_FREE
    assert throttle_known(first) and first.throttle == frozenset()
    hot = only(trace, 1, 0)
    assert hot.temperature_c == 86.0 and hot.throttle == {"sw_thermal", "hw_thermal"}  # 0x60
    assert hot.memory_used_bytes is None  # not scraped again: absent, not carried over


def test_promtool_dump_series_one_after_another() -> None:
    trace = load_trace_file(DATA / "promtool_dump.txt")
    assert trace.format == "DCGM exporter metrics"
    assert [f.offset for f in trace.frames] == [0.0, 30.0, 60.0]
    assert temps(trace) == [70.0, 74.0, 79.0]
    assert [f.samples[0].power_w for f in trace.frames] == [380.0, 395.0, 400.0]
    assert trace.frames[0].samples[0].name == "NVIDIA A100-SXM4-80GB"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_a_dump_from_real_promtool(tmp_path: Path) -> None:
    """DCGM series written into a real Prometheus TSDB, dumped as the README says, replayed."""
    source = tmp_path / "in.om"
    source.write_text(
        "# TYPE DCGM_FI_DEV_GPU_TEMP gauge\n"
        'DCGM_FI_DEV_GPU_TEMP{gpu="0",UUID="GPU-a",modelName="NVIDIA A100"} 70 1765123200\n'
        'DCGM_FI_DEV_GPU_TEMP{gpu="0",UUID="GPU-a",modelName="NVIDIA A100"} 88 1765123215\n'
        'DCGM_FI_DEV_GPU_TEMP{gpu="1",UUID="GPU-b",modelName="NVIDIA A100"} 60 1765123200\n'
        'DCGM_FI_DEV_GPU_TEMP{gpu="1",UUID="GPU-b",modelName="NVIDIA A100"} 61 1765123215\n'
        "# TYPE DCGM_FI_DEV_CLOCK_THROTTLE_REASONS gauge\n"
        'DCGM_FI_DEV_CLOCK_THROTTLE_REASONS{gpu="0",UUID="GPU-a"} 0 1765123200\n'
        'DCGM_FI_DEV_CLOCK_THROTTLE_REASONS{gpu="0",UUID="GPU-a"} 64 1765123215\n'
        "# EOF\n"
    )
    data = tmp_path / "tsdb"
    subprocess.run(["promtool", "tsdb", "create-blocks-from", "openmetrics", str(source),
                    str(data)], check=True, capture_output=True, timeout=60)
    (data / "wal").mkdir(exist_ok=True)  # dump also reads the head, which a fresh folder lacks
    dump = subprocess.run(["promtool", "tsdb", "dump", '--match={__name__=~"DCGM_FI_DEV_.*"}',
                           str(data)], check=True, capture_output=True, text=True, timeout=60)
    trace = parse_text(dump.stdout, "dump.txt")
    assert trace.format == "DCGM exporter metrics"
    assert [f.offset for f in trace.frames] == [0.0, 15.0]
    assert temps(trace, 0) == [70.0, 88.0] and temps(trace, 1) == [60.0, 61.0]
    assert only(trace, 1, 0).throttle == {"hw_thermal"} and only(trace, 0, 0).uuid == "GPU-a"
    assert isinstance(only(trace, 1, 1), ThrottleUnknownSample)


def test_dcgm_scrapes_apart_in_time_are_apart_even_without_a_repeat() -> None:
    text = ('DCGM_FI_DEV_GPU_TEMP{gpu="0"} 50 1765123200000\n'
            'DCGM_FI_DEV_GPU_TEMP{gpu="1"} 51 1765123215000\n')
    trace = parse_text(text, "t.prom")
    assert [(f.offset, [s.index for s in f.samples]) for f in trace.frames] == [(0.0, [0]),
                                                                                 (15.0, [1])]


def test_dcgm_without_timestamps() -> None:
    one = 'DCGM_FI_DEV_GPU_TEMP{gpu="0"} 50\nDCGM_FI_DEV_GPU_TEMP{gpu="1"} 51\n'
    trace = parse_text(one, "s.prom")
    assert len(trace.frames) == 1 and [s.temperature_c for s in trace.frames[0].samples] == [
        50.0,
        51.0,
    ]
    with pytest.raises(ReplayFormatError) as caught:
        parse_text(one + one, "s.prom")
    assert str(caught.value) == (
        "s.prom:3: DCGM_FI_DEV_GPU_TEMP for GPU 0 repeats in samples without timestamps; say how "
        "far apart the scrapes were with ?interval=15s"
    )


def test_dcgm_refusals() -> None:
    for text, message in [
        ('DCGM_FI_DEV_GPU_TEMP{gpu="0"} NaN 1765123200000\n',
         "x.prom:1: DCGM_FI_DEV_GPU_TEMP: 'NaN' is not a reading"),
        ('DCGM_FI_DEV_GPU_TEMP{gpu="0"} +Inf 1765123200000\n',
         "x.prom:1: DCGM_FI_DEV_GPU_TEMP: '+Inf' is not a reading"),
        ('DCGM_FI_DEV_GPU_TEMP{UUID="GPU-1"} 50 1765123200000\n',
         "x.prom:1: DCGM_FI_DEV_GPU_TEMP sample has no gpu label"),
        ('DCGM_FI_DEV_GPU_TEMP{gpu="0"} 50 1765123200000\nDCGM_FI_DEV_GPU_TEMP{gpu="0"} 50\n',
         "x.prom:2: a sample without a timestamp among samples with them"),
        ("# HELP DCGM_FI_DEV_GPU_TEMP x\nDCGM_FI_DEV_GPU_TEMP{gpu=0} 50\n",
         "x.prom:2: labels not like name=\"value\": 'gpu=0'"),
    ]:
        with pytest.raises(ReplayFormatError) as caught:
            parse_text(text, "x.prom")
        assert str(caught.value).startswith(message), str(caught.value)


# ---- CSV with named columns ---------------------------------------------------------------------


def test_named_columns_with_synonyms_units_and_sentinels() -> None:
    trace = load_trace_file(DATA / "named_columns.csv")
    assert trace.format == "CSV with named columns"
    assert [f.offset for f in trace.frames] == [0.0, 0.5]  # epoch milliseconds
    assert trace.started == "2025-12-07 16:00:00 UTC"
    a, b = trace.frames[0].samples
    assert (a.index, a.temperature_c, a.power_w, a.utilization) == (0, 55.0, 120.5, 0.30)
    assert a.memory_used_bytes == 10 * GIB and a.memory_total_bytes == 80 * GIB
    assert b.power_w is None  # -1 is the pynvml loggers' N/A
    assert any("fan_speed_percent" in note for note in trace.notes)


def test_a_csv_with_dcgm_field_names_is_a_csv() -> None:
    text = ("timestamp,gpu,DCGM_FI_DEV_GPU_TEMP,DCGM_FI_DEV_POWER_USAGE\n"
            "1765123200.5,0,77,650.5\n1765123201.5,0,78,651\n")
    trace = parse_text(text, "d.csv")
    assert trace.format == "CSV with named columns"
    assert temps(trace) == [77.0, 78.0] and [f.offset for f in trace.frames] == [0.0, 1.0]


def test_named_columns_relative_times_and_delimiters() -> None:
    trace = parse_text("elapsed_ms;gpu;temp_c\n0;0;40\n250;0;41\n", "r.csv")
    assert [f.offset for f in trace.frames] == [0.0, 0.25]
    assert trace.started is None  # offsets, not times
    trace = parse_text("t\tgpu_id\tgpu_temp\n0\t0\t40\n2\t0\t41\n", "r.tsv")
    assert temps(trace) == [40.0, 41.0]


def test_two_gpu_columns_pick_the_one_unique_per_time() -> None:
    text = (
        "timestamp,gpu,index,temperature.gpu\n"
        "2025-09-08T17:26:50+08:00,0,0,30\n"
        "2025-09-08T17:26:50+08:00,1,0,31\n"
        "2025-09-08T17:26:51+08:00,0,0,32\n"
        "2025-09-08T17:26:51+08:00,1,0,33\n"
    )
    trace = parse_text(text, "g.csv")
    assert [[s.index for s in f.samples] for f in trace.frames] == [[0, 1], [0, 1]]
    assert temps(trace, 1) == [31.0, 33.0]
    assert "GPU index from column 'gpu' (the one unique per time)" in trace.notes


# ---- nvidia-smi CSV variants --------------------------------------------------------------------


def test_tlimit_gives_the_slowdown_temperature_and_reasons_decode() -> None:
    trace = load_trace_file(DATA / "smi_tlimit_reasons.csv")
    assert trace.format == "nvidia-smi --query-gpu CSV"
    first, second = (f.samples[0] for f in trace.frames)
    assert [f.offset for f in trace.frames] == [0.0, 0.5]  # ISO-8601 with an offset
    assert trace.started == "2026-12-07T10:00:00.000+01:00"  # as written: zones are kept
    assert (first.temperature_c, first.slowdown_c) == (81.0, 87.0)
    assert first.throttle == {"sw_power_cap"}
    assert (second.slowdown_c, second.throttle) == (87.0, frozenset({"sw_power_cap",
                                                                     "sw_thermal"}))
    assert (second.power_w, second.power_limit_w) == (349.9, 350.0)


def test_the_documented_recording_command_is_read_whole() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    fields = re.findall(r"nvidia-smi --query-gpu=([\w.,]+) --format=csv", readme)
    assert fields, "the README documents an nvidia-smi recording command"
    for listed in fields:
        columns = listed.split(",")
        assert {"temperature.gpu.tlimit", "clocks_event_reasons.active"} <= set(columns)
        values = {"timestamp": "2026/11/25 07:38:44.123", "index": "0", "uuid": "GPU-a",
                  "name": "NVIDIA H100", "temperature.gpu": "84", "temperature.gpu.tlimit": "3",
                  "utilization.gpu": "97 %", "memory.used": "70000 MiB",
                  "memory.total": "81559 MiB", "power.draw": "690.00 W",
                  "power.limit": "700.00 W", "clocks_event_reasons.active": "0x0000000000000020"}
        text = ", ".join(columns) + "\n" + ", ".join(values[c] for c in columns) + "\n"
        trace = parse_text(text, "documented.csv")
        sample = trace.frames[0].samples[0]
        assert trace.notes == ()  # every column is used
        assert (sample.slowdown_c, sample.throttle) == (87.0, frozenset({"sw_thermal"}))
        assert sample.power_limit_w == 700.0 and sample.memory_ratio is not None


def test_single_gpu_without_index_and_repeated_header_and_crlf() -> None:
    text = (
        "timestamp, utilization.gpu [%], temperature.gpu\r\n"
        "2026/03/09 13:25:35.192, 0 %, 42\r\n"
        "timestamp, utilization.gpu [%], temperature.gpu\r\n"
        "2026/03/09 13:25:36.193, 100 %, 44\r\n"
    )
    trace = parse_text(text, "a.csv")
    assert temps(trace) == [42.0, 44.0]
    assert [f.offset for f in trace.frames] == pytest.approx([0.0, 1.001])
    assert "1 repeated header row(s) skipped" in trace.notes


def test_a_run_appended_with_another_query() -> None:
    text = (
        "timestamp, index, temperature.gpu\n"
        "2026/03/09 13:25:35.000, 0, 42\n"
        "timestamp, index, temperature.gpu, power.draw [W], clocks_event_reasons.active\n"
        "2026/03/09 13:30:00.000, 0, 70, 300.00 W, 0x0000000000000004\n"
    )
    trace = parse_text(text, "two.csv")
    assert temps(trace) == [42.0, 70.0]
    assert [f.offset for f in trace.frames] == [0.0, 265.0]
    first, second = (f.samples[0] for f in trace.frames)
    assert isinstance(first, ThrottleUnknownSample) and first.power_w is None
    assert second.power_w == 300.0 and second.throttle == {"sw_power_cap"}
    assert "the header changes at line(s) 3" in trace.notes


def test_utf8_bom_and_utf16_are_read(tmp_path: Path) -> None:
    text = "timestamp, index, temperature.gpu\n2026/03/09 13:25:35.192, 0, 42\n"
    read_as = [("utf-8-sig", "read as UTF-8 with BOM"), ("utf-16-le", "read as UTF-16 LE")]
    for encoding, note in read_as:
        path = tmp_path / f"{encoding}.csv"
        bom = b"\xff\xfe" if encoding == "utf-16-le" else b""
        path.write_bytes(bom + text.encode(encoding))
        trace = load_trace_file(path)
        assert temps(trace) == [42.0] and note in trace.notes


# ---- explicit columns ---------------------------------------------------------------------------

NOHEADER = "2026/02/22 23:20:03.856, 0, RTX, 9, 65\n2026/02/22 23:20:04.860, 0, RTX, 18, 66\n"


def test_columns_name_a_file_without_header(tmp_path: Path) -> None:
    path = tmp_path / "noheader.csv"
    path.write_text(NOHEADER)
    trace = load_trace_file(f"{path}?columns=timestamp,index,name,utilization.gpu,temperature.gpu")
    assert temps(trace) == [65.0, 66.0]
    assert trace.frames[1].samples[0].utilization == 0.18
    skipped = load_trace_file(f"{path}?columns=timestamp,index,-,-,temp_c")
    assert temps(skipped) == [65.0, 66.0] and skipped.frames[0].samples[0].name == ""


def test_columns_replace_a_header_they_cannot_read(tmp_path: Path) -> None:
    path = tmp_path / "odd.csv"
    path.write_text("Zeit,Karte,Temperatur\n1765123200,0,70\n1765123201,0,71\n")
    with pytest.raises(ReplayFormatError, match="header names no time column"):
        load_trace_file(path)
    trace = load_trace_file(f"{path}?columns=timestamp,gpu,temp_c")
    assert temps(trace) == [70.0, 71.0]


def test_options_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text(NOHEADER)
    for spec, message in [
        (f"{path}?colums=a", f"{path}:0: unknown trace option 'colums' after '?'"),
        (f"{path}?interval=fast", f"{path}:0: interval='fast' is not a duration"),
        (f"{path}?format=xml", f"{path}:0: format='xml' is not one of"),
        (f"{path}?columns=index,name", f"{path}:0: columns= names no time column"),
        (f"{path}?columns=timestamp,index",
         f"{path}:1: 5 cells, columns= names 2: '2026/02/22 23:20:03.856, 0, RTX, 9, 65'"),
    ]:
        with pytest.raises(ReplayFormatError) as caught:
            load_trace_file(spec)
        assert str(caught.value).startswith(message), str(caught.value)


def test_a_path_with_a_question_mark_is_taken_whole(tmp_path: Path) -> None:
    path = tmp_path / "why?.csv"
    path.write_text("timestamp, index, temperature.gpu\n2026/03/09 13:25:35.192, 0, 42\n")
    assert split_spec(str(path))[0] == str(path)
    assert temps(load_trace_file(path)) == [42.0]


def test_format_option_skips_detection() -> None:
    text = "# gpu pwr\n# Idx W\n 0 100\n"
    assert parse_text(text, "d").format == "nvidia-smi dmon"
    path, options = split_spec("/nowhere/x.txt?format=dmon&interval=2s")
    assert (path, options.format, options.interval) == ("/nowhere/x.txt", "dmon", 2.0)
