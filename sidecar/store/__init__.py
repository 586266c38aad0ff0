"""Token storage backends behind one contract (``base.TokenStore``)."""

from __future__ import annotations

import asyncio
import logging

from sidecar.errors import StoreError, StoreUnreachable
from sidecar.store.base import StoredRow, TokenStore
from sidecar.store.memory import MemoryStore
from sidecar.store.sqlite import SQLiteStore, sqlite_path

__all__ = ["StoredRow", "TokenStore", "open_store", "open_store_patiently"]

log = logging.getLogger(__name__)
FIRST_RETRY_SECONDS, MAX_RETRY_SECONDS = 0.5, 5.0


async def open_store(url: str) -> TokenStore:
    """Open the backend a ``[store] url`` names."""
    if url.startswith("sqlite://"):
        return await SQLiteStore.open(sqlite_path(url))
    if url.startswith(("postgresql://", "postgres://")):
        # Imported on demand: asyncpg costs ~15 MiB of RSS that SQLite users never need.
        from sidecar.store.postgres import PostgresStore

        return await PostgresStore.open(url)
    if url.startswith("memory://"):
        return MemoryStore()
    raise StoreError(f"unsupported store URL scheme: {url.split(':', 1)[0]}")


async def open_store_patiently(url: str, retry_seconds: float) -> TokenStore:
    """``open_store``, retrying an unreachable store with backoff for ``retry_seconds``.

    In a pod, the database being briefly away at start is normal; a store that answers but
    refuses (schema, permissions) is not retried. After the time is up the last error is
    raised as it is, so the operator sees the same message as without retries.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + retry_seconds
    delay = FIRST_RETRY_SECONDS
    while True:
        try:
            return await open_store(url)
        except StoreUnreachable as exc:
            left = deadline - loop.time()
            if left <= 0:
                raise
            wait = min(delay, left)
            log.warning(
                "store_unreachable",
                extra={"error": str(exc), "retry_in_seconds": wait, "give_up_in_seconds": left},
            )
            await asyncio.sleep(wait)
            delay = min(delay * 2, MAX_RETRY_SECONDS)
