"""`meltguard bench`: every strategy at every offered load, each against a fresh daemon.

One point = one `meltguard serve --model sim --telemetry sim --sim-speed S --store memory
--strategy X` subprocess on a free port, the point's open-loop arrivals sent to it, its
/metrics sampled for the temperature path, then SIGTERM. Every strategy at one load faces
the very same arrivals. The policy is policies/bench.yaml with its durations divided by the
speed, written next to the results.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp

from meltguard.bench.args import DEFAULT_LOADS, QUICK_LOADS
from meltguard.bench.load import Defaults, offer, sample_metrics
from meltguard.bench.outcome import PointResult, TelemetryPoint, summarize
from meltguard.bench.power import DEFAULT_POWER_POLICY, POWER_STRATEGY, policy_for
from meltguard.bench.progress import Progress
from meltguard.bench.report import evaluate, write_reports
from meltguard.bench.scenario import (
    Arrival,
    Capacity,
    Scenario,
    arrivals,
    baseline_options,
    capacity,
    compress_policy,
    format_requests,
    tenant_key,
)
from meltguard.daemon.policy_file import LoadedPolicy, PolicyFileError, load_policy_file
from meltguard.daemon.strategies import ENV_BUCKET_BURST, ENV_BUCKET_RATE

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_POLICY = ROOT / "policies" / "bench.yaml"
QUICK_DURATION_S = 150.0


@dataclass(frozen=True, slots=True)
class BenchConfig:
    scenario: Scenario
    strategies: tuple[str, ...]
    loads: tuple[float, ...]
    speed: float
    policy_path: Path  # in model seconds
    out: Path
    power_policy_path: Path = DEFAULT_POWER_POLICY  # meltguard-power's, in model seconds
    plots: bool = True


@dataclass(frozen=True, slots=True)
class Prepared:
    """What every point shares: the capacity, the policy as the daemon gets it, and the
    request defaults the policy fills in."""

    capacity: Capacity
    loaded: LoadedPolicy  # the model-seconds policy, for the report
    daemon_policy: Path  # compressed by the speed
    defaults: Defaults
    power_policy: Path | None = None  # meltguard-power's, compressed; None: not run


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    scenario = Scenario()
    duration = args.duration or (QUICK_DURATION_S if args.quick else scenario.duration_s)
    scenario = replace(
        scenario,
        duration_s=duration,
        warmup_s=args.warmup if args.warmup is not None else scenario.warmup_s,
        seed=args.seed if args.seed is not None else scenario.seed,
    )
    loads = args.loads or (QUICK_LOADS if args.quick else DEFAULT_LOADS)
    return BenchConfig(
        scenario=scenario, strategies=tuple(args.strategies), loads=tuple(loads),
        speed=args.speed, policy_path=Path(args.policy) if args.policy else DEFAULT_POLICY,
        out=Path(args.out), plots=not args.no_plots,
        power_policy_path=Path(args.power_policy) if args.power_policy else DEFAULT_POWER_POLICY,
    )


def run_bench(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    try:
        prepared = prepare(config)
    except PolicyFileError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"meltguard bench: {exc}", file=sys.stderr)
        return 2
    print(prepared.capacity.describe(), flush=True)
    results = run_all(config, prepared)
    verdicts = evaluate(results, prepared.loaded.policy, prepared.capacity)
    table = write_reports(config.out, results, verdicts, config=describe(config, prepared),
                          plots=config.plots)
    print(table)
    for verdict in verdicts:
        print(verdict.line())
    return 0


def prepare(config: BenchConfig) -> Prepared:
    loaded = load_policy_file(config.policy_path)
    config.out.mkdir(parents=True, exist_ok=True)
    daemon_policy = config.out / f"policy-x{config.speed:g}.yaml"
    daemon_policy.write_text(compress_policy(loaded.text, config.speed))
    load_policy_file(daemon_policy)  # a compression that broke the file fails here, not later
    power_policy: Path | None = None
    if POWER_STRATEGY in config.strategies:
        power = policy_for(POWER_STRATEGY, load_policy_file(config.power_policy_path))
        power_policy = config.out / f"policy-power-x{config.speed:g}.yaml"
        power_policy.write_text(compress_policy(power.text, config.speed))
        load_policy_file(power_policy)
    limits = loaded.policy.limits
    return Prepared(capacity(config.scenario), loaded, daemon_policy,
                    Defaults(limits.default_size, limits.default_steps), power_policy)


def run_all(config: BenchConfig, prepared: Prepared) -> list[PointResult]:
    _raise_fd_limit()
    scenario = config.scenario
    point_s = (scenario.end_s + scenario.grace_s) / config.speed + 2.0
    progress = Progress(len(config.loads) * len(config.strategies), point_s)
    results: list[PointResult] = []
    logs = config.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    try:
        for load in config.loads:
            offered = arrivals(scenario, load, prepared.capacity)
            (config.out / f"requests-{load:g}x.jsonl").write_text(format_requests(offered))
            for strategy in config.strategies:
                progress.start(f"{strategy} @ {load:g}x")
                result = asyncio.run(run_point(
                    strategy, load, offered, config, prepared,
                    log_path=logs / f"{strategy}-{load:g}x.log", progress=progress,
                ))
                results.append(result)
                progress.done(f"goodput {result.goodput_ratio:.2f}x, peak "
                              f"{result.peak_c or 0:.1f} °C")
    finally:
        progress.close()
    return results


async def run_point(
    strategy: str,
    load: float,
    offered: Sequence[Arrival],
    config: BenchConfig,
    prepared: Prepared,
    *,
    log_path: Path,
    progress: Progress | None = None,
) -> PointResult:
    scenario, speed = config.scenario, config.speed
    options = baseline_options(prepared.capacity, speed)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           ENV_BUCKET_RATE: repr(options.bucket_rate),
           ENV_BUCKET_BURST: repr(options.bucket_burst)}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    policy = prepared.daemon_policy
    if strategy == POWER_STRATEGY and prepared.power_policy is not None:
        policy = prepared.power_policy
    command = [
        sys.executable, "-m", "meltguard", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--model", "sim", "--telemetry", "sim", "--sim-speed", f"{speed:g}",
        "--store", "memory", "--strategy", strategy, "--policy", str(policy),
        "--max-batch", "1", "--drain-timeout", "1", "--log-format", "json",
    ]
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *command, stdout=log, stderr=log, env=env, cwd=ROOT)
        try:
            await _wait_ready(url, process, log_path)
            telemetry: list[TelemetryPoint] = []
            loop = asyncio.get_running_loop()
            origin = loop.time() + 0.05
            sample_s = prepared.loaded.policy.pressure.sample_interval
            scraper = asyncio.create_task(sample_metrics(
                url, speed=speed, origin=origin, interval=max(2 * sample_s / speed, 0.02),
                sink=telemetry))
            records = await offer(
                url, offered, speed=speed, give_up_at=scenario.end_s + scenario.grace_s,
                key_of=tenant_key, defaults=prepared.defaults, origin=origin,
                progress=(lambda t: progress.advance(t / scenario.end_s)) if progress else None,
            )
            scraper.cancel()
            await asyncio.gather(scraper, return_exceptions=True)
        finally:
            await _stop(process)
    return summarize(strategy=strategy, load=load, scenario=scenario,
                     capacity_ips=prepared.capacity.sustainable_ips, requests=records,
                     telemetry=sorted(telemetry, key=lambda p: p.t))


async def _wait_ready(url: str, process: asyncio.subprocess.Process, log_path: Path) -> None:
    deadline = time.monotonic() + 60.0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while time.monotonic() < deadline:
            if process.returncode is not None:
                raise RuntimeError(
                    f"daemon exited with {process.returncode}:\n{_tail(log_path)}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
                async with session.get(url + "/readyz") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise TimeoutError(f"daemon at {url} not ready within 60 s (log: {log_path})")


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 10.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-2000:]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _raise_fd_limit() -> None:
    """An unbounded queue at 10x holds a thousand open connections on each side."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def describe(config: BenchConfig, prepared: Prepared) -> dict[str, object]:
    scenario, cap = config.scenario, prepared.capacity
    options = baseline_options(cap)
    return {
        "speed": config.speed,
        "policy": str(config.policy_path),
        "policy_sha256": prepared.loaded.sha256,
        "power_policy": str(config.power_policy_path) if prepared.power_policy else None,
        "strategies": list(config.strategies),
        "loads": list(config.loads),
        "warmup_s": scenario.warmup_s,
        "duration_s": scenario.duration_s,
        "grace_s": scenario.grace_s,
        "seed": scenario.seed,
        "tiers": [{"tier": t.tier, "share": t.share, "tenants": t.tenants,
                   "deadline_s": t.deadline_s} for t in scenario.tiers],
        "request": {"size": str(scenario.shape.size), "steps": scenario.shape.steps,
                    "n": scenario.shape.n},
        "capacity": {
            "service_s": cap.service_s,
            "sustainable_duty": cap.duty,
            "sustainable_images_per_s": cap.sustainable_ips,
            "nominal_requests_per_s": cap.nominal_rps,
            "slowdown_c": cap.slowdown_c,
            "text": cap.describe(),
        },
        "baselines": {
            "token_bucket_rate_per_s": options.bucket_rate,
            "token_bucket_burst": options.bucket_burst,
            "fixed_concurrency_permits": prepared.loaded.policy.concurrency.limit,
            "fifo_slots": prepared.loaded.policy.concurrency.limit,
        },
    }
