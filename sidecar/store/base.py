"""The token store contract. Backends hold ciphertext bytes and bookkeeping, never plaintext.

Writes of a refreshed pair are compare-and-swap on ``version``, so a writer holding a stale view
can never overwrite a newer pair. Backends translate their own exceptions into ``StoreError``.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class StoredRow:
    provider: str
    account: str
    key_id: str
    ciphertext: bytes
    expires_at: float | None
    version: int = 0
    state: str = "active"
    state_reason: str | None = None
    state_changed_at: float | None = None
    refreshed_at: float | None = None
    refresh_attempt_at: float | None = None  # a refresh was sent; its outcome is not known


class TokenStore(Protocol):
    async def get(self, provider: str, account: str) -> StoredRow | None:
        """The row, or None when the account does not exist."""

    async def upsert_many(self, rows: list[StoredRow]) -> None:
        """Insert or replace rows atomically (all or none), marking them active.

        Each row's version becomes one more than the version it replaces (1 when new).
        """

    async def compare_and_swap(self, row: StoredRow, expected_version: int) -> bool:
        """Replace the pair when the stored version is ``expected_version``; bump the version.

        Only the pair and its expiry and refresh time change; the account's state does not.

        Returns False (and writes nothing) when the row changed or vanished meanwhile.
        """

    async def record_refresh_attempt(self, provider: str, account: str, at: float | None) -> None:
        """Mark that a refresh is being sent (``at``), or that its outcome is known (None).

        Written before the provider is called, so a crash in the middle is visible after a
        restart: the provider may have rotated the refresh token without us learning it.
        """

    async def set_state(
        self, provider: str, account: str, state: str, reason: str | None, at: float
    ) -> None:
        """Record an account's state (e.g. reauthorization_required) with reason and time."""

    async def delete(self, provider: str, account: str) -> bool:
        """Remove an account; False when it did not exist."""

    async def rows(self, provider: str | None = None) -> list[StoredRow]:
        """Every row, or every row of one provider, ordered by provider then account."""

    async def count_by_state(self) -> dict[tuple[str, str], int]:
        """Number of accounts per (provider, state)."""

    def hold(self, provider: str, account: str) -> AbstractAsyncContextManager[None]:
        """Exclusive right to refresh one account, across every process sharing the store.

        Held for the whole refresh (however slow the token endpoint), released when the
        holder exits the block or dies. Waiters block until it is free, without polling.
        """

    def try_hold(self, provider: str, account: str) -> AbstractAsyncContextManager[bool]:
        """The same lock as ``hold``, taken only if that needs no wait: yields whether it was.

        Yields False at once when another holder (in any process) has it, and then holds
        nothing. When it yields True the lock is held, and released, exactly as by ``hold``.
        For work that can be left to whoever holds the lock (background refresh).
        """

    async def ping(self) -> None:
        """Raise StoreError when the store cannot be reached."""

    async def close(self) -> None: ...
