from __future__ import annotations

import contextlib
import hashlib
from typing import Any

import pytest

from meltguard.admission import auth
from meltguard.admission.auth import (
    INCORRECT_KEY_MESSAGE,
    MISSING_KEY_MESSAGE,
    Caller,
    KeyRing,
)
from meltguard.admission.policy import Policy, parse_policy
from meltguard.errors import ErrorCode, ServiceError

KEYS = {"sk-alice": ("alice", "pro"), "sk-bob": ("bob", "plus"), "sk-carol": ("carol", "free"),
        "sk-dave": ("dave", "free"), "sk-erin": ("erin", "plus")}


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def make_policy(anonymous: str | None = "free", keys: dict[str, tuple[str, str]] = KEYS,
                admin: str | None = None) -> Policy:
    data: dict[str, Any] = {
        "version": 1,
        "anonymous_tier": anonymous,
        "tiers": {"free": {"priority": 0}, "plus": {"priority": 1}, "pro": {"priority": 2}},
        "api_keys": [{"key_sha256": sha(k), "tenant": t, "tier": tier}
                     for k, (t, tier) in keys.items()],
    }
    if admin is not None:
        data["admin_key_sha256"] = sha(admin)
    return parse_policy(data)


def test_a_known_key_maps_to_its_tenant_and_tier() -> None:
    ring = KeyRing(make_policy())
    assert ring.authenticate("Bearer sk-alice", "10.0.0.1") == Caller("alice", "pro", False)
    assert ring.authenticate("Bearer sk-bob", "10.0.0.1") == Caller("bob", "plus", False)


def test_scheme_is_case_insensitive_and_whitespace_tolerated() -> None:
    ring = KeyRing(make_policy())
    assert ring.authenticate("bearer sk-alice", "x").tenant == "alice"
    assert ring.authenticate("  BEARER   sk-alice  ", "x").tenant == "alice"


def test_missing_header_is_anonymous_when_the_policy_allows() -> None:
    caller = KeyRing(make_policy(anonymous="free")).authenticate(None, "192.0.2.7")
    assert caller == Caller("anon:192.0.2.7", "free", True)


def test_missing_header_is_401_without_an_anonymous_tier() -> None:
    with pytest.raises(ServiceError) as info:
        KeyRing(make_policy(anonymous=None)).authenticate(None, "192.0.2.7")
    assert info.value.code == ErrorCode.INVALID_API_KEY
    assert info.value.message == MISSING_KEY_MESSAGE


@pytest.mark.parametrize("header", [
    "Bearer sk-unknown", "Basic c2stYWxpY2U=", "Bearer", "Bearer ", "", "sk-alice",
    "Bearer sk-alice extra", "Token sk-alice", "Bearer sk-alicE",
])
@pytest.mark.parametrize("anonymous", ["free", None])
def test_unknown_and_malformed_get_the_same_401(header: str, anonymous: str | None) -> None:
    with pytest.raises(ServiceError) as info:
        KeyRing(make_policy(anonymous=anonymous)).authenticate(header, "x")
    err = info.value
    assert err.code == ErrorCode.INVALID_API_KEY
    assert err.message == INCORRECT_KEY_MESSAGE
    assert err.param is None and err.retry_after is None
    assert "sk-" not in err.message  # never echo the key


def _count_compares(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, bytes]]:
    """Every constant-time compare the key ring makes from now on, in order."""
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    return calls


@pytest.mark.parametrize("header", ["Bearer sk-alice", "Bearer sk-erin", "Bearer nope", "Basic x",
                                    "garbage"])
def test_every_key_hash_is_compared(monkeypatch: pytest.MonkeyPatch, header: str) -> None:
    ring = KeyRing(make_policy())
    calls = _count_compares(monkeypatch)
    with contextlib.suppress(ServiceError):
        ring.authenticate(header, "x")
    # No early exit on a match, and no shortcut for a malformed header.
    assert len(calls) == len(KEYS)
    assert {b for _, b in calls} == {bytes.fromhex(sha(k)) for k in KEYS}


MANY_KEYS = {f"sk-user{i}": (f"user{i}", ("free", "plus", "pro")[i % 3])
             for i in range(auth.SCAN_MAX * 3)}


@pytest.mark.parametrize("header", ["Bearer sk-user0", "Bearer sk-user23", "Bearer nope",
                                    "Basic x", "garbage"])
def test_many_keys_cost_one_constant_time_compare(monkeypatch: pytest.MonkeyPatch,
                                                  header: str) -> None:
    ring = KeyRing(make_policy(keys=MANY_KEYS))
    calls = _count_compares(monkeypatch)
    key = header.removeprefix("Bearer ")
    try:
        caller = ring.authenticate(header, "x")
    except ServiceError as err:
        assert err.code == ErrorCode.INVALID_API_KEY and key not in MANY_KEYS
    else:
        assert (caller.tenant, caller.tier) == MANY_KEYS[key]
    # Hit or miss, well-formed or not: exactly one comparison of two full SHA-256 digests,
    # and on a miss never against a configured hash.
    assert len(calls) == 1
    presented, expected = calls[0]
    assert len(presented) == len(expected) == 32
    hashes = {bytes.fromhex(sha(k)) for k in MANY_KEYS}
    assert (expected in hashes) == (key in MANY_KEYS)


def test_many_keys_every_key_authenticates() -> None:
    ring = KeyRing(make_policy(keys=MANY_KEYS))
    for key, (tenant, tier) in MANY_KEYS.items():
        assert ring.authenticate(f"Bearer {key}", "x") == Caller(tenant, tier, False)
    with pytest.raises(ServiceError):
        ring.authenticate("Bearer sk-user0x", "x")


def test_no_keys_configured_with_anonymous_tier_ignores_the_header() -> None:
    # The openai SDK always sends some key; a keyless laptop policy must still serve it.
    ring = KeyRing(make_policy(anonymous="free", keys={}))
    assert ring.authenticate("Bearer sk-anything", "h") == Caller("anon:h", "free", True)
    assert ring.authenticate("whatever", "h").anonymous


def test_no_keys_and_no_anonymous_tier_refuses_everyone() -> None:
    ring = KeyRing(make_policy(anonymous=None, keys={}))
    with pytest.raises(ServiceError) as info:
        ring.authenticate("Bearer sk-anything", "h")
    assert info.value.message == INCORRECT_KEY_MESSAGE
    with pytest.raises(ServiceError):
        ring.authenticate(None, "h")


def test_admin_key() -> None:
    ring = KeyRing(make_policy(admin="root-secret"))
    assert ring.is_admin("Bearer root-secret")
    assert not ring.is_admin("Bearer sk-alice")
    assert not ring.is_admin("root-secret")
    assert not ring.is_admin(None)
    assert not KeyRing(make_policy()).is_admin("Bearer root-secret")


def test_a_reload_forgets_removed_keys() -> None:
    from meltguard.admission.gate import Gate
    from meltguard.admission.quota_memory import MemoryQuotaStore
    from meltguard.clock import FakeClock

    gate = Gate(make_policy(anonymous=None), MemoryQuotaStore(), FakeClock(), lambda e: None)
    assert gate.authenticate("Bearer sk-alice", "x").tenant == "alice"
    without_alice = {k: v for k, v in KEYS.items() if k != "sk-alice"}
    gate.set_policy(make_policy(anonymous=None, keys=without_alice))
    with pytest.raises(ServiceError) as refused:
        gate.authenticate("Bearer sk-alice", "x")
    assert refused.value.code == ErrorCode.INVALID_API_KEY
