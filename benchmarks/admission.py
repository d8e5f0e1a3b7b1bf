"""Refusal and delivery benchmark: `python -m benchmarks.admission` (`make bench-admission`).

What it answers:
- how many refusals one daemon answers per second on its one core, for each quota store
  (memory, SQLite, Redis) and each event loop (uvloop, asyncio): a tenant over its daily
  quota sends `POST /v1/images/generations` again and again, through the daemon's own app
  (edge, authentication, the gate with its store, the `admission.decided` line, metrics,
  rate-limit headers); the rate is read against an authenticated trivial route of the same
  daemon in the same run (`GET /v1/models` with the same key);
- how many images per second the daemon delivers at `--max-batch 4` (HTTP in, gate, batcher,
  base64 out), against the same engine object driven directly in the same process.

The server runs in this process; its rates are requests per CPU-second of this process (per
core, whatever else the box runs). The load comes from `wrk -t1` (keep-alive) or, where wrk is
missing, an aiohttp client in a child process.
The box is shared: every round runs every case once in a rotated order, and each ratio is the
median of the ratios measured within one round.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from benchmarks.stores import redis_server
from meltguard.clock import SystemClock
from meltguard.daemon.logs import configure_logging
from meltguard.daemon.serve import Assembly, assemble, loop_factory
from meltguard.daemon.settings import Settings
from meltguard.inference.select import build_engine
from meltguard.protocols import Engine
from meltguard.values import GenerationJob, Size

KEY = "sk-bench-over-quota"
STORES = ("memory", "sqlite", "redis")
LOOPS = ("uvloop", "asyncio")
TRIVIAL = "trivial"
# The same refused POST sent to a route that takes no POST: aiohttp and the edge refuse it
# (405 in OpenAI's shape, its line, its series) before any gate work. What a refusal costs
# over this is the daemon's own work: the body, the decision, the worded answer's headers.
FLOOR = "floor"
REFUSAL_TARGET = 0.6  # refusal rate / authenticated trivial route
DELIVERY_TARGET = 0.95  # daemon images/s / engine images/s
# The refused tenant spends its one image of the day in the warm-up; its minute window never
# binds, so every later request is a `daily_quota_exceeded` the store has to answer.
POLICY = """version: 1
tiers:
  capped: {{priority: 0, quotas: [{{limit: 1, per: 1d}}, {{limit: 1000000, per: 1m}}],
           max_concurrent: 64, max_queue_wait: 30s}}
  bulk: {{priority: 1, quotas: [{{limit: 1000000000, per: 1d}}], max_concurrent: 64,
         max_queue_wait: 600s}}
api_keys:
  - {{key_sha256: "{capped}", tenant: capped, tier: capped}}
  - {{key_sha256: "{bulk}", tenant: bulk, tier: bulk}}
cost: {{reference: {{size: 64x64, steps: 2}}}}
limits: {{max_n: 4, max_size: 512x512, max_steps: 50, default_size: 64x64, default_steps: 2}}
concurrency: {{limit: 64, min_limit: 1}}
"""
BULK_KEY = "sk-bench-images"
REFUSED_BODY = '{"prompt": "a lighthouse at dusk", "size": "64x64"}'


@dataclass
class RefusalRun:
    loop: str
    tool: str
    rates: dict[str, list[float]] = field(default_factory=dict)
    wrong: dict[str, int] = field(default_factory=dict)
    store_errors: dict[str, float] = field(default_factory=dict)  # in the timed rounds

    def median(self, case: str) -> float:
        return float(statistics.median(self.rates[case]))

    def ratio(self, case: str, baseline: str = TRIVIAL) -> float:
        pairs = zip(self.rates[case], self.rates[baseline], strict=True)
        return float(statistics.median(a / b for a, b in pairs))


@dataclass
class DeliveryRun:
    loop: str
    images: int
    direct: list[float] = field(default_factory=list)  # images/s per round
    daemon: list[float] = field(default_factory=list)

    def ratio(self) -> float:
        pairs = zip(self.daemon, self.direct, strict=True)
        return float(statistics.median(d / e for d, e in pairs))


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _assembly(policy: Path, store_spec: str, *, engine: Engine | None = None,
              max_batch: int = 4) -> Assembly:
    """The daemon's own wiring (serve.assemble) with one store."""
    settings = Settings(policy=str(policy), model="sim", telemetry="sim", store=store_spec,
                        policy_poll=0, max_batch=max_batch)
    # The store as the daemon opens it from the spec.
    return assemble(settings, SystemClock(), CollectorRegistry(), engine=engine)


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    # The daemon's runner settings (serve.serve): no access log.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock, backlog=1024).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def _until_ready(base: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            async with session.get(base + "/readyz") as resp:
                if resp.status == 200:
                    return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{base} never became ready")


