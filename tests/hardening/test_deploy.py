"""Deployment artefacts: the systemd unit is valid, sandboxed, restarts on failure and waits
for the daemon's own READY=1; the Dockerfile runs meltguard unprivileged as PID 1 with a
health check and a drain that fits `docker stop`."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from meltguard.cli import build_parser
from tests.hardening.conftest import hardening_policy
from tests.process import MELTGUARD, ROOT, free_port

UNIT = ROOT / "deploy" / "meltguard.service"
DOCKERFILE = ROOT / "Dockerfile"
DEFAULT_DRAIN = build_parser().parse_args(["serve"]).drain_timeout


def _unit() -> dict[str, list[str]]:
    """`Key=value` lines of the unit; keys that repeat (DeviceAllow) keep every value."""
    entries: dict[str, list[str]] = defaultdict(list)
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            entries[key.strip()].append(value.strip())
    return entries


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|min)?", value)
    assert match, value
    return float(match.group(1)) * (60 if match.group(2) == "min" else 1)


def test_unit_waits_for_ready_reloads_on_hup_and_restarts_on_failure() -> None:
    unit = _unit()
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["KillSignal"] == ["SIGTERM"]
    # systemd's SIGKILL must come after the daemon's own drain deadline.
    assert _seconds(unit["TimeoutStopSec"][0]) > DEFAULT_DRAIN + 5
    command = shlex.split(unit["ExecStart"][0])
    assert Path(command[0]).name == "meltguard" and command[1] == "serve"
    build_parser().parse_args(command[1:])  # every flag in the unit exists


def test_unit_is_sandboxed() -> None:
    unit = _unit()
    expected = {
        "DynamicUser": "yes", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
        "ProtectHome": "yes", "PrivateTmp": "yes", "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes", "ProtectControlGroups": "yes",
        "RestrictSUIDSGID": "yes", "LockPersonality": "yes", "CapabilityBoundingSet": "",
        "SystemCallFilter": "@system-service", "DevicePolicy": "closed",
        "StateDirectory": "meltguard",
    }
    for key, value in expected.items():
        assert unit.get(key) == [value], key
    assert set(unit["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    assert any("nvidia-uvm" in allowed for allowed in unit["DeviceAllow"])
    assert "/var/lib/meltguard/" in unit["ExecStart"][0]  # state lives in StateDirectory


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_unit_passes_systemd_analyze(tmp_path: Path) -> None:
    # verify checks that ExecStart exists; point it at this checkout's meltguard.
    here = shutil.which("meltguard", path=str(Path(sys.executable).parent)) or sys.executable
    unit = tmp_path / "meltguard.service"
    unit.write_text(UNIT.read_text().replace("/opt/meltguard/venv/bin/meltguard", here))
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert verify.returncode == 0 and "meltguard" not in verify.stderr, verify.stderr
    security = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                              capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", security.stdout)
    if match is None:
        pytest.skip(f"systemd-analyze security --offline unsupported: {security.stderr[:200]}")
    assert float(match.group(1)) <= 2.0, security.stdout[-3000:]


@pytest.mark.slow
def test_daemon_notifies_systemd_when_listening_and_when_draining(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(hardening_policy(stale_after="5s"))
    notify = tmp_path / "notify.sock"
    port = free_port()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(notify))
        sock.settimeout(60)
        process = subprocess.Popen(
            [*MELTGUARD, "serve", "--port", str(port), "--model", "sim", "--telemetry", "sim",
             "--store", "memory", "--policy", str(policy)],
            cwd=ROOT, env={"NOTIFY_SOCKET": str(notify), "PATH": "/usr/bin:/bin"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert sock.recv(256) == b"READY=1"
            # READY=1 means listening: the first connection succeeds, no retry needed.
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            process.send_signal(signal.SIGTERM)
            assert sock.recv(256) == b"STOPPING=1"
            assert process.wait(15) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


# -- Dockerfile --------------------------------------------------------------------------------


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in joined]


def _final_stage() -> list[tuple[str, str]]:
    steps = _instructions()
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


def _env() -> dict[str, str]:
    env: dict[str, str] = {}
    for op, args in _final_stage():
        if op == "ENV":
            for token in shlex.split(args):
                key, _, value = token.partition("=")
                env[key] = value
    return env


def test_dockerfile_runs_meltguard_unprivileged_as_pid_1() -> None:
    final = dict(_final_stage())
    assert final["USER"] not in ("root", "0")
    command = json.loads(final["CMD"])  # exec form: no shell between docker and meltguard
    assert command[:2] == ["meltguard", "serve"]
    assert "ENTRYPOINT" not in final  # so compose's `command: [meltguard, ...]` works
    assert final["STOPSIGNAL"] == "SIGTERM"
    assert "/healthz" in final["HEALTHCHECK"]
    assert final["EXPOSE"] == _env()["MELTGUARD_PORT"]


def test_dockerfile_environment_is_what_the_cli_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    env = _env()
    for key, value in env.items():
        if key.startswith("MELTGUARD_"):
            monkeypatch.setenv(key, value)
    args = build_parser().parse_args(["serve"])
    assert args.host == "0.0.0.0" and args.port == int(env["MELTGUARD_PORT"])
    assert args.store.startswith("sqlite:/var/lib/meltguard/")
    # `docker stop` sends SIGKILL after 10 s by default; the drain must fit inside.
    assert args.drain_timeout < 10
    assert args.admin_remote is False


def test_docker_build_context_holds_what_the_build_copies() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore  # an allowlist: local state and secrets never enter the context
    for op, args in _instructions():
        if op == "COPY" and not args.startswith("--from"):
            for source in shlex.split(args)[:-1]:
                assert (ROOT / source).exists(), source
                assert f"!{source.rstrip('/')}/" in ignore or f"!{source}" in ignore, source


def test_compose_file_matches_the_image() -> None:
    compose = yaml.safe_load((ROOT / "dashboards" / "docker-compose.yml").read_text())
    service = compose["services"]["meltguard"]
    assert service["build"]["dockerfile"] == "Dockerfile"
    assert service["command"][:2] == ["meltguard", "serve"]
    build_parser().parse_args(service["command"][1:])
