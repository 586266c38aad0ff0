"""An in-memory store: for tests and for throwaway runs (``memory://``). Nothing survives exit."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from sidecar.errors import StoreError
from sidecar.store.base import StoredRow


class MemoryStore:
    def __init__(self) -> None:
        self._rows: dict[tuple[str, str], StoredRow] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def get(self, provider: str, account: str) -> StoredRow | None:
        return self._rows.get((provider, account))

    async def upsert_many(self, rows: list[StoredRow]) -> None:
        for row in rows:  # check all first: a batch is written whole or not at all
            if not isinstance(row.ciphertext, bytes) or not isinstance(row.key_id, str):
                raise StoreError(f"row for {row.provider}/{row.account} has no ciphertext")
        for row in rows:
            old = self._rows.get((row.provider, row.account))
            self._rows[(row.provider, row.account)] = dataclasses.replace(
                row,
                version=old.version + 1 if old else 1,
                state="active",
                state_reason=None,
                state_changed_at=None,
                refresh_attempt_at=None,
            )

    async def compare_and_swap(self, row: StoredRow, expected_version: int) -> bool:
        old = self._rows.get((row.provider, row.account))
        if old is None or old.version != expected_version:
            return False
        self._rows[(row.provider, row.account)] = dataclasses.replace(
            old,
            key_id=row.key_id,
            ciphertext=row.ciphertext,
            expires_at=row.expires_at,
            refreshed_at=row.refreshed_at,
            refresh_attempt_at=row.refresh_attempt_at,
            version=expected_version + 1,
        )
        return True

    async def record_refresh_attempt(self, provider: str, account: str, at: float | None) -> None:
        old = self._rows.get((provider, account))
        if old is not None:
            self._rows[(provider, account)] = dataclasses.replace(old, refresh_attempt_at=at)

    async def set_state(
        self, provider: str, account: str, state: str, reason: str | None, at: float
    ) -> None:
        old = self._rows.get((provider, account))
        if old is not None:
            self._rows[(provider, account)] = dataclasses.replace(
                old, state=state, state_reason=reason, state_changed_at=at
            )

    async def delete(self, provider: str, account: str) -> bool:
        return self._rows.pop((provider, account), None) is not None

    async def rows(self, provider: str | None = None) -> list[StoredRow]:
        return [r for _, r in sorted(self._rows.items()) if provider in (None, r.provider)]

    async def count_by_state(self) -> dict[tuple[str, str], int]:
        return dict(Counter((r.provider, r.state) for r in self._rows.values()))

    def hold(self, provider: str, account: str) -> AbstractAsyncContextManager[None]:
        # Nothing else can share this store, so an asyncio lock per account is the whole story.
        return self._locks.setdefault((provider, account), asyncio.Lock())

    @asynccontextmanager
    async def try_hold(self, provider: str, account: str) -> AsyncIterator[bool]:
        lock = self._locks.setdefault((provider, account), asyncio.Lock())
        if lock.locked():
            yield False
            return
        try:
            # Unlocked, but a waiter that was just woken may be about to take it: then the
            # acquire would queue, and the zero timeout withdraws it instead of waiting.
            async with asyncio.timeout(0):
                await lock.acquire()
        except TimeoutError:
            yield False
            return
        try:
            yield True
        finally:
            lock.release()

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
