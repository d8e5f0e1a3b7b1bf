"""Who is calling: `Authorization: Bearer <key>` against the SHA-256 key hashes in the policy.

Keys never live in the policy, only their hashes (`meltguard policy hash-key KEY`). A presented
key is hashed once (SHA-256) and checked against the configured hashes in time that says
nothing about them. What that has to defeat is a client timing its own requests: a comparison
that stops at the first differing byte tells it how much of a stored value it matched, and a
scan that stops at a match tells it where in the list a key sits. Hashing first already denies
it a byte-by-byte search (it cannot steer the bytes of a SHA-256), and on top of that:

- with a few keys (up to `SCAN_MAX`), the hash is compared with *every* configured hash through
  `hmac.compare_digest`, without stopping at a match: the work is the same whichever key, if
  any, matched;
- with more, a scan would grow with the key count, so the lookup is by a *tag* of the presented
  hash, BLAKE2b keyed with a secret drawn at random for each KeyRing, never by the hash
  itself: which dict slot is probed, and how many entries are compared on the way, depends on
  that secret, which the client cannot know, so it carries no information about the stored
  hashes. The full SHA-256 of the entry found (or of a random decoy, when none is) is then
  compared with `hmac.compare_digest`: one constant-time comparison of two 32-byte values on
  every path, hit or miss, for any number of keys.

What stays observable is whether the key was accepted, which the status code says anyway.
Unknown keys and malformed headers get one and the same 401, which never echoes the key.

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
import secrets
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


# Up to this many keys a full constant-time scan is cheaper than computing the keyed tag.
SCAN_MAX = 8


class KeyRing:
    """The policy's keys in the form a lookup needs; build one per policy version."""

    __slots__ = ("_admin", "_anonymous_tier", "_decoy", "_entries", "_policy", "_secret",
                 "_tagged")

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self._anonymous_tier = policy.anonymous_tier
        self._entries: tuple[tuple[bytes, Caller], ...] = tuple(
            (bytes.fromhex(key.key_sha256), Caller(key.tenant, key.tier, anonymous=False))
            for key in policy.api_keys
        )
        self._secret = secrets.token_bytes(32)
        self._tagged: dict[bytes, tuple[bytes, Caller]] | None = None
        if len(self._entries) > SCAN_MAX:
            self._tagged = {self._tag(digest): (digest, caller)
                            for digest, caller in self._entries}
        # Compared against when no tag matches, so a miss does the same work as a hit.
        self._decoy = secrets.token_bytes(32)
        admin = policy.admin_key_sha256
        self._admin = bytes.fromhex(admin) if admin is not None else None

    def _tag(self, digest: bytes) -> bytes:
        return hashlib.blake2b(digest, digest_size=16, key=self._secret).digest()

    @property
    def policy(self) -> Policy:
        return self._policy

    def authenticate(self, authorization_header: str | None, client_id: str) -> Caller:
        if authorization_header is None or (
            not self._entries and self._anonymous_tier is not None
        ):
            return self._anonymous(client_id)
        return self._check(authorization_header)

    def _check(self, authorization_header: str) -> Caller:
        key = _bearer_token(authorization_header)
        # Hash even a malformed header so both refusals cost the same work.
        digest = hashlib.sha256((key or authorization_header).encode("utf-8", "replace")).digest()
        found: Caller | None = None
        if self._tagged is None:
            for expected, caller in self._entries:
                # No early exit: every hash is compared whether or not one already matched.
                if hmac.compare_digest(digest, expected) and key is not None:
                    found = caller
        else:
            entry = self._tagged.get(self._tag(digest))
            expected, candidate = entry if entry is not None else (self._decoy, None)
            if hmac.compare_digest(digest, expected) and key is not None:
                found = candidate
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
