"""Every real recording in ../shared/traces (sources in its README) read in place: loaded, checked
against the file's own columns, summarised by `meltguard gpus`, and replayed by
`meltguard simulate --trace`. MELTGUARD_TRACES overrides where the folder is."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from meltguard.daemon.cli import main
from meltguard.daemon.telemetry.replay import ReplayFormatError, Trace, load_trace_file
from tests.real_traces import spec as trace_spec
from tests.real_traces import traces_dir

ROOT = Path(__file__).resolve().parents[2]
POLICY = ROOT / "policies" / "bench.yaml"
TRACES = traces_dir()
FILES = sorted(p.relative_to(TRACES).as_posix() for p in TRACES.rglob("*.csv")) if TRACES else []
pytestmark = pytest.mark.skipif(
    TRACES is None, reason="no shared/traces folder above the repository (set MELTGUARD_TRACES)"
)


def spec(name: str) -> str:
    assert TRACES is not None
    return trace_spec(TRACES / name)


def load(name: str) -> Trace:
    return load_trace_file(spec(name))


def gpus(trace: Trace) -> set[int]:
    return {s.index for f in trace.frames for s in f.samples}


def series(trace: Trace, field: str, index: int = 0) -> list[float]:
    return [getattr(s, field) for f in trace.frames for s in f.samples
            if s.index == index and getattr(s, field) is not None]


def column(name: str, header: str, *, gpu_column: str | None = None, gpu: str = "0",
           encoding: str = "utf-8") -> list[float]:
    """The file's own column, read with the csv module, for cross-checks."""
    assert TRACES is not None
    with open(TRACES / name, encoding=encoding, newline="") as handle:
        rows = list(csv.DictReader(handle, skipinitialspace=True))
    return [float(r[header].split()[0]) for r in rows
            if r[header] != header and (gpu_column is None or r[gpu_column] == gpu)]


def test_every_expected_file_is_there() -> None:
    assert {"a100_nvsmi_noindex.csv", "h100x8_nvml_collector.csv",
            "rtx4060laptop_gpuburn_pynvml.csv", "v100s_nvsmi_query.csv",
            "formats/utf16_powershell_redirect.csv"} <= set(FILES)
    assert len(FILES) >= 12


@pytest.mark.parametrize("name", FILES)
def test_every_real_file_loads(name: str) -> None:
    trace = load(name)
    assert len(trace.frames) > 1
    assert trace.frames[-1].offset >= 8  # seconds to minutes of recording, not one instant
    assert all(s.index >= 0 for f in trace.frames for s in f.samples)


def test_a100_without_index_is_one_gpu() -> None:
    trace = load("a100_nvsmi_noindex.csv")
    assert trace.format == "nvidia-smi --query-gpu CSV" and gpus(trace) == {0}
    temperatures = series(trace, "temperature_c")
    assert temperatures == column("a100_nvsmi_noindex.csv", "temperature.gpu")
    assert (min(temperatures), max(temperatures)) == (42.0, 59.0)


def test_h100x8_collector_records_the_power_cap() -> None:
    name = "h100x8_nvml_collector.csv"
    trace = load(name)
    assert trace.format == "CSV with named columns" and gpus(trace) == set(range(8))
    for index in (0, 7):
        assert series(trace, "temperature_c", index) == column(name, "temp_c", gpu_column="gpu",
                                                               gpu=str(index))
        assert series(trace, "power_w", index) == column(name, "power_w", gpu_column="gpu",
                                                         gpu=str(index))
    capped = [s for f in trace.frames for s in f.samples if "sw_power_cap" in s.throttle]
    assert len(capped) > 1000
    assert trace.frames[0].samples[0].memory_total_bytes == 81559 * 1024 * 1024


def test_rtx4060_gpuburn_heats_and_fills() -> None:
    trace = load("rtx4060laptop_gpuburn_pynvml.csv")
    temperatures = series(trace, "temperature_c")
    assert (temperatures[0], max(temperatures)) == (43.0, 71.0)
    peak = max(s.memory_ratio or 0.0 for f in trace.frames for s in f.samples)
    assert peak > 0.95


