"""`python -m benchmarks.soak --seconds 600`: the daemon at 3x capacity, watched for leaks.

Starts `meltguard serve` (sim engine, simulated GPU, in-memory quota) on a free loopback
port, measures its capacity with a short closed loop, then offers `--load` times that rate
as open-loop Poisson arrivals from a bounded generator (at most `--max-outstanding` requests
in flight; an arrival over the bound is counted as skipped, never queued, so the generator
cannot grow). One request in ten comes from a client that gives up after 0.05-1 s, leaving
while queued or while generating.

It reports, and exits 1 when a target is missed:
- RSS growth of the daemon after warm-up (target: under --rss-limit-mb, 50 MB);
- asyncio tasks, threads and open descriptors at rest before and after the load (target:
  no growth), and over time under load;
- request accounting: every request sent was accounted exactly once by the daemon
  (sum of meltguard_requests_total = sent), every one not abandoned got an answer, nothing
  is left in flight or queued, and each tier's quota used equals the images it was given
  (no charge kept for work not delivered);
- a clean exit: SIGTERM, exit code 0 within the drain deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

TIERS = ("pro", "plus", "free", "batch")  # batch: the clients that leave early
MIX = (0.2, 0.3, 0.4, 0.1)
ADMIN_KEY = "sk-soak-admin"
BODY = {"size": "128x128", "steps": 8}  # the cost reference: every image costs exactly 1
DRAIN_TIMEOUT = 10.0
CONCURRENCY = 2

POLICY = """# Written by benchmarks.soak.
version: 1
anonymous_tier: null
admin_key_sha256: "{admin}"
tiers:
  pro:   {{priority: 3, quotas: [{{limit: 100000000, per: 1d}}], max_concurrent: 4,
          max_queue_wait: 8s}}
  plus:  {{priority: 2, quotas: [{{limit: 100000000, per: 1d}}], max_concurrent: 4,
          max_queue_wait: 4s}}
  batch: {{priority: 1, quotas: [{{limit: 100000000, per: 1d}}], max_concurrent: 4,
          max_queue_wait: 4s}}
  free:  {{priority: 0, quotas: [{{limit: 100000000, per: 1d}}], max_concurrent: 2,
          max_queue_wait: 2s}}
api_keys:
{keys}
cost: {{reference: {{size: 128x128, steps: 8}}}}
limits: {{max_n: 1, max_size: 128x128, max_steps: 8, default_size: 128x128, default_steps: 8}}
concurrency: {{limit: {concurrency}, min_limit: 1}}
pressure:
  sample_interval: 500ms
  stale_after: 5s
  on_stale: high
  levels:
    elevated: {{enter: {{temperature_c: 78}}, exit: {{temperature_c: 74}}, min_dwell: 10s}}
    high: {{enter: {{below_slowdown_c: 5, throttle: [sw_thermal, hw_thermal]}},
           exit: {{below_slowdown_c: 8}}, min_dwell: 15s}}
    critical: {{enter: {{temperature_c: 90, gpu_lost: true}}, exit: {{temperature_c: 86}},
               min_dwell: 30s}}
# Refusals only: a degraded image would cost less than 1 and blur the quota check.
actions:
  high: {{free: {{reject: true}}}}
  critical: {{free: {{reject: true}}, batch: {{reject: true}}, plus: {{reject: true}}}}
"""


def _key(tier: str) -> str:
    return f"sk-soak-{tier}"


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Sample:
    at: float  # seconds since the load started
    rss_mb: float
    tasks: int
    threads: int
    fds: int
    outstanding: int


@dataclass
class Ledger:
    """The client's side of the accounting."""

    sent: int = 0  # /v1 requests written to the wire (what the daemon must account)
    skipped: int = 0  # arrivals dropped because the generator was at its bound
    answered: int = 0
    abandoned: int = 0  # the client left on purpose
    errors: Counter[str] = field(default_factory=Counter)  # no answer and not abandoned
    statuses: Counter[str] = field(default_factory=Counter)
    delivered: Counter[str] = field(default_factory=Counter)  # 200s per tier


