"""`meltguard` command line. Every serve flag also reads MELTGUARD_<FLAG> from the environment.

It sits above every package (tests/test_import_rules.py): `serve` and `gpus` come from
daemon/, `bench` and `simulate` from bench/, each imported only when its command runs."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from meltguard import __version__


def _env(flag: str, default: Any) -> Any:
    return os.environ.get("MELTGUARD_" + flag.upper().replace("-", "_"), default)


def _env_bool(flag: str) -> bool:
    return str(_env(flag, "")).lower() in ("1", "true", "yes", "on")


def _add_telemetry(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--telemetry", default=_env("telemetry", "auto"),
                        help="auto | nvml | sim | replay:FILE[?columns=A,B,...] (default: auto)")
    parser.add_argument("--sim-speed", type=float, default=float(_env("sim-speed", 1.0)),
                        help="time compression of the simulated GPU and sim engine")
    parser.add_argument("--replay-loop", action="store_true", default=_env_bool("replay-loop"),
                        help="restart a replayed trace at its end instead of going stale")
    parser.add_argument("--gpus", default=_env("gpus", None),
                        help="comma-separated GPU indices to watch (default: CUDA_VISIBLE_DEVICES "
                             "or all)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meltguard", description="GPU-aware admission control for image generation.")
    parser.add_argument("--version", action="version", version=f"meltguard {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the daemon")
    serve.add_argument("--host", default=_env("host", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(_env("port", 8000)))
    serve.add_argument("--policy", default=_env("policy", None),
                       help="policy YAML (default: the built-in policy)")
    serve.add_argument("--model", default=_env("model", "tiny"),
                       help="tiny | sim | PATH to a diffusers folder | Hugging Face id (cached)")
    serve.add_argument("--store", default=_env("store", None),
                       help="sqlite:PATH | memory | redis://HOST:PORT/DB "
                            "(default: sqlite under the XDG state dir)")
    serve.add_argument("--log-format", choices=("json", "console"),
                       default=_env("log-format", "json"))
    serve.add_argument("--max-batch", type=int, default=int(_env("max-batch", 4)))
    serve.add_argument("--drain-timeout", type=float, default=float(_env("drain-timeout", 30)))
    serve.add_argument("--idle-timeout", type=float, default=float(_env("idle-timeout", 75)),
                       help="close a connection that sends nothing for this long (seconds)")
    serve.add_argument("--log-prompts", action="store_true", default=_env_bool("log-prompts"),
                       help="include prompts in log lines (off: prompts are private)")
    serve.add_argument("--admin-remote", action="store_true", default=_env_bool("admin-remote"),
                       help="let admin routes answer non-loopback peers (still need the key)")
    serve.add_argument("--public-url", default=_env("public-url", None),
                       help="base URL for response_format=url links")
    serve.add_argument("--strategy", default=_env("strategy", "meltguard"),
                       choices=("meltguard", "meltguard-power", "none", "token-bucket",
                                "fixed-concurrency"),
                       help="admission strategy; the others are benchmark baselines")
    serve.add_argument("--loop", default=_env("loop", "auto"),
                       choices=("auto", "uvloop", "asyncio"),
                       help="event loop: uvloop where installed (auto), or plain asyncio")
    _add_telemetry(serve)

    policy = commands.add_parser("policy", help="check a policy file or hash a key")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True)
    check = policy_commands.add_parser("check", help="validate a policy file")
    check.add_argument("file")
    hash_key = policy_commands.add_parser("hash-key", help="print a key's SHA-256 for api_keys")
    hash_key.add_argument("key")

    gpus = commands.add_parser("gpus", help="print what the telemetry source reads now")
    _add_telemetry(gpus)

    from meltguard.daemon.record import add_record_arguments

    add_record_arguments(commands.add_parser(
        "record", help="record the live NVML telemetry as a replay trace (JSONL)"))

    from meltguard.bench.args import add_bench_arguments, add_simulate_arguments

    add_bench_arguments(commands.add_parser(
        "bench", help="overload and thermal benchmark of the admission strategies"))
    add_simulate_arguments(commands.add_parser(
        "simulate", help="replay a policy offline in virtual time"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from meltguard.daemon.serve import run_serve, settings_from_args

        return run_serve(settings_from_args(args))
    if args.command == "policy":
        return _policy(args)
    if args.command == "gpus":
        from meltguard.daemon.gpus_command import run_gpus

        return run_gpus(args)
    if args.command == "record":
        from meltguard.daemon.record import run_record

        return run_record(args)
    if args.command == "bench":
        from meltguard.bench.runner import run_bench

        return run_bench(args)
    if args.command == "simulate":
        from meltguard.bench.simulate import run_simulate

        return run_simulate(args)
    return 2


def _policy(args: argparse.Namespace) -> int:
    from meltguard.daemon.policy_file import (
        PolicyFileError,
        check_summary,
        hash_key,
        load_policy_file,
    )

    if args.policy_command == "hash-key":
        print(hash_key(args.key))
        return 0
    try:
        loaded = load_policy_file(args.file)
    except PolicyFileError as exc:
        for line in exc.lines:
            print(line, file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{args.file}:0: (file): {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(check_summary(loaded))
    return 0
