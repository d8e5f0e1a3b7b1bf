"""Flags of `meltguard bench` and `meltguard simulate`. Kept free of heavy imports: the CLI
builds every subcommand's parser on each start, `meltguard policy check` included."""

from __future__ import annotations

import argparse

STRATEGY_NAMES = ("meltguard", "meltguard-power", "none", "token-bucket", "fixed-concurrency")
DEFAULT_LOADS = (0.5, 1.0, 2.0, 5.0, 10.0)
QUICK_LOADS = (1.0, 5.0, 10.0)


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.5,1,2, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _strategies(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    bad = [n for n in names if n not in STRATEGY_NAMES]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"strategies are {', '.join(STRATEGY_NAMES)}; got {text!r}")
    return names


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="CI smoke run: loads 1,5,10 and a shorter window (under 3 minutes)")
    parser.add_argument("--strategies", type=_strategies, default=STRATEGY_NAMES,
                        help="comma-separated subset of " + ", ".join(STRATEGY_NAMES))
    parser.add_argument("--loads", type=_floats, default=None,
                        help="offered loads as multiples of the sustainable capacity "
                             "(default 0.5,1,2,5,10; --quick 1,5,10)")
    parser.add_argument("--duration", type=float, default=None,
                        help="measured model seconds per point (default 360; --quick 150)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="model seconds of load before measuring (default 60)")
    parser.add_argument("--speed", type=float, default=40.0,
                        help="time compression of the simulated GPU (default 40)")
    parser.add_argument("--policy", default=None,
                        help="meltguard policy in model seconds (default policies/bench.yaml)")
    parser.add_argument("--power-policy", default=None,
                        help="meltguard-power's policy, with a power section, in model seconds "
                             "(default policies/bench-power.yaml)")
    parser.add_argument("--out", default="bench-results",
                        help="directory for results.json, results.md, plots and logs")
    parser.add_argument("--seed", type=int, default=None, help="seed of the arrivals")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", required=True, help="policy YAML to try (model seconds)")
    parser.add_argument("--trace", default=None,
                        help="recorded telemetry in any format --telemetry replay: reads "
                             "(FILE or FILE?columns=...) instead of the thermal model; "
                             "replayed in a loop")
    parser.add_argument("--requests", default=None,
                        help="request log (JSONL: t, tier, tenant, size, steps, n) instead of "
                             "the synthetic tiers")
    parser.add_argument("--strategy", default="meltguard", choices=STRATEGY_NAMES)
    parser.add_argument("--load", type=float, default=5.0,
                        help="synthetic load as a multiple of the sustainable capacity "
                             "(default 5)")
    parser.add_argument("--duration", type=float, default=None,
                        help="measured model seconds of synthetic load (default 360)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="model seconds of load before measuring (default 60)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the synthetic arrivals")
    parser.add_argument("--json", dest="json_out", default=None,
                        help="write the full result (temperature path included) to this file")