@dataclass
class Report:
    seconds: float
    load_factor: float
    capacity_rps: float
    offered_rps: float
    warmup_s: float
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0
    rss_growth_mb: float = 0.0
    rss_peak_mb: float = 0.0
    rss_slope_mb_per_min: float = 0.0
    tasks_idle_before: int = 0
    tasks_idle_after: int = 0
    tasks_under_load_max: int = 0
    tasks_under_load_median: float = 0.0
    threads_idle_before: int = 0
    threads_idle_after: int = 0
    fds_idle_before: int = 0
    fds_idle_after: int = 0
    sent: int = 0
    skipped: int = 0
    answered: int = 0
    abandoned: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    server_accounted: float = 0.0
    server_499: float = 0.0
    inflight_after: float = 0.0
    queued_after: float = 0.0
    quota: dict[str, dict[str, float]] = field(default_factory=dict)
    exit_code: int | None = None
    exit_seconds: float = 0.0
    samples: list[Sample] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ledger = Ledger()
        self.outstanding = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.rng = random.Random(args.seed)
        self.process: subprocess.Popen[bytes] | None = None

    # -- the daemon -------------------------------------------------------------------------

    def start_daemon(self) -> None:
        keys = "\n".join(f'  - {{key_sha256: "{_sha(_key(t))}", tenant: {t}, tier: {t}}}'
                         for t in TIERS)
        policy = self.workdir / "policy.yaml"
        policy.write_text(POLICY.format(admin=_sha(ADMIN_KEY), keys=keys,
                                        concurrency=CONCURRENCY))
        log = (self.workdir / "daemon.log").open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "meltguard", "serve", "--host", "127.0.0.1",
             "--port", str(self.port), "--model", "sim", "--telemetry", "sim",
             "--store", "memory", "--policy", str(policy),
             "--drain-timeout", str(DRAIN_TIMEOUT)],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()

    async def wait_ready(self, session: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.process.returncode}; see "
                                   f"{self.workdir / 'daemon.log'}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(self.url + "/readyz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
        raise RuntimeError("daemon not ready within 60 s")

    def stop_daemon(self) -> tuple[int | None, float]:
        if self.process is None:
            return None, 0.0
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(DRAIN_TIMEOUT + 10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            code = None
        return code, time.monotonic() - started

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    # -- measurements -----------------------------------------------------------------------

    def rss_mb(self) -> float:
        assert self.process is not None
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    async def admin_state(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with session.get(self.url + "/admin/state", headers=headers) as resp:
            resp.raise_for_status()
            return dict(await resp.json())

    async def sample(self, session: aiohttp.ClientSession, at: float) -> Sample:
        process = (await self.admin_state(session))["process"]
        return Sample(at=round(at, 2), rss_mb=round(self.rss_mb(), 2),
                      tasks=int(process["asyncio_tasks"]), threads=int(process["threads"]),
                      fds=int(process["open_fds"]), outstanding=self.outstanding)

    async def metrics(self, session: aiohttp.ClientSession) -> dict[str, float]:
        async with session.get(self.url + "/metrics") as resp:
            text = await resp.text()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                series, _, value = line.rpartition(" ")
                values[series] = float(value)
        return values

    # -- load -------------------------------------------------------------------------------

    async def one(self, session: aiohttp.ClientSession, tier: str, index: int,
                  leave_after: float | None) -> int:
        """One generation request; returns the images it delivered."""
        body = {"prompt": f"soak request {index}", **BODY}
        headers = {"Authorization": f"Bearer {_key(tier)}"}
        self.outstanding += 1
        self.ledger.sent += 1
        try:
            async with asyncio.timeout(leave_after):
                async with session.post(self.url + "/v1/images/generations", json=body,
                                        headers=headers) as resp:
                    payload = await resp.read()
            self.ledger.answered += 1
            self.ledger.statuses[str(resp.status)] += 1
            if resp.status == 200:
                images = len(json.loads(payload)["data"])
                self.ledger.delivered[tier] += images
                return images
        except TimeoutError:
            if leave_after is not None:
                self.ledger.abandoned += 1
            else:
                self.ledger.errors["client_timeout"] += 1
        except (aiohttp.ClientError, OSError) as exc:
            self.ledger.errors[type(exc).__name__] += 1
        finally:
            self.outstanding -= 1
        return 0

    async def _background(self, session: aiohttp.ClientSession, tier: str, index: int,
                          leave_after: float | None) -> None:
        await self.one(session, tier, index, leave_after)

    def spawn(self, session: aiohttp.ClientSession, tier: str, index: int,
              leave_after: float | None) -> None:
        task = asyncio.create_task(self._background(session, tier, index, leave_after))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def calibrate(self, session: aiohttp.ClientSession, seconds: float) -> float:
        """Images per second the daemon sustains with a full queue (closed loop)."""
        stop = time.monotonic() + seconds
        done = 0

        async def worker(worker_id: int) -> None:
            nonlocal done
            index = 0
            while time.monotonic() < stop:
                # Not `done += await ...`: that reads `done` before the await and loses the
                # other workers' counts.
                images = await self.one(session, "pro", -1 - worker_id * 100_000 - index, None)
                done += images
                index += 1

        started = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(CONCURRENCY * 4)))
        return done / (time.monotonic() - started)

    async def drive(self, session: aiohttp.ClientSession, rate: float, seconds: float,
                    samples: list[Sample], sample_every: float) -> None:
        started = time.monotonic()
        next_sample = 0.0
        arrival = 0.0
        index = 0
        while True:
            now = time.monotonic() - started
            if now >= seconds:
                break
            if now >= next_sample:
                samples.append(await self.sample(session, now))
                next_sample += sample_every
            arrival += self.rng.expovariate(rate)
            delay = arrival - (time.monotonic() - started)
            if delay > 0:
                await asyncio.sleep(delay)
            tier = self.rng.choices(TIERS, MIX)[0]
            leave_after = self.rng.uniform(0.05, 1.0) if tier == "batch" else None
            if self.outstanding >= self.args.max_outstanding:
                self.ledger.skipped += 1
            else:
                self.spawn(session, tier, index, leave_after)
            index += 1

    async def finish(self) -> None:
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=60)
        for task in list(self.tasks):
            task.cancel()

    async def quota_used(self, session: aiohttp.ClientSession, tier: str
                         ) -> tuple[float, int]:
        headers = {"Authorization": f"Bearer {_key(tier)}"}
        self.ledger.sent += 1
        async with session.get(self.url + "/v1/quota", headers=headers) as resp:
            body = await resp.json()
        self.ledger.answered += 1
        self.ledger.statuses[str(resp.status)] += 1
        window = body["windows"][0]
        return float(window["used"]), int(window["resets_at"])


