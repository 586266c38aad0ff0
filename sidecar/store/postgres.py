"""PostgreSQL store (asyncpg): one set of accounts shared by every replica.

Same rows as SQLite (ciphertext and bookkeeping, never plaintext), in ``sidecar_credentials``
of the schema the connection's ``search_path`` names (``?search_path=...`` in the URL).

Refresh locks are session-level advisory locks, each held on a connection of its own for the
whole refresh, so a lock lasts as long as a slow token endpoint takes (no expiry to outrun) and
vanishes with the session when its holder dies (the server drops a dead client's connection).
A waiter blocks inside ``pg_advisory_lock`` and the server wakes it the moment the holder
unlocks: no polling, and no LISTEN/NOTIFY needed, because a waiter rereads the row as soon as
it holds the lock. ``try_hold`` takes the same key with ``pg_try_advisory_lock``, which answers
at once, and holds it the same way. Locks come from their own pool so holders, which read and
write through the query pool meanwhile, can never exhaust it. Session locks need a direct
connection (or a pooler in session mode), not a transaction-mode pooler.

Migrations run at start inside one transaction under ``pg_advisory_xact_lock``, so replicas
starting together apply each migration once; ``sidecar_schema`` records the version.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped]

from sidecar.errors import StoreError, StoreUnreachable
from sidecar.store.base import StoredRow

log = logging.getLogger(__name__)

# Each entry upgrades the schema by one version; never edit one that has shipped.
# COLLATE "C": rows() orders by code point, as SQLite and the memory store do.
MIGRATIONS = (
    """
    CREATE TABLE sidecar_credentials (
        provider text COLLATE "C" NOT NULL,
        account text COLLATE "C" NOT NULL,
        key_id text NOT NULL,
        ciphertext bytea NOT NULL,
        expires_at double precision,
        version bigint NOT NULL,
        state text NOT NULL DEFAULT 'active',
        state_reason text,
        state_changed_at double precision,
        refreshed_at double precision,
        PRIMARY KEY (provider, account)
    );
    CREATE INDEX sidecar_credentials_expiry ON sidecar_credentials (provider, expires_at);
    """,
    "ALTER TABLE sidecar_credentials ADD COLUMN refresh_attempt_at double precision",
)
SCHEMA_VERSION = len(MIGRATIONS)
SCHEMA_TABLE = """
    CREATE TABLE IF NOT EXISTS sidecar_schema (
        singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
        version integer NOT NULL
    )
