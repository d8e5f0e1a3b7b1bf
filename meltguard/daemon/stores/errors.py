"""The one failure a quota store raises; the caller applies the policy's `on_store_error`."""

from __future__ import annotations


class QuotaStoreError(Exception):
    """A store call failed or ran past its deadline: the quota's state is unknown.

    `store` is the store's name, the `store` label of `quota_store_errors_total`.
    `maybe_applied` is False only when the call certainly changed nothing (a transaction rolled
    back, a server that could not be reached): a consume that failed so need not be voided.
    """

    def __init__(self, store: str, message: str, *, maybe_applied: bool = True) -> None:
        super().__init__(f"{store} quota store: {message}")
        self.store = store
        self.message = message
        self.maybe_applied = maybe_applied