async def run(args: argparse.Namespace, workdir: Path) -> Report:
    soak = Soak(args, workdir)
    soak.start_daemon()
    warmup = args.warmup if args.warmup is not None else min(60.0, max(5.0, args.seconds / 4))
    sample_every = args.sample_every or max(1.0, args.seconds / 120)
    # One connection per outstanding request, so the bound holds on the wire too.
    connector = aiohttp.TCPConnector(limit=args.max_outstanding + 8)
    timeout = aiohttp.ClientTimeout(total=30)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await soak.wait_ready(session)
            resets = {tier: (await soak.quota_used(session, tier))[1] for tier in TIERS}
            capacity = await soak.calibrate(session, min(10.0, max(3.0, args.seconds / 20)))
            rate = max(capacity, 1.0) * args.load
            report = Report(seconds=args.seconds, load_factor=args.load,
                            capacity_rps=round(capacity, 2), offered_rps=round(rate, 2),
                            warmup_s=warmup)
        # At rest before the load: no client connections held, so tasks count the daemon's
        # own background work only.
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.sleep(1.0)
            idle_before = await soak.sample(session, 0.0)
        connector = aiohttp.TCPConnector(limit=args.max_outstanding + 8)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await soak.drive(session, rate, args.seconds, report.samples, sample_every)
            await soak.finish()
            report.samples.append(await soak.sample(session, args.seconds))
        await asyncio.sleep(1.0)  # let the daemon see the connections close
        async with aiohttp.ClientSession(timeout=timeout) as session:
            idle_after = await soak.sample(session, args.seconds)
            series = await soak.metrics(session)
            for tier in TIERS:
                used, reset_at = await soak.quota_used(session, tier)
                generated = series.get(f'meltguard_images_generated_total{{tier="{tier}"}}', 0.0)
                report.quota[tier] = {"used": used, "generated": generated,
                                      "delivered": float(soak.ledger.delivered[tier]),
                                      "window_rolled_over": float(reset_at != resets[tier])}
            series = await soak.metrics(session)  # after the quota reads, which count too
        report.exit_code, report.exit_seconds = soak.stop_daemon()
    finally:
        soak.kill()
    _fill(report, soak.ledger, idle_before, idle_after, series, warmup)
    _judge(report, args.rss_limit_mb)
    return report


