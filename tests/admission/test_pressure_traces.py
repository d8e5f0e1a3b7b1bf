"""Real recordings (`shared/traces/`) replayed through every shipped policy: every level entered
has a reason the recording justifies, and every early entry the model predicts comes true.

The controller's reason to exist is to act on real cards and only when it must; the traces
are what real cards did (see shared/traces/README.md); every one is read with the daemon's own
replay reader.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from meltguard.admission.policy import Level, Policy
from meltguard.admission.pressure import PressureState, assess
from meltguard.admission.thermal import ThermalState
from meltguard.daemon.policy_file import load_policy_file
from meltguard.values import GpuSample
from tests.real_traces import load_frames, trace_files, traces_dir

ROOT = Path(__file__).resolve().parents[2]
POLICIES = sorted([*ROOT.glob("policies/*.yaml"), *ROOT.glob("policies/examples/*.yaml"),
                   ROOT / "meltguard" / "policies" / "default.yaml"])
# NVML reports whole degrees: a prediction is held to what the recording did within one.
ROUNDING_C = 1.0
REAL_RECORDINGS = ("a100_nvsmi_noindex.csv", "h100x8_nvml_collector.csv",
                   "rtx4060laptop_gpuburn_pynvml.csv", "v100s_nvsmi_query.csv")

pytestmark = pytest.mark.skipif(traces_dir() is None,
                                reason="shared/traces/ not found (set MELTGUARD_TRACES)")

Frame = tuple[float, tuple[GpuSample, ...]]  # (seconds from the start, every GPU then)
_FRAMES: dict[Path, list[Frame]] = {}


def frames_of(path: Path) -> list[Frame]:
    if path not in _FRAMES:
        _FRAMES[path] = [(f.offset, f.samples) for f in load_frames(path)]
    return _FRAMES[path]


def series(frames: list[Frame], index: int) -> list[tuple[float, GpuSample]]:
    return [(t, s) for t, samples in frames for s in samples if s.index == index]


def reached(points: list[tuple[float, GpuSample]], after: float, within: float,
            line: float) -> bool | None:
    """Whether the recording reached `line` (less one rounding step) in (after, after+within];
    None when the recording ends before that window does."""
    if points[-1][0] < after + within:
        return None
    return any(s.temperature_c is not None and s.temperature_c >= line - ROUNDING_C
               for t, s in points if after < t <= after + within)


def justified(signal: str, sample: GpuSample | None, policy: Policy,
              points: list[tuple[float, GpuSample]], now: float) -> bool:
    """An oracle independent of pressure.py: does the recording hold this enter signal?"""
    name, _, threshold_text = signal.partition(">=")
    if signal.startswith("lookahead:"):
        line_signal = signal.removeprefix("lookahead:")
        if line_signal.startswith("temperature_c>="):
            line = float(line_signal.split(">=")[1])
        else:
            headroom = float(line_signal.split("<=")[1])
            if sample is None or sample.slowdown_c is None:
                return False
            line = sample.slowdown_c - headroom
        lookahead = policy.pressure.lookahead or 0.0
        return reached(points, now, lookahead, line) is True
    if sample is None:
        return signal in ("telemetry_missing", "telemetry_stale")
    values = {"temperature_c": sample.temperature_c, "memory_ratio": sample.memory_ratio,
              "utilization": sample.utilization, "power_ratio": sample.power_ratio}
    if name in values and threshold_text:
        value = values[name]
        return value is not None and value >= float(threshold_text)
    if signal.startswith("below_slowdown_c<="):
        headroom = float(signal.split("<=")[1])
        return (sample.temperature_c is not None and sample.slowdown_c is not None
                and sample.temperature_c >= sample.slowdown_c - headroom)
    if signal.startswith("throttle:"):
        return set(signal.removeprefix("throttle:").split(",")) <= sample.throttle
    if signal == "gpu_lost":
        return sample.lost
    return False


@pytest.mark.parametrize("policy_path", POLICIES, ids=lambda p: p.name)
@pytest.mark.parametrize("trace", trace_files(), ids=lambda p: p.name)
def test_every_level_entered_is_justified_by_the_recording(trace: Path,
                                                           policy_path: Path) -> None:
    frames = frames_of(trace)
    policy = load_policy_file(policy_path).policy
    indexes = sorted({s.index for _, samples in frames for s in samples})
    per_gpu = {i: series(frames, i) for i in indexes}
    state: PressureState | None = None
    unjustified = []
    for now, samples in frames:
        stamped = [replace(s, taken_at=now) for s in samples]
        before = {g.index: g.level for g in state.gpus} if state is not None else {}
        state = assess(stamped, state, policy, now)
        for g in state.gpus:
            if g.level <= before.get(g.index, Level.NORMAL):
                continue
            sample = next((s for s in stamped if s.index == g.index), None)
            for signal in g.signals:
                if not justified(signal, sample, policy, per_gpu[g.index], now):
                    unjustified.append((now, g.index, g.level.label, signal, g.temperature_c))
    assert unjustified == []


@pytest.mark.parametrize("trace", trace_files(), ids=lambda p: p.name)
def test_every_crossing_the_model_predicts_comes_true(trace: Path) -> None:
    """For every line from 30 to 98 °C: whenever the fitted model says the card will reach it
    within 30 s, the recording does (within one whole degree), wherever it lasts that long."""
    frames = frames_of(trace)
    horizon = 30.0
    wrong = []
    checked = 0
    for index in sorted({s.index for _, samples in frames for s in samples}):
        points = series(frames, index)
        model: ThermalState | None = None
        for now, sample in points:
            if sample.temperature_c is None:
                continue
            stamped = replace(sample, taken_at=now)
            model = (model or ThermalState.start(1.0, stamped)).observe(stamped)
            for line in range(30, 100, 2):
                eta = model.crossing_in_s(line)
                if eta is None or eta > horizon:
                    continue
                came = reached(points, now, horizon, line)
                if came is None:
                    continue
                checked += 1
                if not came:
                    wrong.append((index, now, sample.temperature_c, line, round(eta, 1)))
    assert wrong == []
    if trace.name == "h100x8_nvml_collector.csv":
        assert checked > 0  # the heating curves do get predictions, and they hold


def test_the_real_recordings_are_all_covered() -> None:
    names = {p.name for p in trace_files()}
    for name in REAL_RECORDINGS:
        if name in names:
            path = next(p for p in trace_files() if p.name == name)
            assert load_frames(path), f"{name} cannot be read"
