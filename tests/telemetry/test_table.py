"""`meltguard gpus` table."""

from __future__ import annotations

from meltguard.daemon.telemetry.samples import ThrottleUnknownSample
from meltguard.daemon.telemetry.table import format_table
from meltguard.values import GpuSample
from tests.telemetry.helpers import gpu

GIB = 1024**3


def test_table_rows() -> None:
    samples = [
        GpuSample(index=2, uuid="GPU-2", name="NVIDIA H100 PCIe", taken_at=0.0, lost=True),
        gpu(
            0,
            temperature_c=81.4,
            memory_used_bytes=int(12.34 * GIB),
            memory_total_bytes=80 * GIB,
            utilization=0.456,
            power_w=312.2,
            power_limit_w=700.0,
            throttle=frozenset({"sw_thermal", "hw_thermal"}),
        ),
        ThrottleUnknownSample(index=1, uuid="GPU-1", name="", taken_at=0.0, temperature_c=40.0),
    ]
    text = format_table(samples, "nvml")
    lines = text.splitlines()
    assert lines[0] == "telemetry source: nvml"
    assert lines[1].split() == [
        "GPU",
        "NAME",
        "TEMP/SLOW",
        "MEMORY",
        "UTIL",
        "POWER/LIMIT",
        "THROTTLE",
    ]
    row0, row1, row2 = lines[2:]
    assert row0.startswith("0 ")
    for cell in (
        "NVIDIA H100 80GB HBM3",
        "81/87 °C",
        "12.3/80.0 GiB",
        "46 %",
        "312/700 W",
        "hw_thermal,sw_thermal",
    ):
        assert cell in row0
    assert "(unknown)" in row1 and "40/- °C" in row1 and row1.rstrip().endswith("?")
    assert row2.split()[-1] == "LOST" and "NVIDIA H100 PCIe" in row2
    # Columns line up.
    assert len({line.index("TEMP") if "TEMP" in line else None for line in lines[1:2]}) == 1
    assert row0.index("81/87") == lines[1].index("TEMP/SLOW")


def test_no_throttle_and_no_gpus() -> None:
    assert "none" in format_table([gpu(0)], "simulated")
    assert format_table([], "replay") == "telemetry source: replay\nno GPUs reported\n"
