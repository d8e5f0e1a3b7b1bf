"""Every refusal of the replay reader is one line, `FILE:LINE: what is wrong and what was seen`,
and the commands that read traces exit 2 with it, never with a traceback."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from meltguard.daemon.cli import main
from meltguard.daemon.telemetry.replay import FORMATS_READ, ReplayFormatError, load_trace_file

ROOT = Path(__file__).resolve().parents[2]
GOOD = "timestamp, index, temperature.gpu\n2026/11/25 07:38:44.123, 0, 50\n"


def refusal(tmp_path: Path, data: bytes, name: str = "t.csv", spec_suffix: str = "") -> str:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ReplayFormatError) as caught:
        load_trace_file(f"{path}{spec_suffix}")
    message = str(caught.value)
    assert "\n" not in message
    prefix = f"{path}:"
    assert message.startswith(prefix), message
    return message[len(prefix):]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # latin-1: "°" is 0xb0, not UTF-8
        (GOOD.encode() + "2026/11/25 07:38:45.123, 0, 51 °C\n".encode("latin-1"),
         "3: not UTF-8: byte 0xb0 at column 32 after '2026/11/25 07:38:45.123, 0, 51 ' "
         "(a latin-1 or Windows code page file?); convert it with iconv -f LATIN1 -t UTF-8"),
        (GOOD.encode() + b"\x00\x01\x02garbage",
         f"3: binary data (a NUL byte at byte {len(GOOD)}), not a text trace; formats read: "
         f"{FORMATS_READ}"),
        (GOOD.encode("utf-16-le"),
         "1: binary data (a NUL byte at byte 1), not a text trace; it looks like UTF-16 without a "
         "byte-order mark; convert it with iconv -f UTF-16LE -t UTF-8"),
        (gzip.compress(GOOD.encode()),
         "1: binary file, not a text trace: this is gzip-compressed data: decompress it first "
         f"(gunzip); formats read: {FORMATS_READ}"),
        (b"\xff\xfe" + b"t\x00\x00\xd8",
         "1: not valid UTF-16 LE: bad bytes b'\\x00\\xd8' at byte 4"),
    ],
    ids=["latin1", "nul", "utf16-no-bom", "gzip", "broken-utf16"],
)
def test_bytes_that_are_not_text(tmp_path: Path, data: bytes, expected: str) -> None:
    assert refusal(tmp_path, data) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD + "2026/11/25 07:38:45.123, 0, nan\n",
         "3: temperature.gpu: 'nan' is not a reading (NaN and infinity are refused; leave the "
         "cell empty or [N/A] when unknown)"),
        (GOOD + "2026/11/25 07:38:45.123, 0, inf\n", "3: temperature.gpu: 'inf' is not a reading"),
        (GOOD + "2026/11/25 07:38:45.123, 0, -Infinity\n",
         "3: temperature.gpu: '-Infinity' is not a reading"),
        (GOOD + "2026/11/25 07:38:45.123, 0, 1e999\n",
         "3: temperature.gpu: '1e999' is not a reading"),
        (GOOD + "2026/11/25 07:38:45.123, 0\n",
         "3: 2 cells, the header (line 1) has 3 columns: '2026/11/25 07:38:45.123, 0'"),
        (GOOD + "2026/11/25 07:38:40.000, 0, 50\n",
         "3: time goes backwards (-4.123 s into the trace, after 0.000 s)"),
        (GOOD + "yesterday, 0, 50\n",
         "3: timestamp 'yesterday' is not like 2026/11/25 07:38:44.123, 2026-11-25T07:38:44+00:00 "
         "or epoch seconds/ms/ns"),
        (GOOD + "2026/11/25 07:38:45.123, GPU0, 50\n", "3: index: not a number: 'GPU0'"),
        ("2026/11/25 07:38:44.123, 0, 50\n",
         "1: no header row: the first line is data (3 cells: '2026/11/25 07:38:44.123, 0, 50'); "
         "name the columns in order by appending ?columns=timestamp,index,name,temperature.gpu,"
         "... to the file name (the --query-gpu list it was recorded with; - skips a column)"),
        ("hello world\n",
         "1: this looks like a CSV, but its header names no time column (saw 'hello world'); "
         f"formats read: {FORMATS_READ}; name the columns with ?columns=timestamp,gpu,temp_c,..."),
        ("", "0: the file is empty: trace holds no samples"),
        ("timestamp, index\n", "0: trace holds no samples"),
    ],
    ids=["nan", "inf", "-infinity", "overflow", "short-row", "backwards", "bad-time",
         "bad-index", "no-header", "no-time-column", "empty", "header-only"],
)
def test_csv_refusals(tmp_path: Path, text: str, expected: str) -> None:
    assert refusal(tmp_path, text.encode()).startswith(expected)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"t": 0, "index": 0, "temperature_c": NaN}\n',
         "1: NaN is not a reading (NaN and infinity are refused; write null when unknown)"),
        ('{"t": 0, "index": 0, "temperature_c": Infinity}\n', "1: Infinity is not a reading"),
        ('{"t": 0, "index": 0, "temperature_c": 1e999}\n',
         "1: temperature_c: inf is not a reading"),
        ('{"t": NaN, "index": 0}\n', "1: NaN is not a reading"),
    ],
    ids=["nan", "infinity", "overflow", "nan-time"],
)
def test_jsonl_refusals(tmp_path: Path, text: str, expected: str) -> None:
    assert refusal(tmp_path, text.encode(), name="t.jsonl").startswith(expected)


@pytest.mark.parametrize(
    ("text", "looks_like"),
    [
        ("<?xml version=\"1.0\" ?>\n<nvidia_smi_log>\n", "XML or HTML (nvidia-smi -q -x?)"),
        ("[{\"t\": 0}]\n", "a JSON array, not one object per line"),
        ("\n==============NVSMI LOG==============\n\nTimestamp : Mon\n",
         "an nvidia-smi -q report (one reading, not a series)"),
        ("# HELP node_cpu_seconds_total x\nnode_cpu_seconds_total 1\n",
         "Prometheus metrics without DCGM_FI_DEV_ series"),
    ],
    ids=["xml", "json-array", "nvidia-smi-q", "prometheus"],
)
def test_unknown_formats_say_what_they_look_like(
    tmp_path: Path, text: str, looks_like: str
) -> None:
    message = refusal(tmp_path, text.encode())
    assert f"unknown trace format: this looks like {looks_like}" in message
    assert message.endswith(f"formats read: {FORMATS_READ}")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ReplayFormatError) as caught:
        load_trace_file(tmp_path / "absent.csv")
    assert str(caught.value) == (
        f"{tmp_path / 'absent.csv'}:0: cannot read replay trace: No such file or directory"
    )


# ---- the commands -------------------------------------------------------------------------------


def test_gpus_refuses_with_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(GOOD + "2026/11/25 07:38:45.123, 0, nan\n")
    assert main(["gpus", "--telemetry", f"replay:{path}"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"{path}:3: temperature.gpu: 'nan' is not a reading (NaN and infinity are " \
                  "refused; leave the cell empty or [N/A] when unknown)\n"


def test_simulate_refuses_with_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(b"timestamp, index\n\x00")
    code = main(["simulate", "--policy", str(ROOT / "policies/bench.yaml"), "--trace", str(path)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{path}:2: binary data" in err


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state"), "PYTHONPATH": str(ROOT)}
    env.pop("MELTGUARD_TELEMETRY", None)
    return subprocess.run([sys.executable, "-m", "meltguard", *args], capture_output=True,
                          text=True, timeout=120, env=env, cwd=ROOT, check=False)


def test_serve_refuses_a_bad_trace_with_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes(GOOD.encode() + "2026/11/25 07:38:45.123, 0, 51 °C\n".encode("latin-1"))
    done = _run(["serve", "--port", "0", "--store", "memory", "--model", "sim",
                 "--telemetry", f"replay:{path}"], tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("meltguard: ")]
    assert lines == [f"meltguard: {path}:3: not UTF-8: byte 0xb0 at column 32 after "
                     "'2026/11/25 07:38:45.123, 0, 51 ' (a latin-1 or Windows code page file?); "
                     "convert it with iconv -f LATIN1 -t UTF-8"]


def test_commands_on_utf16_without_bom_never_trace_back(tmp_path: Path) -> None:
    path = tmp_path / "u16.csv"
    path.write_bytes(GOOD.encode("utf-16-le"))
    for args in (["gpus", "--telemetry", f"replay:{path}"],
                 ["simulate", "--policy", "policies/bench.yaml", "--trace", str(path)]):
        done = _run(args, tmp_path)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert f"{path}:1: binary data" in done.stderr
        assert json.dumps(done.stderr).count("\\n") == 1  # one line
