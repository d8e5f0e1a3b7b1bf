"""End to end: a real meltguard daemon, scraped by Debian's Prometheus loading rules.yml.

Every dashboard and rule expression is evaluated through Prometheus' HTTP API after driving
traffic across the tiers, so label values, `_total` suffixes and recording rules are checked
against what the daemon really exports, not against the catalogue alone.

Needs: `prometheus` on PATH (Debian package `prometheus`), and the daemon's CLI:
    meltguard serve --host H --port P --model sim --telemetry sim --sim-speed 50 \
        --store memory --policy FILE
MELTGUARD_BIN overrides the daemon executable (default: the virtualenv's `meltguard`).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from meltguard.daemon.catalog import series_names

from .promql import GRAFANA_BUILTINS, metric_names, substitute_grafana
from .support import RULES, Query, allowed_series, dashboard_queries, rules

PROMETHEUS = shutil.which("prometheus")
MELTGUARD = os.environ.get("MELTGUARD_BIN") or str(Path(sys.executable).parent / "meltguard")
TIERS = ("free", "plus", "pro")
# What Grafana would put in place of the dashboard's variables.
VARIABLES = {**GRAFANA_BUILTINS, "instance": ".*", "datasource": "prometheus"}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="prometheus not installed (Debian: apt-get install --no-install-recommends "
        "prometheus)",
    ),
]


# ---------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Response:
    status: int
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def http(method: str, url: str, *, body: Any = None, headers: dict[str, str] | None = None,
         timeout: float = 30.0) -> Response:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return Response(reply.status, reply.read(), dict(reply.headers))
    except urllib.error.HTTPError as error:
        return Response(error.code, error.read(), dict(error.headers or {}))


def wait_for(what: str, check: Callable[[], bool], timeout: float,
             alive: Callable[[], str | None] = lambda: None, interval: float = 0.25) -> None:
    """Poll `check` until true; fail after `timeout`, or at once when `alive` reports a death."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (OSError, ValueError, KeyError):
            pass
        dead = alive()
        if dead:
            pytest.fail(f"{what}: {dead}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{alive() or ''}")
        time.sleep(interval)