"""
COLUMNS = (
    "provider, account, key_id, ciphertext, expires_at, version, state, state_reason, "
    "state_changed_at, refreshed_at, refresh_attempt_at"
)
# Everything asyncpg raises for a failed query or connection; CancelledError passes through.
# InternalClientError: e.g. a query on a connection the server has just dropped.
_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    OSError,
    TimeoutError,
)

# Connection failures that may pass: refused, timed out, dropped, "the database system is
# starting up" (57P03) or out of connection slots. A wrong password or database does not.
_UNREACHABLE = (
    OSError,
    TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.exceptions.PostgresConnectionError,
)


class PostgresStore:
    def __init__(self, pool: Any, locks: Any, scope: str) -> None:
        self._pool = pool  # short queries
        self._locks = locks  # one connection per held refresh lock
        self._scope = scope  # the schema: replicas of other deployments never block ours

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        pool_size: int = 10,
        lock_pool_size: int = 10,
        connect_timeout: float = 10.0,
        command_timeout: float = 30.0,
    ) -> PostgresStore:
        where = redact(url)
        with _translate(f"connecting to {where}", connecting=True):
            pool = await asyncpg.create_pool(
                url,
                min_size=1,
                max_size=pool_size,
                timeout=connect_timeout,
                command_timeout=command_timeout,
            )
        # No command timeout here: a waiter blocks in pg_advisory_lock for as long as the
        # holder's refresh takes.
        locks = asyncpg.create_pool(
            url, min_size=0, max_size=lock_pool_size, timeout=connect_timeout
        )
        try:
            with _translate(f"preparing {where}", connecting=True):
                await locks
            with _translate(f"preparing {where}"):
                scope = await _migrate(pool)
        except BaseException:
            await _close_pool(pool)
            await _close_pool(locks)
            raise
        return cls(pool, locks, scope)

    async def get(self, provider: str, account: str) -> StoredRow | None:
        with _translate("read"):
            row = await self._pool.fetchrow(
                f"SELECT {COLUMNS} FROM sidecar_credentials WHERE provider = $1 AND account = $2",
                provider,
                account,
            )
        return None if row is None else StoredRow(*row)

    async def upsert_many(self, rows: list[StoredRow]) -> None:
        params = [
            (r.provider, r.account, r.key_id, r.ciphertext, r.expires_at, r.refreshed_at)
            for r in rows
        ]
        with _translate("write"):
            async with self._pool.acquire() as conn, conn.transaction():
                await conn.executemany(
                    "INSERT INTO sidecar_credentials AS c (provider, account, key_id, ciphertext, "
                    "expires_at, refreshed_at, version) VALUES ($1, $2, $3, $4, $5, $6, 1) "
                    "ON CONFLICT (provider, account) DO UPDATE SET key_id = excluded.key_id, "
                    "ciphertext = excluded.ciphertext, expires_at = excluded.expires_at, "
                    "refreshed_at = excluded.refreshed_at, version = c.version + 1, "
                    "state = 'active', state_reason = NULL, state_changed_at = NULL, "
                    "refresh_attempt_at = NULL",
                    params,
                )

    async def compare_and_swap(self, row: StoredRow, expected_version: int) -> bool:
        with _translate("write"):
            status = await self._pool.execute(
                "UPDATE sidecar_credentials SET key_id = $1, ciphertext = $2, expires_at = $3, "
                "refreshed_at = $4, refresh_attempt_at = $8, version = version + 1 "
                "WHERE provider = $5 AND account = $6 AND version = $7",
                row.key_id,
                row.ciphertext,
                row.expires_at,
                row.refreshed_at,
                row.provider,
                row.account,
                expected_version,
                row.refresh_attempt_at,
            )
        return bool(status == "UPDATE 1")

    async def record_refresh_attempt(self, provider: str, account: str, at: float | None) -> None:
        with _translate("write"):
            await self._pool.execute(
                "UPDATE sidecar_credentials SET refresh_attempt_at = $1 "
                "WHERE provider = $2 AND account = $3",
                at,
                provider,
                account,
            )

    async def set_state(
        self, provider: str, account: str, state: str, reason: str | None, at: float
    ) -> None:
        with _translate("write"):
            await self._pool.execute(
                "UPDATE sidecar_credentials SET state = $1, state_reason = $2, "
                "state_changed_at = $3 WHERE provider = $4 AND account = $5",
                state,
                reason,
                at,
                provider,
                account,
            )

    async def delete(self, provider: str, account: str) -> bool:
        with _translate("write"):
            status = await self._pool.execute(
                "DELETE FROM sidecar_credentials WHERE provider = $1 AND account = $2",
                provider,
                account,
            )
        return bool(status == "DELETE 1")

    async def rows(self, provider: str | None = None) -> list[StoredRow]:
        with _translate("read"):
            found = await self._pool.fetch(
                f"SELECT {COLUMNS} FROM sidecar_credentials "
                "WHERE $1::text IS NULL OR provider = $1 ORDER BY provider, account",
                provider,
            )
        return [StoredRow(*r) for r in found]

    async def count_by_state(self) -> dict[tuple[str, str], int]:
        with _translate("read"):
            found = await self._pool.fetch(
                "SELECT provider, state, count(*) FROM sidecar_credentials GROUP BY provider, state"
            )
        return {(p, s): int(n) for p, s, n in found}

    @asynccontextmanager
    async def hold(self, provider: str, account: str) -> AsyncIterator[None]:
        async with self._locked(provider, account, wait=True):
            yield

    @asynccontextmanager
    async def try_hold(self, provider: str, account: str) -> AsyncIterator[bool]:
        async with self._locked(provider, account, wait=False) as held:
            yield held

    @asynccontextmanager
    async def _locked(self, provider: str, account: str, wait: bool) -> AsyncIterator[bool]:
        """The account's advisory lock: waiting for it, or only if it is free now."""
        key = lock_key("refresh", self._scope, provider, account)
        started = time.monotonic()
        conn = await self._lock(key, wait)
        who = {"provider": provider, "account": account}
        if conn is None:
            log.debug("refresh_lock_busy", extra=who)
            yield False
            return
        acquired = time.monotonic()
        log.debug(
            "refresh_lock_acquired",
            extra={**who, "waited_seconds": acquired - started, "blocking": wait},
        )
        try:
            yield True
        finally:
            await self._unlock(conn, key)
            log.debug(
                "refresh_lock_released",
                extra={**who, "held_seconds": time.monotonic() - acquired},
            )

    async def _lock(self, key: int, wait: bool) -> Any | None:
        """A lock connection holding ``key``; None when ``wait`` is False and it is taken.

        The wait for a connection of the lock pool is this process's own: another replica's
        lock never makes ``pg_try_advisory_lock`` wait.
        """
        with _translate("taking a refresh lock"):
            conn = await self._locks.acquire()
        try:
            with _translate("taking a refresh lock"):
                if wait:
                    await conn.execute("SELECT pg_advisory_lock($1)", key)
                    got = True
                else:
                    got = await conn.fetchval("SELECT pg_try_advisory_lock($1)", key)
        except BaseException:
            # Also when cancelled: the pool's reset runs pg_advisory_unlock_all(), so a lock
            # granted just as we gave up is not kept.
            await self._release(conn)
            raise
        if not got:
            await self._release(conn)
            return None
        return conn

    async def _unlock(self, conn: Any, key: int) -> None:
        try:
            unlocked = await conn.fetchval("SELECT pg_advisory_unlock($1)", key)
        except _ERRORS as exc:
            unlocked, reason = False, str(exc)
        else:
            reason = "the session no longer held it"
        if not unlocked:
            # The lock's session died mid-refresh (the server freed the lock then); the
            # compare-and-swap on the row's version still kept any write consistent.
            log.warning("refresh_lock_lost", extra={"reason": reason})
        await self._release(conn)

    async def _release(self, conn: Any) -> None:
        with contextlib.suppress(*_ERRORS):  # a failed reset terminates the connection
            await self._locks.release(conn)

    async def ping(self) -> None:
        with _translate("ping"):
            await self._pool.fetchval("SELECT 1")

    async def close(self) -> None:
        await _close_pool(self._locks)
        await _close_pool(self._pool)


