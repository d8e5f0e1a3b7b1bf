"""Engine throughput with and without batching, measured in one run.

    python -m benchmarks.engine [--requests 64] [--max-batch 4] [--size 64x64]
                                        [--steps 2] [--rounds 3] [--model tiny]

Each round sends N concurrent single-image requests through a DiffusersEngine whose
batcher allows 1 image per call, then through one allowing --max-batch, on the same
pipeline object. Rounds alternate between the two so that drift in machine load (other
programs share this CPU) hits both alike; the median round is reported. End to end:
tokenizing, the pipeline, PNG encoding and the hop to the worker thread are all counted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from meltguard.clock import SystemClock
from meltguard.inference.errors import ModelNotFound
from meltguard.protocols import Engine
from meltguard.values import GenerationJob, Size


@dataclass(frozen=True, slots=True)
class BenchConfig:
    requests: int
    max_batch: int
    size: Size
    steps: int
    rounds: int
    model: str
    out: Path


@dataclass(frozen=True, slots=True)
class RoundResult:
    max_batch: int
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


def parse_args(argv: list[str] | None) -> BenchConfig:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.engine",
        description="images/s of an engine at batch 1 and at --max-batch, in one run",
    )
    parser.add_argument("--requests", type=int, default=64, help="concurrent requests per round")
    parser.add_argument("--max-batch", type=int, default=4, help="images per call when batching")
    parser.add_argument("--size", type=Size.parse, default=Size(64, 64), help="WIDTHxHEIGHT")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per setting (median)")
    parser.add_argument("--model", default="tiny", help="tiny, a diffusers folder or HF id")
    parser.add_argument("--out", type=Path, default=Path("bench-results/engine.md"))
    args = parser.parse_args(argv)
    for name in ("requests", "max_batch", "steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return BenchConfig(
        requests=args.requests,
        max_batch=args.max_batch,
        size=args.size,
        steps=args.steps,
        rounds=args.rounds,
        model=args.model,
        out=args.out,
    )


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def _round(engine: Engine, config: BenchConfig, max_batch: int, label: str) -> RoundResult:
    jobs = [
        GenerationJob(f"bench prompt {i}", config.size, config.steps, n=1, seed=i)
        for i in range(config.requests)
    ]
    done = 0
    live = sys.stderr.isatty()

    async def one(job: GenerationJob) -> None:
        nonlocal done
        await engine.generate(job)
        done += 1
        if live:
            print(f"\r  {label}: {done}/{config.requests}", end="", file=sys.stderr, flush=True)

    started = time.perf_counter()
    await asyncio.gather(*(one(job) for job in jobs))
    seconds = time.perf_counter() - started
    if live:
        print("\r", end="", file=sys.stderr)
    result = RoundResult(max_batch=max_batch, images=len(jobs), seconds=seconds)
    _progress(
        f"  {label}: {result.images} images in {seconds:.2f} s = {result.images_per_s:.1f} images/s"
    )
    return result


async def run(config: BenchConfig) -> dict[int, list[RoundResult]]:
    import torch

    from meltguard.inference.diffusers_engine import (
        DiffusersEngine,
        folder_factory,
        pick_device,
        tiny_factory,
    )
    from meltguard.inference.loading import resolve_model_dir

    device, dtype = pick_device()
    _progress(f"building {config.model} on {device} ({torch.get_num_threads()} torch threads)")
    factory = (
        tiny_factory
        if config.model == "tiny"
        else folder_factory(config.model, resolve_model_dir(config.model))
    )
    pipeline = await asyncio.to_thread(factory, device, dtype)
    settings = sorted({1, config.max_batch})
    engines = {
        batch: DiffusersEngine(
            config.model,
            lambda _device, _dtype: pipeline,
            max_batch=batch,
            clock=SystemClock(),
            device=device,
        )
        for batch in settings
    }
    results: dict[int, list[RoundResult]] = {batch: [] for batch in settings}
    try:
        for engine in engines.values():
            await engine.warm_up()
        for number in range(1, config.rounds + 1):
            for batch, engine in engines.items():
                label = f"round {number}/{config.rounds} max_batch={batch}"
                results[batch].append(await _round(engine, config, batch, label))
    finally:
        for engine in engines.values():
            await engine.close()
    return results


def medians(results: dict[int, list[RoundResult]]) -> dict[int, float]:
    return {
        batch: statistics.median(r.images_per_s for r in rounds)
        for batch, rounds in results.items()
    }


def render(config: BenchConfig, results: dict[int, list[RoundResult]], device: str) -> str:
    rates = medians(results)
    base = rates[min(rates)]
    lines = [
        f"# Engine throughput with and without batching: {config.model}",
        "",
        f"`python -m benchmarks.engine --requests {config.requests} "
        f"--max-batch {config.max_batch} --size {config.size} --steps {config.steps} "
        f"--rounds {config.rounds} --model {config.model}`",
        "",
        f"Device: {device}; {config.requests} concurrent 1-image requests per round, median of "
        f"{config.rounds} alternating rounds.",
        "",
        "| max_batch | images/s (median) | min..max | s/image | vs batch 1 |",
        "|---:|---:|---:|---:|---:|",
    ]
    for batch, rounds in results.items():
        seen = [r.images_per_s for r in rounds]
        lines.append(
            f"| {batch} | {rates[batch]:.1f} | {min(seen):.1f}..{max(seen):.1f} "
            f"| {1 / rates[batch]:.4f} | {rates[batch] / base:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def describe_device(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(device)}, fp16)"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads, fp32)"


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    from meltguard.inference.diffusers_engine import pick_device

    try:
        results = asyncio.run(run(config))
    except ModelNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    device = describe_device(pick_device()[0])
    report = render(config, results, device)
    config.out.parent.mkdir(parents=True, exist_ok=True)
    config.out.write_text(report, encoding="utf-8")
    rates = medians(results)
    single, batched = rates[min(rates)], rates[max(rates)]
    print(f"max_batch=1: {single:.1f} images/s ({1 / single:.4f} s/image)")
    print(f"max_batch={config.max_batch}: {batched:.1f} images/s ({1 / batched:.4f} s/image)")
    print(f"ratio: {batched / single:.2f}x   (table written to {config.out})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