# -- load -------------------------------------------------------------------------------------

_WRK_REQUESTS = re.compile(r"(\d+) requests in ")
_WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    base: str
    path: str
    post: bool  # POST the refused body, else GET
    expect_ok: bool


async def _wrk(wrk: str, case: Case, seconds: int, connections: int, work: Path) -> tuple[
        int, int]:
    """(requests answered, wrong answers)."""
    script = work / f"{re.sub(r'[^a-z]+', '-', case.name)}.lua"
    lines = [f'wrk.headers["Authorization"] = "Bearer {KEY}"']
    if case.post:
        lines += ['wrk.method = "POST"', f"wrk.body = '{REFUSED_BODY}'",
                  'wrk.headers["Content-Type"] = "application/json"']
    script.write_text("\n".join(lines) + "\n")
    proc = await asyncio.create_subprocess_exec(
        wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s", str(script),
        case.base + case.path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    match = _WRK_REQUESTS.search(text)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{text}")
    requests = int(match.group(1))
    non2xx = _WRK_NON2XX.search(text)
    refused = int(non2xx.group(1)) if non2xx else 0
    return requests, refused if case.expect_ok else requests - refused


async def _client(case: Case, seconds: int, connections: int) -> tuple[int, int]:
    """The fallback: an aiohttp client in a child process, off the server's event loop."""
    args = [sys.executable, "-m", "benchmarks.admission", "--load-generator",
            case.base + case.path, "--seconds", str(seconds), "--connections", str(connections)]
    if case.post:
        args.append("--post")
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode})")
    report = json.loads(out)
    requests, ok = int(report["requests"]), int(report["ok"])
    return requests, requests - ok if case.expect_ok else ok


async def _generate_load(url: str, seconds: float, connections: int, post: bool) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    stop_at = time.perf_counter() + seconds
    counts = {"requests": 0, "ok": 0}

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < stop_at:
            method = session.post if post else session.get
            async with method(url, headers=headers, data=REFUSED_BODY if post else None) as resp:
                await resp.read()
                counts["requests"] += 1
                counts["ok"] += resp.status < 300

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as s:
        started = time.perf_counter()
        await asyncio.gather(*(worker(s) for _ in range(connections)))
        elapsed = time.perf_counter() - started
    print(json.dumps({**counts, "seconds": elapsed}))


# -- refusals ---------------------------------------------------------------------------------


async def refusals(loop: str, args: argparse.Namespace, work: Path, redis_url: str,
                   policy: Path) -> RefusalRun:
    specs = {"memory": "memory", "sqlite": f"sqlite:{work / f'quota-{loop}.sqlite3'}",
             "redis": redis_url}
    wrk = None if args.no_wrk else shutil.which("wrk")
    run = RefusalRun(loop, f"wrk -t1 -c{args.connections}" if wrk else
                     f"aiohttp client, {args.connections} connections")
    assemblies = {store: _assembly(policy, spec) for store, spec in specs.items()}
    async with contextlib.AsyncExitStack() as stack:
        bases = {store: await stack.enter_async_context(serving(a.app))
                 for store, a in assemblies.items()}
        for base in bases.values():
            await _until_ready(base)
        cases = [Case(TRIVIAL, bases["memory"], "/v1/models", post=False, expect_ok=True),
                 Case(FLOOR, bases["memory"], "/v1/models", post=True, expect_ok=False)]
        cases += [Case(store, base, "/v1/images/generations", post=True, expect_ok=False)
                  for store, base in bases.items()]
        run.rates = {case.name: [] for case in cases}
        run.wrong = dict.fromkeys(run.rates, 0)

        async def measure(case: Case, seconds: int) -> tuple[float, int]:
            """Requests per CPU-second of this process (the server: its event loop, and the
            SQLite store's thread), and the wrong answers. CPU time rather than wall time,
            since the box is shared: a rate per core that other work does not dilute."""
            cpu = time.process_time()
            if wrk is not None:
                requests, wrong = await _wrk(wrk, case, seconds, args.connections, work)
            else:
                requests, wrong = await _client(case, seconds, args.connections)
            return requests / max(time.process_time() - cpu, 1e-9), wrong

        def store_errors(store: str) -> float:
            runtime = assemblies[store].runtime
            assert runtime.metrics is not None
            value = runtime.metrics.registry.get_sample_value(
                "meltguard_quota_store_errors_total", {"store": store})
            return value or 0.0

        await _spend_the_day(bases.values())
        for case in cases:  # warm-up: connections, scripts, pages
            await measure(case, 1)
        before = {store: store_errors(store) for store in STORES}
        for index in range(args.rounds):
            shift = index % len(cases)
            for case in cases[shift:] + cases[:shift]:
                rate, wrong = await measure(case, args.seconds)
                run.rates[case.name].append(rate)
                run.wrong[case.name] += wrong
            print(f"{loop} round {index + 1}/{args.rounds}: " + ", ".join(
                f"{name} {rates[-1]:,.0f}/s" for name, rates in run.rates.items()),
                file=sys.stderr)
        run.store_errors = {store: store_errors(store) - before[store] for store in STORES}
    return run