def test_variants_of_the_v100s_file_read_the_same() -> None:
    base = series(load("v100s_nvsmi_query.csv"), "temperature_c")
    assert base == column("v100s_nvsmi_query.csv", "temperature.gpu")
    assert series(load("formats/v100s_crlf.csv"), "temperature_c") == base
    assert series(load("formats/v100s_utf8_bom.csv"), "temperature_c") == base
    odd = load("formats/v100s_na_notsupported_lost.csv")
    lost = [f.offset for f in odd.frames if f.samples[0].lost]
    assert len(lost) == 1
    assert set(series(odd, "power_w")) == {250.0}


def test_multi_gpu_formats() -> None:
    a6000 = load("formats/a6000x2_index_no_temp.csv")
    assert gpus(a6000) == {0, 1} and series(a6000, "temperature_c") == []
    iso = load("formats/h100x8_iso8601_nounits.csv")
    assert gpus(iso) == set(range(8))
    assert [len(f.samples) for f in iso.frames[:5]] == [8] * 5


def test_repeated_header_and_utf16() -> None:
    repeated = load("formats/rtx2070_repeated_header.csv")
    assert any("repeated header" in note for note in repeated.notes)
    utf16 = load("formats/utf16_powershell_redirect.csv")
    assert "read as UTF-16 LE" in utf16.notes
    memory = series(utf16, "memory_used_bytes")
    assert memory[0] == 10549 * 1024 * 1024  # the first data row, read past the BOM


def test_noheader_needs_its_columns() -> None:
    assert TRACES is not None
    path = TRACES / "formats/rtx4060laptop_noheader_nounits.csv"
    with pytest.raises(ReplayFormatError) as caught:
        load_trace_file(path)
    assert str(caught.value).startswith(f"{path}:1: no header row: the first line is data")
    trace = load("formats/rtx4060laptop_noheader_nounits.csv")
    assert series(trace, "temperature_c")[0] == 65.0
    assert series(trace, "power_w")[0] == 13.15


@pytest.mark.parametrize("name", FILES)
def test_gpus_summarises_every_file(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gpus", "--telemetry", f"replay:{spec(name)}"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert TRACES is not None
    assert lines[0] == f"trace: {TRACES / name}"
    assert lines[1].startswith("format: ")
    assert lines[2].startswith("GPUs: ") and "duration: " in lines[2]


def test_gpus_summary_of_the_h100_collector(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gpus", "--telemetry", f"replay:{spec('h100x8_nvml_collector.csv')}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "format: CSV with named columns   started: 2026-04-01 01:53:43 UTC"
    assert out[2].startswith("GPUs: 8 (0, 1, 2, 3, 4, 5, 6, 7)   duration: 5m 36.8s   frames: 335")
    row0 = out[4]
    assert row0.startswith("0    NVIDIA H100 80GB HBM3  33-76 (76 at 1m 36.6s)")
    assert "sw_power_cap (300)" in row0 and "68.8/79.6 (86%)" in row0


def test_gpus_summary_of_some_gpus(capsys: pytest.CaptureFixture[str]) -> None:
    trace = f"replay:{spec('h100x8_nvml_collector.csv')}"
    assert main(["gpus", "--telemetry", trace, "--gpus", "2,5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2].startswith("GPUs: 2 (2, 5)")
    assert [line.split()[0] for line in out[4:6]] == ["2", "5"]
    assert main(["gpus", "--telemetry", trace, "--gpus", "9"]) == 2
    assert TRACES is not None
    assert capsys.readouterr().err == (
        f"{TRACES / 'h100x8_nvml_collector.csv'}:0: the trace holds none of GPUs 9\n")


@pytest.mark.parametrize("name", FILES)
def test_simulate_runs_on_every_file(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["simulate", "--policy", str(POLICY), "--trace", spec(name), "--duration", "30"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"telemetry from the trace {spec(name)}" in out
