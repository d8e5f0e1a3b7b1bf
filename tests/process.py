"""Run `meltguard serve` as a real subprocess on a free port, for end-to-end tests."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MELTGUARD = [sys.executable, "-m", "meltguard"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Daemon:
    """One daemon process. `start()` waits for /readyz; `stop()` sends SIGTERM and returns rc."""

    def __init__(self, args: Sequence[str], *, env: Mapping[str, str] | None = None,
                 log_path: Path | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self.args = ["serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0, *, ready: bool = True) -> Daemon:
        out = subprocess.DEVNULL
        if self.log_path is not None:
            self._log_file = self.log_path.open("ab")
            out = self._log_file
        self.process = subprocess.Popen([*MELTGUARD, *self.args], env=self.env, cwd=ROOT,
                                        stdout=out, stderr=out)
        deadline = time.monotonic() + timeout
        path = "/readyz" if ready else "/healthz"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.process.returncode}: {self.log()}")
            try:
                with urllib.request.urlopen(self.url + path, timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        self.kill()
        raise TimeoutError(f"daemon not ready after {timeout} s: {self.log()}")

    def log(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return self.log_path.read_text(errors="replace")[-4000:]

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def request(self, method: str, path: str, body: Any = None,
                headers: Mapping[str, str] | None = None,
                timeout: float = 30.0) -> tuple[int, dict[str, str], Any]:
        """One HTTP call with the stdlib; returns status, headers, parsed JSON (or text)."""
        data = json.dumps(body).encode() if body is not None else None
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers=all_headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), _parse(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), _parse(err.read())

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
            return str(resp.read().decode())


def _parse(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def metric_value(text: str, name: str, labels: Mapping[str, str] | None = None) -> float | None:
    """The value of one series in Prometheus text format, or None when absent."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] != name:
            continue
        if labels and not all(f'{k}="{v}"' in series for k, v in labels.items()):
            continue
        return float(value)
    return None
