"""Who is calling: `Authorization: Bearer <key>` against the SHA-256 key hashes in the policy.

Keys never live in the policy, only their hashes (`meltguard policy hash-key KEY`). A presented
key is hashed once and compared with *every* configured hash through `hmac.compare_digest`,
without stopping at a match, so the time taken says nothing about which hash (or how much of
it) matched. Unknown keys and malformed headers get one and the same 401, which never echoes
the key.

A request without the header is served on `policy.anonymous_tier` as tenant
`anon:<client_id>` (the daemon passes the peer address), or refused when that is null.
One exception: a policy that configures no keys at all has nothing to check a key against,
so a header is ignored and the caller is anonymous. The official `openai` SDK refuses to
start without some api_key, so without this rule the built-in laptop policy (anonymous
tier, no keys) would answer every SDK request with 401 (vLLM and TGI behave the same way
when started without keys).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from meltguard.admission.policy import Policy
from meltguard.errors import ErrorCode, ServiceError

MISSING_KEY_MESSAGE = (
    "You didn't provide an API key. You need to provide your API key in an Authorization "
    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
INCORRECT_KEY_MESSAGE = (
    "Incorrect API key provided. Ask the operator of this service for a valid key and send it "
    "as Authorization: Bearer YOUR_KEY."
)


@dataclass(frozen=True, slots=True)
class Caller:
    tenant: str
    tier: str
    anonymous: bool


class KeyRing:
    """The policy's keys in the form a lookup needs; build one per policy version."""

    __slots__ = ("_admin", "_anonymous_tier", "_entries", "_policy")

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._anonymous_tier = policy.anonymous_tier
        self._entries: tuple[tuple[bytes, Caller], ...] = tuple(
            (bytes.fromhex(key.key_sha256), Caller(key.tenant, key.tier, anonymous=False))
            for key in policy.api_keys
        )
        admin = policy.admin_key_sha256
        self._admin = bytes.fromhex(admin) if admin is not None else None

    @property
    def policy(self) -> Policy:
        return self._policy

    def authenticate(self, authorization_header: str | None, client_id: str) -> Caller:
        if authorization_header is None or (
            not self._entries and self._anonymous_tier is not None
        ):
            return self._anonymous(client_id)
        key = _bearer_token(authorization_header)
        # Hash even a malformed header so both refusals cost the same work.
        digest = hashlib.sha256((key or authorization_header).encode("utf-8", "replace")).digest()
        found: Caller | None = None
        for expected, caller in self._entries:
            # No early exit: every hash is compared whether or not one already matched.
            if hmac.compare_digest(digest, expected) and key is not None:
                found = caller
        if found is None:
            raise ServiceError(ErrorCode.INVALID_API_KEY, INCORRECT_KEY_MESSAGE)
        return found

    def is_admin(self, authorization_header: str | None) -> bool:
        """Whether the header is `Bearer <admin key>`; false when the policy names none."""
        if self._admin is None or authorization_header is None:
            return False
        key = _bearer_token(authorization_header)
        if key is None:
            return False
        digest = hashlib.sha256(key.encode("utf-8", "replace")).digest()
        return hmac.compare_digest(digest, self._admin)

    def _anonymous(self, client_id: str) -> Caller:
        if self._anonymous_tier is None:
            raise ServiceError(ErrorCode.INVALID_API_KEY, MISSING_KEY_MESSAGE)
        return Caller(f"anon:{client_id}", self._anonymous_tier, anonymous=True)


def _bearer_token(header: str) -> str | None:
    """The key of a well-formed `Bearer <key>` header (scheme case-insensitive, RFC 9110)."""
    parts = header.strip().split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    return parts[1]


_last_ring: KeyRing | None = None


def authenticate(policy: Policy, authorization_header: str | None, client_id: str) -> Caller:
    """Module-level convenience; reuses the KeyRing while the same policy object is passed."""
    global _last_ring
    ring = _last_ring
    if ring is None or ring.policy is not policy:
        ring = KeyRing(policy)
        _last_ring = ring
    return ring.authenticate(authorization_header, client_id)