async def _migrate(pool: Any) -> str:
    """Bring the schema up to date; return the schema's name (it scopes the lock keys)."""
    async with pool.acquire() as conn, conn.transaction():
        scope = await conn.fetchval("SELECT current_schema()")
        if scope is None:
            raise StoreError("no schema to create tables in: check the search_path")
        await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key("migrate", scope))
        await conn.execute(SCHEMA_TABLE)
        current = await conn.fetchval("SELECT version FROM sidecar_schema") or 0
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"database schema version {current} is newer than this "
                f"release understands ({SCHEMA_VERSION}); upgrade the sidecar"
            )
        for script in MIGRATIONS[current:]:
            await conn.execute(script)
        await conn.execute(
            "INSERT INTO sidecar_schema (version) VALUES ($1) "
            "ON CONFLICT (singleton) DO UPDATE SET version = excluded.version",
            SCHEMA_VERSION,
        )
    return str(scope)


async def _close_pool(pool: Any, grace: float = 10.0) -> None:
    try:
        await asyncio.wait_for(pool.close(), grace)
    except _ERRORS:
        pool.terminate()


def lock_key(*parts: str) -> int:
    """A stable signed 64-bit advisory lock key for ``parts``, namespaced to the sidecar."""
    text = "\0".join(("oauth-sidecar", *parts)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big", signed=True)


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username}:***@{netloc}").geturl()


@contextlib.contextmanager
def _translate(what: str, connecting: bool = False) -> Iterator[None]:
    """asyncpg's exceptions stop here; callers see StoreError. While ``connecting``, a server
    that cannot be reached (or is still starting) is StoreUnreachable: worth trying again."""
    try:
        yield
    except _ERRORS as exc:
        kind = StoreUnreachable if connecting and isinstance(exc, _UNREACHABLE) else StoreError
        raise kind(f"PostgreSQL {what} failed: {exc}") from exc
