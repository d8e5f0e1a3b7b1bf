"""The `meltguard-power` strategy: the real gate under a policy with a `power` section.

The gate is the `meltguard` strategy's; the policy is policies/bench-power.yaml, the bench
policy plus the power section and an `elevated` line low enough that a card held at the hold
line has the lever on (the file says why). Its ratios were tuned with `meltguard simulate
--strategy meltguard-power` against the simulated card, whose DVFS curve is the published one
in meltguard/daemon/telemetry/dvfs.py, never against the baselines.
"""

from __future__ import annotations

from pathlib import Path

from meltguard.daemon.policy_file import LoadedPolicy

POWER_STRATEGY = "meltguard-power"
DEFAULT_POWER_POLICY = Path(__file__).resolve().parents[2] / "policies" / "bench-power.yaml"


def policy_for(strategy: str, loaded: LoadedPolicy) -> LoadedPolicy:
    """The policy `strategy` runs. Raises ValueError when meltguard-power would run without a
    power section: it would be the meltguard strategy under another name."""
    if strategy == POWER_STRATEGY and not loaded.policy.power:
        raise ValueError(f"strategy {POWER_STRATEGY} needs a policy with a `power` section, "
                         f"and {loaded.path} has none (see {DEFAULT_POWER_POLICY.name})")
    return loaded
