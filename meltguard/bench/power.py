"""The `meltguard-power` strategy: the bench policy plus a `power` section.

Everything else is the `meltguard` strategy unchanged (the same gate, levels and actions), so
the difference between the two is what the power lever buys. The ratios are tuned with
`meltguard simulate --strategy meltguard-power` against the simulated card (its DVFS curve is
the published one in meltguard/daemon/telemetry/dvfs.py), never against the baselines.
"""

from __future__ import annotations

from typing import Any

import yaml

from meltguard.daemon.policy_file import LoadedPolicy, load_policy_text

POWER_STRATEGY = "meltguard-power"

# Tuned in `meltguard simulate`; see docs/benchmark.md for what the tuning found.
BENCH_POWER: dict[str, float] = {"elevated": 0.8, "high": 0.72, "critical": 0.6}


def with_power(text: str) -> str:
    """The policy text with BENCH_POWER as its `power` section, unless it has one of its own."""
    data: Any = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError("a policy is a mapping")
    if "power" in data:
        return text
    data["power"] = dict(BENCH_POWER)
    return "# Generated: the policy plus the meltguard-power bench's power section.\n" + (
        yaml.safe_dump(data, sort_keys=False))


def policy_for(strategy: str, loaded: LoadedPolicy) -> LoadedPolicy:
    """The policy a strategy runs: meltguard-power's gets the power section."""
    if strategy != POWER_STRATEGY:
        return loaded
    return load_policy_text(with_power(loaded.text), f"{loaded.path} + power section")
