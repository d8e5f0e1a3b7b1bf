"""Policy files: every rule has a bad fixture whose exact `FILE:LINE: key: message` is pinned."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from meltguard.daemon.policy_file import (
    BUILTIN_NAME,
    LoadedPolicy,
    PolicyFileError,
    builtin_policy,
    check_summary,
    hash_key,
    load_policy_file,
    load_policy_text,
)

ROOT = Path(__file__).resolve().parents[2]
BAD = Path(__file__).parent / "fixtures" / "bad"
EXAMPLES = ROOT / "policies" / "examples"
EMPTY = "the file is empty (or only comments); a policy needs version and tiers"
THROTTLE_CHOICES = (
    "'gpu_idle', 'applications_clocks_setting', 'sw_power_cap', 'hw_slowdown', 'sync_boost', "
    "'sw_thermal', 'hw_thermal', 'hw_power_brake' or 'display_clock_setting'"
)

# fixture -> the lines after "FILE:", in order. One fixture per rule; the message is the
# contract ops read, so it is pinned whole rather than matched loosely.
EXPECTED: dict[str, list[str]] = {
    "zero_quota_window.yaml": ["7: tiers.free.quotas[0].per: Input should be greater than 0"],
    "min_share_no_room.yaml": [
        "4: tiers.free.min_share: the tiers' min_share add up to 1.1; they must leave room "
        "below 1 for priority to order"
    ],
    "min_share_out_of_range.yaml": ["6: tiers.free.min_share: Input should be less than 1"],
    "hold_without_a_line.yaml": ["7: pressure.hold: hold needs below_slowdown_c or temperature_c"],
    "default_size_over_max.yaml": [
        "7: limits.default_size: default_size 1024x1024 does not fit in max_size 512x512"
    ],
    "stale_before_sample.yaml": [
        "7: pressure.stale_after: stale_after must be longer than sample_interval, or every "
        "sample would be stale"
    ],
    "tier_named_int.yaml": ["4: tiers.int.priority: Input should be a valid integer"],
    "unknown_top_level_key.yaml": ["3: colour: unknown key"],
    "unknown_nested_key.yaml": ["6: tiers.free.max_concurency: unknown key"],
    "bad_duration.yaml": [
        "8: tiers.free.quotas[0].per: expected a duration like 500ms, 10s, 1m, 2h or 1d, "
        "got '10x'"
    ],
    "bad_size.yaml": ["6: limits.max_size: size must look like 512x512 (WIDTHxHEIGHT), got '512x'"],
    "size_not_multiple_of_8.yaml": [
        "8: actions.high.free.max_size: width and height must be multiples of 8, got '512x51'"
    ],
    "exit_not_below_enter.yaml": [
        "9: pressure.levels.elevated.exit.temperature_c: exit threshold 80.0 must sit below the "
        "enter threshold 78.0"
    ],
    "below_slowdown_exit_not_above_enter.yaml": [
        "9: pressure.levels.high.exit.below_slowdown_c: exit must leave more headroom than enter "
        "(3.0 <= 5.0)"
    ],
    "levels_out_of_order_file.yaml": [
        "6: pressure.levels: levels out of order: write them as elevated, high, critical"
    ],
    "levels_out_of_order_thresholds.yaml": [
        "8: pressure.levels.high.enter.temperature_c: levels out of order: high enters at 80.0, "
        "which is less severe than elevated's 85.0"
    ],
    "action_unknown_tier.yaml": ["9: actions.high.gold: unknown tier 'gold' (tiers: free, pro)"],
    "action_unknown_level.yaml": [
        "6: actions.severe: unknown level 'severe' (levels: elevated, high, critical)"
    ],
    "api_key_unknown_tier.yaml": ["9: api_keys[0].tier: unknown tier 'gold' (tiers: free, pro)"],
    "duplicate_key_hash.yaml": [
        "8: api_keys[1].key_sha256: duplicate key hash: api_keys[0] has the same one"
    ],
    "bad_key_hash.yaml": [
        "6: api_keys[0].key_sha256: expected 64 hex digits (meltguard policy hash-key KEY "
        "prints them)"
    ],
    "anonymous_tier_unknown.yaml": ["3: anonymous_tier: unknown tier 'guest' (tiers: free, pro)"],
    "duplicate_priority.yaml": [
        "6: tiers.pro.priority: priority 1 is already used by tier 'plus'; priorities must be "
        "unique"
    ],
    "bad_on_stale.yaml": [
        "6: pressure.on_stale: Input should be 'normal', 'elevated', 'high' or 'critical' "
        "(got 'hot')"
    ],
    "bad_overload_status.yaml": ["3: overload_status: Input should be 503 or 429 (got 500)"],
    "yaml_syntax_error.yaml": [
        "5: (yaml): syntax error: while parsing a flow mapping (line 4), expected ',' or '}', "
        "but got ':'"
    ],
    "duplicate_yaml_key.yaml": [
        "7: tiers.free.max_concurrent: duplicate key (first on line 6); YAML would silently "
        "keep only this one"
    ],
    "version_missing.yaml": ["2: version: required key is missing"],
    "unknown_level.yaml": [
        "7: pressure.levels.severe: unknown level 'severe' (levels: elevated, high, critical)"
    ],
    "exit_without_enter.yaml": [
        "9: pressure.levels.elevated.exit.memory_ratio: exit threshold without an enter "
        "threshold for memory_ratio"
    ],
    "min_limit_above_limit.yaml": ["7: concurrency.min_limit: min_limit 3 is above limit 2"],
    "bad_throttle_reason.yaml": [
        f"9: pressure.levels.high.enter.throttle[1]: Input should be {THROTTLE_CHOICES} "
        "(got 'too_hot')"
    ],
    "ratio_out_of_range.yaml": [
        "7: pressure.levels.elevated.enter.memory_ratio: Input should be less than or equal to 1"
    ],
    "no_tiers.yaml": [
        "3: tiers: Dictionary should have at least 1 item after validation, not 0"
    ],
    "not_a_mapping.yaml": ["2: (top level): a policy is a mapping with version, tiers, ..."],
    "power_ratio_out_of_range.yaml": ["7: power.high: Input should be less than or equal to 1"],
    "power_ratio_zero.yaml": ["5: power.elevated: Input should be greater than 0"],
    "power_unknown_level.yaml": [
        "6: power.normal: unknown level 'normal' (levels: elevated, high, critical; normal "
        "always restores the card's default limit)"
    ],
    "power_loosens_with_level.yaml": [
        "8: power.critical: critical allows 0.7 of the default limit, more than high's 0.6; a "
        "hotter level must not raise the limit"
    ],
    "many_issues.yaml": [
        "3: mode: Input should be 'enforce' or 'shadow' (got 'dry-run')",
        "7: tiers.free.max_queue_wait: expected a duration like 500ms, 10s, 1m, 2h or 1d, "
        "got 'soon'",
        "10: tiers.pro.quotas[0].limit: Input should be greater than 0",
        "11: limits.max_size: width and height must be multiples of 8, got '100x100'",
    ],
}


def _errors(path: Path | str) -> tuple[str, ...]:
    with pytest.raises(PolicyFileError) as caught:
        load_policy_file(path)
    return caught.value.lines


@pytest.mark.parametrize("fixture", sorted(EXPECTED))
def test_bad_fixture_reports_exact_lines(fixture: str) -> None:
    path = BAD / fixture
    assert _errors(path) == tuple(f"{path}:{line}" for line in EXPECTED[fixture])


def test_every_bad_fixture_is_pinned() -> None:
    assert sorted(p.name for p in BAD.glob("*.yaml")) == sorted(EXPECTED)


def test_error_names_the_file_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(BAD)
    assert _errors("unknown_top_level_key.yaml") == (
        "unknown_top_level_key.yaml:3: colour: unknown key",
    )


def test_duplicate_yaml_key_is_reported_with_other_issues() -> None:
    text = "version: 1\nmode: enforce\nmode: shadow\ntiers:\n  free: {priority: 0, colour: red}\n"
    with pytest.raises(PolicyFileError) as caught:
        load_policy_text(text, "p.yaml")
    assert caught.value.lines == (
        "p.yaml:3: mode: duplicate key (first on line 2); YAML would silently keep only this one",
        "p.yaml:5: tiers.free.colour: unknown key",
    )


def test_duplicate_keys_inside_lists_are_found() -> None:
    text = (
        "version: 1\ntiers:\n  free:\n    priority: 0\n    quotas:\n"
        "      - {limit: 3, per: 1d, limit: 4}\n"
    )
    with pytest.raises(PolicyFileError) as caught:
        load_policy_text(text, "p.yaml")
    assert caught.value.lines == (
        "p.yaml:6: tiers.free.quotas[0].limit: duplicate key (first on line 6); YAML would "
        "silently keep only this one",
    )


def test_missing_nested_key_points_at_its_parent() -> None:
    text = "version: 1\ntiers:\n  free:\n    max_concurrent: 2\n"
    with pytest.raises(PolicyFileError) as caught:
        load_policy_text(text, "p.yaml")
    assert caught.value.lines == ("p.yaml:3: tiers.free.priority: required key is missing",)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_bytes(b"")
    assert _errors(path) == (
        f"{path}:1: (top level): {EMPTY}",
    )


def test_comments_only_counts_as_empty() -> None:
    with pytest.raises(PolicyFileError) as caught:
        load_policy_text("# nothing here yet\n\n", "p.yaml")
    assert caught.value.lines == (
        f"p.yaml:1: (top level): {EMPTY}",
    )


def test_not_utf8_names_the_line_of_the_bad_byte(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("version: 1\n# caf\u00e9\n".encode("latin-1"))
    assert _errors(path) == (
        f"{path}:2: (top level): the file is not UTF-8 text (byte 0xe9 at offset 16)",
    )


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    assert _errors(path) == (
        f"{path}:1: (top level): cannot read the file: No such file or directory",
    )


def test_syntax_error_at_end_of_file_points_at_the_last_line() -> None:
    with pytest.raises(PolicyFileError) as caught:
        load_policy_text("version: 1\ntiers: {free: {priority: 0}\n", "p.yaml")
    (line,) = caught.value.lines
    assert line.startswith("p.yaml:2: (yaml): syntax error: ")


def test_two_documents_are_an_error() -> None:
    with pytest.raises(PolicyFileError) as caught:
        load_policy_text("version: 1\ntiers: {free: {priority: 0}}\n---\nversion: 1\n", "p.yaml")
    assert caught.value.lines == (
        "p.yaml:3: (yaml): syntax error: expected a single document in the stream (line 1), "
        "but found another document",
    )


def test_python_tags_are_refused() -> None:
    with pytest.raises(PolicyFileError) as caught:
        load_policy_text("version: !!python/object/apply:os.getcwd []\n", "p.yaml")
    (line,) = caught.value.lines
    assert line.startswith("p.yaml:1: (yaml): syntax error: ")


def test_control_character_names_its_line() -> None:
    with pytest.raises(PolicyFileError) as caught:
        load_policy_text("version: 1\ntiers:\x07\n", "p.yaml")
    assert caught.value.lines == (
        "p.yaml:2: (yaml): syntax error: control character U+0007 is not allowed in YAML",
    )


MERGED = """\
version: 1
tiers:
  free: &paid
    priority: 0
    max_concurrent: 0
  pro:
    <<: *paid
    priority: 1