def _fill(report: Report, ledger: Ledger, before: Sample, after: Sample,
          series: dict[str, float], warmup: float) -> None:
    report.sent, report.skipped = ledger.sent, ledger.skipped
    report.answered, report.abandoned = ledger.answered, ledger.abandoned
    report.errors, report.statuses = dict(ledger.errors), dict(sorted(ledger.statuses.items()))
    report.server_accounted = sum(v for k, v in series.items()
                                  if k.startswith("meltguard_requests_total{"))
    report.server_499 = sum(v for k, v in series.items()
                            if k.startswith("meltguard_requests_total{") and '"499"' in k)
    report.inflight_after = sum(v for k, v in series.items()
                                if k.startswith("meltguard_inflight_requests{"))
    report.queued_after = sum(v for k, v in series.items()
                              if k.startswith("meltguard_queue_depth{"))
    report.tasks_idle_before, report.tasks_idle_after = before.tasks, after.tasks
    report.threads_idle_before, report.threads_idle_after = before.threads, after.threads
    report.fds_idle_before, report.fds_idle_after = before.fds, after.fds
    loaded = [s for s in report.samples if s.at >= warmup] or report.samples
    if loaded:
        head, tail = loaded[:3], loaded[-3:]
        report.rss_start_mb = statistics.median(s.rss_mb for s in head)
        report.rss_end_mb = statistics.median(s.rss_mb for s in tail)
        report.rss_growth_mb = round(report.rss_end_mb - report.rss_start_mb, 2)
        report.rss_peak_mb = max(s.rss_mb for s in loaded)
        report.tasks_under_load_max = max(s.tasks for s in loaded)
        report.tasks_under_load_median = statistics.median(s.tasks for s in loaded)
        if len(loaded) >= 2 and loaded[-1].at > loaded[0].at:
            slope = statistics.linear_regression([s.at for s in loaded],
                                                 [s.rss_mb for s in loaded]).slope
            report.rss_slope_mb_per_min = round(slope * 60, 3)


def _judge(report: Report, rss_limit_mb: float) -> None:
    failures = report.failures
    if report.rss_growth_mb >= rss_limit_mb:
        failures.append(f"RSS grew {report.rss_growth_mb} MB after warm-up "
                        f"(limit {rss_limit_mb} MB)")
    if report.tasks_idle_after > report.tasks_idle_before:
        failures.append(f"asyncio tasks at rest grew from {report.tasks_idle_before} to "
                        f"{report.tasks_idle_after}")
    if report.threads_idle_after > report.threads_idle_before:
        failures.append(f"threads at rest grew from {report.threads_idle_before} to "
                        f"{report.threads_idle_after}")
    if report.fds_idle_after > report.fds_idle_before + 2:
        failures.append(f"open descriptors at rest grew from {report.fds_idle_before} to "
                        f"{report.fds_idle_after}")
    if report.server_accounted != report.sent:
        failures.append(f"sent {report.sent} /v1 requests, the daemon accounted "
                        f"{report.server_accounted:g}")
    if report.answered + report.abandoned != report.sent or report.errors:
        failures.append(f"sent {report.sent}, answered {report.answered}, abandoned "
                        f"{report.abandoned}, unanswered {report.errors}")
    if report.inflight_after or report.queued_after:
        failures.append(f"left in flight {report.inflight_after:g}, queued "
                        f"{report.queued_after:g}: leaked permits")
    for tier, quota in report.quota.items():
        if quota["window_rolled_over"]:
            continue  # the day window reset mid-run; `used` no longer covers the whole run
        if abs(quota["used"] - quota["generated"]) > 1e-6:
            failures.append(f"{tier}: quota used {quota['used']:g} but "
                            f"{quota['generated']:g} images generated")
        if tier != "batch" and abs(quota["used"] - quota["delivered"]) > 1e-6:
            failures.append(f"{tier}: quota used {quota['used']:g} but "
                            f"{quota['delivered']:g} images delivered")
    if report.exit_code != 0 or report.exit_seconds > DRAIN_TIMEOUT:
        failures.append(f"SIGTERM: exit code {report.exit_code} after "
                        f"{report.exit_seconds:.1f} s (drain deadline {DRAIN_TIMEOUT:g} s)")
    if report.statuses.get("500"):
        failures.append(f"{report.statuses['500']} responses were 500")


