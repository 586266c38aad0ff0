"""Token storage backends behind one contract (``base.TokenStore``)."""

from __future__ import annotations

from sidecar.errors import StoreError
from sidecar.store.base import StoredRow, TokenStore
from sidecar.store.memory import MemoryStore
from sidecar.store.sqlite import SQLiteStore, sqlite_path

__all__ = ["StoredRow", "TokenStore", "open_store"]


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