async def _spend_the_day(bases: Iterable[str]) -> None:
    """The refused tenant's one image of the day, waited for: a client that left before its
    image would have it refunded, and the timed runs would admit one more."""
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        for base in bases:
            async with session.post(base + "/v1/images/generations", data=REFUSED_BODY,
                                    headers=headers) as resp:
                await resp.read()


# -- delivery ---------------------------------------------------------------------------------


async def delivery(loop: str, args: argparse.Namespace, work: Path, policy: Path) -> DeliveryRun:
    # The daemon's own engine builder; the same object is driven directly and served.
    engine = build_engine("tiny", max_batch=args.max_batch, clock=SystemClock())
    await engine.warm_up()
    run = DeliveryRun(loop, args.images)
    size = Size(64, 64)
    assembly = _assembly(policy, "memory", engine=engine, max_batch=args.max_batch)
    headers = {"Authorization": f"Bearer {BULK_KEY}"}

    async def direct() -> float:
        jobs = [GenerationJob(f"bench image {i}", size, 2, n=1, seed=i)
                for i in range(args.images)]
        started = time.perf_counter()
        await asyncio.gather(*(engine.generate(job) for job in jobs))
        return float(args.images / (time.perf_counter() - started))

    async def through(session: aiohttp.ClientSession, base: str) -> float:
        async def one(index: int) -> None:
            body = {"prompt": f"bench image {index}", "size": "64x64", "steps": 2,
                    "seed": index}
            async with session.post(base + "/v1/images/generations", json=body,
                                    headers=headers) as resp:
                answer = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"daemon answered {resp.status}: {answer}")
                base64.b64decode(answer["data"][0]["b64_json"])

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(args.images)))
        return float(args.images / (time.perf_counter() - started))

    async with serving(assembly.app) as base, aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=args.images)) as session:
        await _until_ready(base)
        for _ in range(2):  # warm-up of both paths: torch's first batches run slower
            await through(session, base)
            await direct()
        for index in range(args.rounds):
            first_direct = index % 2 == 0
            if first_direct:
                run.direct.append(await direct())
            run.daemon.append(await through(session, base))
            if not first_direct:
                run.direct.append(await direct())
            print(f"{loop} images round {index + 1}/{args.rounds}: engine "
                  f"{run.direct[-1]:.1f}/s, daemon {run.daemon[-1]:.1f}/s", file=sys.stderr)
    await engine.close()
    return run


# -- report -----------------------------------------------------------------------------------