def render(report: Report) -> str:
    lines = [
        f"meltguard soak: {report.seconds:g} s at {report.load_factor:g}x capacity "
        f"({report.offered_rps:g} req/s offered, capacity {report.capacity_rps:g} img/s), "
        f"warm-up {report.warmup_s:g} s",
        f"  RSS        {report.rss_start_mb:.1f} -> {report.rss_end_mb:.1f} MB after warm-up: "
        f"growth {report.rss_growth_mb:+.1f} MB (peak {report.rss_peak_mb:.1f} MB, "
        f"slope {report.rss_slope_mb_per_min:+.2f} MB/min)",
        f"  tasks      at rest {report.tasks_idle_before} -> {report.tasks_idle_after}; "
        f"under load median {report.tasks_under_load_median:g}, max "
        f"{report.tasks_under_load_max}",
        f"  threads    at rest {report.threads_idle_before} -> {report.threads_idle_after}; "
        f"fds at rest {report.fds_idle_before} -> {report.fds_idle_after}",
        f"  requests   sent {report.sent}, answered {report.answered}, abandoned by client "
        f"{report.abandoned}, unanswered {sum(report.errors.values())}, skipped at the "
        f"generator bound {report.skipped}",
        f"  daemon     accounted {report.server_accounted:g} (499: {report.server_499:g}); "
        f"in flight after {report.inflight_after:g}, queued after {report.queued_after:g}",
        "  statuses   " + ", ".join(f"{k}: {v}" for k, v in report.statuses.items()),
        "  quota      " + ", ".join(
            f"{tier} used {q['used']:g} / generated {q['generated']:g}"
            for tier, q in report.quota.items()),
        f"  shutdown   exit {report.exit_code} after {report.exit_seconds:.2f} s",
        "  RSS over time (s: MB, tasks): " + ", ".join(
            f"{s.at:g}: {s.rss_mb:.1f}, {s.tasks}" for s in _thin(report.samples, 12)),
    ]
    lines.append("PASS" if not report.failures else
                 "FAIL\n" + "\n".join(f"  - {failure}" for failure in report.failures))
    return "\n".join(lines)


def _thin(samples: Sequence[Sample], count: int) -> list[Sample]:
    if len(samples) <= count:
        return list(samples)
    step = (len(samples) - 1) / (count - 1)
    return [samples[round(i * step)] for i in range(count)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600.0, help="load duration")
    parser.add_argument("--load", type=float, default=3.0, help="offered load / capacity")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds excluded from RSS growth (default: a quarter, 5-60 s)")
    parser.add_argument("--rss-limit-mb", type=float, default=50.0)
    parser.add_argument("--max-outstanding", type=int, default=128,
                        help="bound on requests in flight from the generator")
    parser.add_argument("--sample-every", type=float, default=None)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the policy and daemon log in this directory")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        report = asyncio.run(run(args, args.keep))
    else:
        with tempfile.TemporaryDirectory(prefix="meltguard-soak-") as tmp:
            report = asyncio.run(run(args, Path(tmp)))
    print(render(report), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(report), indent=2))
    return 0 if not report.failures else 1


if __name__ == "__main__":
    sys.exit(main())