class Process:
    """A child process with its output in a file, stopped with SIGTERM at teardown."""

    def __init__(self, name: str, argv: list[str], log: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)

    def tail(self, lines: int = 40) -> str:
        self._out.flush()
        text = self.log.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(text)

    def death(self) -> str | None:
        code = self.proc.poll()
        if code is None:
            return None
        return (f"{self.name} exited with status {code}: {' '.join(self.argv)}\n"
                f"--- last lines of its output ---\n{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._out.close()


# ---------------------------------------------------------------- the daemon


@dataclass(frozen=True)
class Daemon:
    url: str
    port: int
    keys: dict[str, str]  # tier -> API key
    process: Process

    def metrics_text(self) -> str:
        reply = http("GET", f"{self.url}/metrics")
        assert reply.status == 200, reply
        return reply.body.decode()


POLICY = """\
version: 1
mode: enforce
overload_status: 503
anonymous_tier: null
tiers:
  free: {priority: 0, quotas: [{limit: 3, per: 1d}, {limit: 2, per: 1m}], max_concurrent: 1, max_queue_wait: 20s}
  plus: {priority: 1, quotas: [{limit: 200, per: 1d}], max_concurrent: 2, max_queue_wait: 60s}
  pro:  {priority: 2, quotas: [{limit: 2000, per: 1d}], max_concurrent: 4, max_queue_wait: 120s}
api_keys:
%(api_keys)s
cost: {reference: {size: 64x64, steps: 30}}
limits: {max_n: 4, max_size: 1024x1024, max_steps: 50}
pressure:
  sample_interval: 500ms
  stale_after: 5s
  on_stale: high
  levels:
    elevated: {enter: {temperature_c: 78, memory_ratio: 0.85}, exit: {temperature_c: 74, memory_ratio: 0.80}, min_dwell: 10s}
    high:     {enter: {below_slowdown_c: 5, memory_ratio: 0.92, throttle: [sw_thermal, hw_thermal]}, exit: {below_slowdown_c: 8, memory_ratio: 0.88}, min_dwell: 15s}
    critical: {enter: {temperature_c: 90, memory_ratio: 0.97, gpu_lost: true}, exit: {temperature_c: 86, memory_ratio: 0.93}, min_dwell: 30s}
actions:
  elevated: {free: {quota_factor: 0.5, max_queue_wait: 60s, max_steps: 20}}
  high:     {free: {reject: true}, plus: {quota_factor: 0.5, max_size: 512x512}}
  critical: {free: {reject: true}, plus: {reject: true}, pro: {concurrency_factor: 0.5}}
"""  # noqa: E501  (DESIGN.md's policy format, one API key per tier)


def write_policy(path: Path, keys: dict[str, str]) -> None:
    """The policy of DESIGN.md with one key per tier; free is tight enough to be refused."""
    api_keys = "\n".join(
        f'  - {{key_sha256: "{hashlib.sha256(key.encode()).hexdigest()}", '
        f"tenant: {tier}-tenant, tier: {tier}}}"
        for tier, key in keys.items()
    )
    text = POLICY % {"api_keys": api_keys}
    assert yaml.safe_load(text)["api_keys"][0]["tier"] == next(iter(keys))
    path.write_text(text, encoding="utf-8")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    if not Path(MELTGUARD).exists():
        pytest.fail(f"no meltguard executable at {MELTGUARD} (set MELTGUARD_BIN)")
    tmp = tmp_path_factory.mktemp("meltguard")
    keys = {tier: f"sk-{tier}-{secrets.token_hex(16)}" for tier in TIERS}
    policy = tmp / "policy.yaml"
    write_policy(policy, keys)
    port = free_port()
    argv = [MELTGUARD, "serve", "--host", "127.0.0.1", "--port", str(port), "--model", "sim",
            "--telemetry", "sim", "--sim-speed", "50", "--store", "memory", "--policy", str(policy)]
    # Flags only: no stray MELTGUARD_* setting of the caller leaks into the daemon.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MELTGUARD_")}
    env["XDG_STATE_HOME"] = str(tmp / "state")
    process = Process("meltguard", argv, tmp / "meltguard.log", env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("meltguard /metrics", lambda: http("GET", f"{url}/metrics", timeout=2).status
                 == 200, timeout=90, alive=process.death)
        yield Daemon(url, port, keys, process)
    finally:
        process.stop()


# ---------------------------------------------------------------- Prometheus


@dataclass(frozen=True)
class Prometheus:
    url: str
    process: Process

    def query(self, expr: str) -> dict[str, Any]:
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        reply = http("GET", url)
        data: dict[str, Any] = json.loads(reply.body)
        return data

    def vector(self, expr: str) -> list[dict[str, Any]]:
        data = self.query(expr)
        assert data["status"] == "success", f"{expr!r}: {data}"
        result: list[dict[str, Any]] = data["data"]["result"]
        return result


@pytest.fixture(scope="module")
def prometheus(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    assert PROMETHEUS is not None
    tmp = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{
            "job_name": "meltguard",
            "scrape_interval": "1s",
            "static_configs": [{"targets": [f"127.0.0.1:{daemon.port}"]}],
        }],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    argv = [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn"]
    process = Process("prometheus", argv, tmp / "prometheus.log")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for("prometheus /-/ready", lambda: http("GET", f"{url}/-/ready", timeout=2).status
                 == 200, timeout=60, alive=process.death)
        yield Prometheus(url, process)
    finally:
        process.stop()


# ---------------------------------------------------------------- traffic


def generate(daemon: Daemon, key: str | None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    reply = http("POST", f"{daemon.url}/v1/images/generations", headers=headers,
                 body={"prompt": "x", "size": "64x64"}, timeout=60)
    return reply.status


@pytest.fixture(scope="module")
def traffic(daemon: Daemon, prometheus: Prometheus) -> dict[str, Counter[int]]:
    """Requests across the tiers, free until refused; returns statuses per tier."""
    # The first scrape, so that counters are seen before and after the traffic.
    wait_for("the first scrape of meltguard",
             lambda: bool(prometheus.vector('up{job="meltguard"} == 1')), timeout=60,
             alive=lambda: daemon.process.death() or prometheus.process.death())
    statuses: dict[str, Counter[int]] = {tier: Counter() for tier in TIERS}
    statuses["anonymous"] = Counter()
    statuses["anonymous"][generate(daemon, None)] += 1
    statuses["anonymous"][generate(daemon, "sk-not-a-key")] += 1
    for _ in range(3):
        for tier in ("plus", "pro"):
            statuses[tier][generate(daemon, daemon.keys[tier])] += 1
    # A concurrent burst per tier: queues, waits, and the free tier's tight quota.
    with ThreadPoolExecutor(max_workers=12) as pool:
        burst = [(tier, pool.submit(generate, daemon, daemon.keys[tier]))
                 for tier in TIERS for _ in range(4)]
        for tier, future in burst:
            statuses[tier][future.result()] += 1
    # Free until refused: by its quota (2 a minute, 3 a day; a request may cost less than one
    # reference image), or by pressure if the simulated GPU is already hot.
    def refused() -> int:
        return statuses["free"][429] + statuses["free"][503]

    for _ in range(200):
        if refused():
            break
        statuses["free"][generate(daemon, daemon.keys["free"])] += 1
    assert refused(), f"the free tier was never refused: {statuses}"
    assert statuses["pro"][200], f"no pro request succeeded: {statuses}"

    # Wait until Prometheus holds the daemon's final request count, then for the recordings.
    families = {f.name: f for f in text_string_to_metric_families(daemon.metrics_text())}
    total = sum(s.value for s in families["meltguard_requests"].samples
                if s.name == "meltguard_requests_total")

    def scraped_total() -> bool:
        result = prometheus.vector('sum(meltguard_requests_total{job="meltguard"})')
        return bool(result) and float(result[0]["value"][1]) >= total

    wait_for("Prometheus to scrape the traffic", scraped_total, timeout=30,
             alive=prometheus.process.death)
    wait_for("the recording rules", lambda: bool(prometheus.vector(
        'meltguard:admission_decisions:rate1m{decision="reject"}')), timeout=30,
        alive=prometheus.process.death)
    time.sleep(2.5)  # a couple more scrapes and rule evaluations after the last change
    return statuses


# ---------------------------------------------------------------- the checks


def _query_id(query: Query) -> str:
    return query.where


@pytest.mark.parametrize("query", dashboard_queries(), ids=_query_id)
def test_dashboard_expression_evaluates(query: Query, prometheus: Prometheus,
                                        traffic: dict[str, Counter[int]]) -> None:
    expr = substitute_grafana(query.expr, VARIABLES)
    data = prometheus.query(expr)
    assert data["status"] == "success", f"{query.where}: {expr!r}: {data.get('error')}"


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r.get("alert") or r.get("record"))
def test_rule_expression_evaluates(rule: dict[str, Any], prometheus: Prometheus,
                                   traffic: dict[str, Counter[int]]) -> None:
    data = prometheus.query(rule["expr"])
    assert data["status"] == "success", f"{rule['expr']!r}: {data.get('error')}"


def test_rules_are_loaded_and_healthy(prometheus: Prometheus,
                                      traffic: dict[str, Counter[int]]) -> None:
    reply = json.loads(http("GET", f"{prometheus.url}/api/v1/rules").body)
    loaded = {rule["name"]: rule for group in reply["data"]["groups"] for rule in group["rules"]}
    expected = {rule.get("record") or rule.get("alert") for rule in rules()}
    assert set(loaded) == expected
    unhealthy = {name: rule.get("lastError") for name, rule in loaded.items()
                 if rule.get("health") != "ok"}
    assert unhealthy == {}


def exported_series(metrics_text: str) -> set[str]:
    """Series names the exposition declares, with a counter's `_total` and a histogram's parts."""
    names: set[str] = set()
    for family in text_string_to_metric_families(metrics_text):
        if family.type == "counter":
            names |= {family.name + "_total", family.name + "_created"}
        elif family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count", "_created")}
        else:
            names.add(family.name)
        names |= {sample.name for sample in family.samples}
    return names


def test_every_metric_named_is_catalogued_and_exported(daemon: Daemon,
                                                       traffic: dict[str, Counter[int]]) -> None:
    named: set[str] = set()
    for query in dashboard_queries():
        named |= metric_names(query.expr)
    for rule in rules():
        named |= metric_names(rule["expr"])
    assert sorted(named - allowed_series()) == []
    exported = exported_series(daemon.metrics_text())
    assert sorted((named & series_names()) - exported) == [], "named but not exported"


def _panel_query(title_start: str) -> list[Query]:
    found = [q for q in dashboard_queries() if q.panel_title.startswith(title_start)]
    assert found, f"no dashboard panel titled {title_start!r}"
    return found


@pytest.mark.parametrize(
    "title",
    ["GPU temperature", "Pressure level now", "Pressure level over time",
     "Decisions/s by decision", "Refusals/s by reason", "Responses/s by status code",
     "Policy mode", "Telemetry source", "GPU memory used", "Concurrency limit"],
)
def test_core_panel_returns_data(title: str, prometheus: Prometheus,
                                 traffic: dict[str, Counter[int]]) -> None:
    for query in _panel_query(title):
        expr = substitute_grafana(query.expr, VARIABLES)
        if query.where.endswith("target A"):
            assert prometheus.vector(expr), f"{query.where}: no data for {expr!r}"


def test_label_values_match_the_rules(prometheus: Prometheus,
                                      traffic: dict[str, Counter[int]]) -> None:
    """The label values the rules and panels filter on are the ones the daemon uses."""
    tiers = {r["metric"].get("tier") for r in prometheus.vector(
        "sum by (tier) (meltguard_requests_total)")}
    assert {"free", "plus", "pro"} <= tiers
    codes = {r["metric"].get("code") for r in prometheus.vector(
        "sum by (code) (meltguard_requests_total)")}
    assert "200" in codes and codes & {"429", "503"}, codes
    decisions = {r["metric"].get("decision") for r in prometheus.vector(
        "sum by (decision) (meltguard:admission_decisions:rate1m)")}
    # One decision per request: admitted at once (admit), after waiting (queue), or degraded.
    assert "reject" in decisions and decisions & {"admit", "queue", "degrade"}, decisions
    reasons = {r["metric"].get("reason") for r in prometheus.vector(
        'sum by (reason) (meltguard_admission_decisions_total{tier="free", decision="reject"})')}
    assert reasons & {"rate_limit_exceeded", "daily_quota_exceeded", "server_overloaded"}, reasons
    assert prometheus.vector('meltguard_pressure_level{gpu="all"}')
    # Telemetry was asked for as `sim`: the fallback alert must not see a fallback.
    assert prometheus.vector(
        'meltguard_telemetry_source_info{source="simulated", requested="sim"} == 1')
    mode = prometheus.vector(substitute_grafana(_panel_query("Policy mode")[0].expr, VARIABLES))
    assert float(mode[0]["value"][1]) == 1, "policy mode should read ENFORCE"
    # The paid ratios exist once plus/pro have traffic.
    assert {r["metric"]["tier"] for r in prometheus.vector(
        "meltguard:paid_success_ratio:rate5m")} == {"plus", "pro"}
    assert {r["metric"]["tier"] for r in prometheus.vector(
        "meltguard:paid_rejection_ratio:rate5m")} == {"plus", "pro"}

