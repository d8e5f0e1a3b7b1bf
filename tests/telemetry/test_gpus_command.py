"""`meltguard gpus` on live sources: one table, and the exit codes of what cannot be opened."""

from __future__ import annotations

import pytest

from meltguard.daemon.cli import main
from tests.fakenvml import FakeNvml


def test_live_sources_print_one_table(fake_nvml: FakeNvml,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    fake_nvml.update({"0.temperature": 77})
    assert main(["gpus", "--telemetry", "nvml"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "telemetry source: nvml"
    assert lines[2].startswith("0 ") and "77/" in lines[2]
    assert main(["gpus", "--telemetry", "sim"]) == 0
    assert capsys.readouterr().out.startswith("telemetry source: simulated\n")


def test_what_cannot_be_opened(fake_nvml: FakeNvml, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["gpus", "--telemetry", "bogus"]) == 2  # a usage error, like a bad trace
    assert capsys.readouterr().err == (
        "meltguard gpus: --telemetry must be auto, nvml, sim or replay:FILE, got 'bogus'\n")
    monkeypatch.setenv("FAKE_NVML_STATE", str(fake_nvml.state_path) + ".absent")
    assert main(["gpus", "--telemetry", "nvml"]) == 1  # the machine, not the command line
    assert capsys.readouterr().err.startswith(
        "meltguard gpus: NVML library libnvidia-ml.so.1 not found")
