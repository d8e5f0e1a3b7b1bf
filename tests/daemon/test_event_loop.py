"""`meltguard serve` runs on uvloop where it is installed (a Linux dependency), on plain
asyncio when asked, and names the loop it runs on."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from meltguard.daemon.serve import StartupError, loop_factory, loop_name
from tests.process import Daemon


def _run_on(choice: str) -> str:
    with asyncio.Runner(loop_factory=loop_factory(choice)) as runner:
        return runner.run(_name())


async def _name() -> str:
    return loop_name(asyncio.get_running_loop())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uvloop is a Linux dependency")
def test_auto_and_uvloop_serve_on_uvloop() -> None:
    assert _run_on("auto") == "uvloop"
    assert _run_on("uvloop") == "uvloop"


def test_asyncio_is_plain_asyncio() -> None:
    assert loop_factory("asyncio") is None
    assert _run_on("asyncio") == "asyncio"


def test_asking_for_uvloop_without_it_is_a_startup_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if it were not installed
    assert loop_factory("auto") is None
    with pytest.raises(StartupError, match="uvloop is not installed"):
        loop_factory("uvloop")


@pytest.mark.slow
@pytest.mark.parametrize(("choice", "expected"), [("auto", "uvloop"), ("asyncio", "asyncio")])
def test_the_listening_line_names_the_loop(tmp_path: Path, choice: str, expected: str) -> None:
    if expected == "uvloop" and not sys.platform.startswith("linux"):
        pytest.skip("uvloop is a Linux dependency")
    daemon = Daemon(["--model", "sim", "--telemetry", "sim", "--store", "memory",
                     "--loop", choice], log_path=tmp_path / "daemon.log")
    try:
        daemon.start()
    finally:
        assert daemon.stop() == 0
    lines = [json.loads(text) for text in daemon.log().splitlines() if text.startswith("{")]
    [listening] = [line for line in lines if line["event"] == "meltguard.listening"]
    assert listening["loop"] == expected