"""


def test_issue_in_a_merged_anchor_points_at_the_anchor() -> None:
    with pytest.raises(PolicyFileError) as caught:
        load_policy_text(MERGED, "p.yaml")
    # An overridden merge key (pro.priority) is not a duplicate; the bad value is written once.
    assert caught.value.lines == (
        "p.yaml:5: tiers.free.max_concurrent: Input should be greater than 0",
        "p.yaml:5: tiers.pro.max_concurrent: Input should be greater than 0",
    )


def test_self_referencing_alias_is_an_error_not_a_hang() -> None:
    with pytest.raises(PolicyFileError) as caught:
        load_policy_text("version: 1\ntiers: {free: {priority: 0}}\nloop: &a [*a]\n", "p.yaml")
    assert caught.value.lines == ("p.yaml:3: loop: unknown key",)


def test_error_str_holds_every_line() -> None:
    error = PolicyFileError(("a:1: x: one", "a:2: y: two"))
    assert str(error) == "a:1: x: one\na:2: y: two"


@pytest.mark.parametrize(
    "path",
    [ROOT / "policies" / "default.yaml", ROOT / "meltguard" / "policies" / "default.yaml",
     *sorted(EXAMPLES.glob("*.yaml"))],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_shipped_policies_load_cleanly(path: Path) -> None:
    loaded = load_policy_file(path)
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.text == path.read_text(encoding="utf-8")
    assert loaded.path == str(path)


def test_the_examples_exist() -> None:
    names = {p.name for p in EXAMPLES.glob("*.yaml")}
    assert {"incident.yaml", "shadow-rollout.yaml"} <= names


def test_incident_example_is_the_incident() -> None:
    policy = load_policy_file(EXAMPLES / "incident.yaml").policy
    assert policy.mode == "enforce"
    assert policy.anonymous_tier is None
    free = policy.tiers["free"]
    assert any(q.limit == 3 and q.per == 86_400 for q in free.quotas)
    assert any(q.per <= 60 for q in free.quotas)
    # Paid tiers are served as normal until high pressure.
    for tier in ("plus", "pro"):
        assert tier not in policy.actions.get("elevated", {})
    assert policy.actions["high"]["free"].reject
    assert {k.key_sha256 for k in policy.api_keys} == {
        hash_key("demo-plus-key"), hash_key("demo-pro-key")
    }


def test_shadow_rollout_differs_from_incident_only_in_mode() -> None:
    incident = load_policy_file(EXAMPLES / "incident.yaml").policy
    shadow = load_policy_file(EXAMPLES / "shadow-rollout.yaml").policy
    assert shadow.mode == "shadow"
    assert shadow.model_copy(update={"mode": "enforce"}) == incident


def test_builtin_policy_is_the_packaged_default() -> None:
    loaded = builtin_policy()
    shipped = ROOT / "meltguard" / "policies" / "default.yaml"
    assert loaded.path == BUILTIN_NAME
    assert loaded.sha256 == hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert loaded.policy.pressure.levels.keys() == {"elevated", "high", "critical"}


def test_load_policy_text_hashes_the_utf8_bytes() -> None:
    text = "version: 1\ntiers: {free: {priority: 0}}\n"
    loaded = load_policy_text(text, "inline")
    assert isinstance(loaded, LoadedPolicy)
    assert loaded.sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert loaded.path == "inline"


def test_check_summary() -> None:
    loaded = load_policy_file(EXAMPLES / "incident.yaml")
    assert check_summary(loaded) == (
        f"{EXAMPLES / 'incident.yaml'}: ok (mode enforce, 3 tiers, 2 keys, "
        f"levels elevated/high/critical, sha256 {loaded.sha256[:8]})"
    )


def test_check_summary_singular_and_no_levels() -> None:
    loaded = load_policy_text("version: 1\nmode: shadow\ntiers: {free: {priority: 0}}\n", "x.yaml")
    assert check_summary(loaded) == (
        f"x.yaml: ok (mode shadow, 1 tier, 0 keys, levels none, sha256 {loaded.sha256[:8]})"
    )


def test_hash_key() -> None:
    assert hash_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert hash_key("demo-pro-key") == hashlib.sha256(b"demo-pro-key").hexdigest()