def report(refused: list[RefusalRun], delivered: list[DeliveryRun], args: argparse.Namespace,
           redis_version: str, load: tuple[float, float]) -> str:
    tool = refused[0].tool if refused else "-"
    lines = [
        "# Refusal and delivery benchmark",
        "",
        "`python -m benchmarks.admission` (`make bench-admission`). *Refusals*: a tenant over "
        "its daily quota posts the same image request again and again to the daemon's own "
        "application (edge, authentication, the gate and its quota store, the "
        "`admission.decided` line written as JSON to /dev/null, metrics, rate-limit "
        f"headers), over keep-alive connections from {tool}. Rates are requests per CPU-second of "
        "the server process (its event loop, and the SQLite store's thread): per core, "
        "whatever else the shared box runs. *trivial* is `GET /v1/models` with the same key on "
        "the same daemon (the edge and authentication, no gate). *floor* is the refused "
        "request's POST, body and key sent to `/v1/models`, which takes no POST: the edge "
        "answers 405 in OpenAI's shape with its line and series, before any gate work. "
        "*Images*: the tiny model at "
        f"64x64, 2 steps, {args.images} concurrent single-image requests per round through "
        f"the daemon at `--max-batch {args.max_batch}`, against the same engine object "
        "driven directly in the same process.",
        "",
        f"{args.rounds} rounds of {args.seconds} s per case, the cases rotated each round; "
        "ratios are the median of the per-round ratios. *Wrong answers* are 2xx on a refusal "
        "path (or non-2xx on the trivial one); with the default `on_store_error: open`, each "
        "quota store error in the timed rounds is an admission, so wrong answers up to the "
        "store errors are those.",
        "",
        f"Host: {platform.machine()}, {os.cpu_count()} CPUs shared with other work, Python "
        f"{platform.python_version()}, aiohttp {aiohttp.__version__}, Redis {redis_version} "
        f"on loopback; load average {load[0]:.1f} at the start, {load[1]:.1f} at the end.",
        "",
    ]
    if refused:
        lines += ["| loop | case | requests per CPU-s | per round | / trivial | / floor | "
                  "wrong answers | store errors |", "|---|---|---:|---|---:|---:|---:|---:|"]
        for run in refused:
            for case, rates in run.rates.items():
                ratio = "" if case == TRIVIAL else f"{run.ratio(case):.2f}x"
                over_floor = f"{run.ratio(case, FLOOR):.2f}x" if case in STORES else ""
                rounds = ", ".join(f"{r:,.0f}" for r in rates)
                name = f"{case} refusal" if case in STORES else case
                errors = f"{run.store_errors.get(case, 0.0):g}"
                lines.append(f"| {run.loop} | {name} | {run.median(case):,.0f} | {rounds} | "
                             f"{ratio} | {over_floor} | {run.wrong[case]} | {errors} |")
        worst = min(run.ratio(store) for run in refused for store in STORES if
                    store in run.rates)
        verdict = "met" if worst >= REFUSAL_TARGET else "**NOT met**"
        lines += ["", f"Lowest refusal / trivial ratio: {worst:.2f}x (target >= "
                  f"{REFUSAL_TARGET}x: {verdict}).", ""]
    if delivered:
        lines += ["| loop | engine images/s | daemon images/s | daemon / engine |",
                  "|---|---|---|---:|"]
        for drun in delivered:
            lines.append(
                f"| {drun.loop} | {', '.join(f'{v:.1f}' for v in drun.direct)} | "
                f"{', '.join(f'{v:.1f}' for v in drun.daemon)} | {drun.ratio():.2f}x |")
        worst_images = min(drun.ratio() for drun in delivered)
        verdict = "met" if worst_images >= DELIVERY_TARGET else "**NOT met**"
        lines += ["", f"Daemon / engine images/s: {worst_images:.2f}x (target >= "
                  f"{DELIVERY_TARGET}x: {verdict}).", ""]
    return "\n".join(lines)


async def _both(loop: str, args: argparse.Namespace, work: Path, redis_url: str,
                policy: Path) -> tuple[RefusalRun | None, DeliveryRun | None]:
    refused = None if args.skip_refusals else await refusals(loop, args, work, redis_url, policy)
    delivered = None
    if not args.skip_images and loop == args.loops[0]:
        delivered = await delivery(loop, args, work, policy)
    return refused, delivered


def _run_on(loop: str, args: argparse.Namespace, work: Path, redis_url: str,
            policy: Path) -> tuple[RefusalRun | None, DeliveryRun | None]:
    """Everything measured on `loop` runs on one fresh event loop of that kind."""
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        return runner.run(_both(loop, args, work, redis_url, policy))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.admission")
    parser.add_argument("--seconds", type=int, default=2, help="one timed run of a case")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--loops", nargs="+", choices=LOOPS, default=list(LOOPS))
    parser.add_argument("--images", type=int, default=128,
                        help="concurrent requests per round (128: about 2.5 s of tiny-model "
                             "work, long enough for a round's ratio to hold still)")
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--skip-refusals", action="store_true")
    parser.add_argument("--skip-images", action="store_true")
    parser.add_argument("--no-wrk", action="store_true", help="use the aiohttp client")
    parser.add_argument("--out", type=Path, default=Path("docs/bench/admission.md"))
    parser.add_argument("--load-generator", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--post", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.seconds < 1 or args.images < 1:
        parser.error("--rounds, --seconds and --images must be at least 1")
    if args.load_generator:
        asyncio.run(_generate_load(args.load_generator, args.seconds, args.connections,
                                   args.post))
        return 0

    refused: list[RefusalRun] = []
    delivered: list[DeliveryRun] = []
    with open(os.devnull, "wb") as sink, tempfile.TemporaryDirectory(
            prefix="meltguard-bench-") as tmp:
        # The daemon's own logging, written to /dev/null: rendering each line is measured.
        configure_logging("json", stream=sink)
        work = Path(tmp)
        policy = work / "policy.yaml"
        policy.write_text(POLICY.format(capped=_sha(KEY), bulk=_sha(BULK_KEY)))
        load_before = os.getloadavg()[0]
        with redis_server(work) as (redis_url, version):
            for loop in args.loops:
                one, two = _run_on(loop, args, work, redis_url, policy)
                if one is not None:
                    refused.append(one)
                if two is not None:
                    delivered.append(two)
        text = report(refused, delivered, args, version, (load_before, os.getloadavg()[0]))
    sys.stdout.write(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
