"""The one failure a quota store raises; the caller applies the policy's `on_store_error`."""

from __future__ import annotations


class QuotaStoreError(Exception):
    """A store call failed or ran past its deadline: the quota's state is unknown.

    `store` is the store's name, the `store` label of `quota_store_errors_total`.
    """

    def __init__(self, store: str, message: str) -> None:
        super().__init__(f"{store} quota store: {message}")
        self.store = store
        self.message = message
