"""SQLite store (aiosqlite): the embedded default.

WAL mode so readers never block the writer; a busy timeout so several sidecar processes can
share one file; ``PRAGMA user_version`` numbers the schema so later releases can migrate it.
One connection serves the process; an asyncio lock lets one statement or transaction at a
time use it, and every read runs to completion at once, so no read pins an old snapshot.

Refresh locks for processes sharing the file are ``flock(2)`` locks on one small file per
account in a directory beside the database (``tokens.db.locks/``). flock locks belong to an
open file description, so two holds in one process exclude each other just as two processes
do (fcntl record locks would not, and closing any descriptor would drop them all), and the
kernel releases them when the holder dies. The blocking ``flock`` call runs in a daemon thread
of its own: it holds no executor worker and never delays interpreter exit; a waiter that is
cancelled hands the descriptor to that thread, which closes it (freeing the lock) if the lock
comes after all. ``try_hold`` flocks the same file with ``LOCK_NB``, which never waits, so it
runs on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import fcntl
import hashlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from sidecar.errors import StoreError
from sidecar.store.base import StoredRow

log = logging.getLogger(__name__)

# Each entry upgrades the schema by one version; never edit one that has shipped.
MIGRATIONS = (
    """
    CREATE TABLE credentials (
        provider TEXT NOT NULL,
        account TEXT NOT NULL,
        key_id TEXT NOT NULL,
        ciphertext BLOB NOT NULL,
        expires_at REAL,
        version INTEGER NOT NULL,
        state TEXT NOT NULL DEFAULT 'active',
        state_reason TEXT,
        state_changed_at REAL,
        refreshed_at REAL,
        PRIMARY KEY (provider, account)
    ) WITHOUT ROWID;
    CREATE INDEX credentials_expiry ON credentials (provider, expires_at);
    """,
    "ALTER TABLE credentials ADD COLUMN refresh_attempt_at REAL",
)
SCHEMA_VERSION = len(MIGRATIONS)
COLUMNS = (
    "provider, account, key_id, ciphertext, expires_at, version, state, state_reason, "
    "state_changed_at, refreshed_at, refresh_attempt_at"
)


class SQLiteStore:
    def __init__(self, conn: aiosqlite.Connection, lock_dir: Path) -> None:
        self._conn = conn
        self._tx_lock = asyncio.Lock()
        self._lock_dir = lock_dir

    @classmethod
    async def open(cls, path: str, busy_timeout_ms: int = 10_000) -> SQLiteStore:
        try:
            await asyncio.to_thread(_create_private, Path(path))
            conn = await aiosqlite.connect(path, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open SQLite database {path}: {exc}") from exc
        store = cls(conn, lock_dir(path))
        try:
            await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            await conn.execute("PRAGMA journal_mode = WAL")
            await conn.execute("PRAGMA synchronous = NORMAL")
            await store._migrate()
        except sqlite3.Error as exc:
            await conn.close()
            raise StoreError(f"cannot prepare SQLite database {path}: {exc}") from exc
        except BaseException:  # e.g. a schema newer than this release
            await conn.close()
            raise
        return store

    async def _migrate(self) -> None:
        async with self._transaction() as conn:
            async with conn.execute("PRAGMA user_version") as cur:
                row = await cur.fetchone()
            current = int(row[0]) if row else 0
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"database schema version {current} is newer than this "
                    f"release understands ({SCHEMA_VERSION}); upgrade the sidecar"
                )
            for script in MIGRATIONS[current:]:
                for statement in filter(str.strip, script.split(";")):
                    await conn.execute(statement)
            await conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._tx_lock:
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")

    async def _fetch(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """Run one query to completion in a single step on the connection's thread.

        A statement left open (a cursor not yet drained) keeps the connection's read
        transaction, and so its snapshot, alive: overlapping reads would then never see what
        another process committed, and a process that takes the refresh lock would reload a
        pair that was already rotated. The lock also keeps reads out of another coroutine's
        open transaction.
        """
        try:
            async with self._tx_lock:
                return list(await self._conn.execute_fetchall(sql, params))
        except (sqlite3.Error, ValueError) as exc:  # ValueError: the connection is closed
            raise StoreError(f"SQLite read failed: {exc}") from exc

    async def get(self, provider: str, account: str) -> StoredRow | None:
        rows = await self._fetch(
            f"SELECT {COLUMNS} FROM credentials WHERE provider = ? AND account = ?",
            (provider, account),
        )
        return StoredRow(*rows[0]) if rows else None

    async def upsert_many(self, rows: list[StoredRow]) -> None:
        params = [
            (r.provider, r.account, r.key_id, r.ciphertext, r.expires_at, r.refreshed_at)
            for r in rows
        ]
        try:
            async with self._transaction() as conn:
                await conn.executemany(
                    "INSERT INTO credentials (provider, account, key_id, ciphertext, expires_at, "
                    "refreshed_at, version) VALUES (?, ?, ?, ?, ?, ?, 1) "
                    "ON CONFLICT (provider, account) DO UPDATE SET key_id = excluded.key_id, "
                    "ciphertext = excluded.ciphertext, expires_at = excluded.expires_at, "
                    "refreshed_at = excluded.refreshed_at, version = credentials.version + 1, "
                    "state = 'active', state_reason = NULL, state_changed_at = NULL, "
                    "refresh_attempt_at = NULL",
                    params,
                )
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite write failed: {exc}") from exc

    async def _write(self, sql: str, params: tuple[Any, ...]) -> int:
        """Run one write statement; the lock keeps it out of another coroutine's transaction."""
        try:
            async with self._tx_lock, self._conn.execute(sql, params) as cur:
                return cur.rowcount
        except sqlite3.Error as exc:
            raise StoreError(f"SQLite write failed: {exc}") from exc

    async def compare_and_swap(self, row: StoredRow, expected_version: int) -> bool:
        changed = await self._write(
            "UPDATE credentials SET key_id = ?, ciphertext = ?, expires_at = ?, "
            "refreshed_at = ?, refresh_attempt_at = ?, version = version + 1 "
            "WHERE provider = ? AND account = ? AND version = ?",
            (
                row.key_id,
                row.ciphertext,
                row.expires_at,
                row.refreshed_at,
                row.refresh_attempt_at,
                row.provider,
                row.account,
                expected_version,
            ),
        )
        return changed == 1

    async def record_refresh_attempt(self, provider: str, account: str, at: float | None) -> None:
        await self._write(
            "UPDATE credentials SET refresh_attempt_at = ? WHERE provider = ? AND account = ?",
            (at, provider, account),
        )

    async def set_state(
        self, provider: str, account: str, state: str, reason: str | None, at: float
    ) -> None:
        await self._write(
            "UPDATE credentials SET state = ?, state_reason = ?, state_changed_at = ? "
            "WHERE provider = ? AND account = ?",
            (state, reason, at, provider, account),
        )

    async def delete(self, provider: str, account: str) -> bool:
        changed = await self._write(
            "DELETE FROM credentials WHERE provider = ? AND account = ?", (provider, account)
        )
        return changed == 1

    async def rows(self, provider: str | None = None) -> list[StoredRow]:
        if provider is None:
            found = await self._fetch(
                f"SELECT {COLUMNS} FROM credentials ORDER BY provider, account"
            )
        else:
            found = await self._fetch(
                f"SELECT {COLUMNS} FROM credentials WHERE provider = ? ORDER BY account",
                (provider,),
            )
        return [StoredRow(*r) for r in found]

    async def count_by_state(self) -> dict[tuple[str, str], int]:
        found = await self._fetch(
            "SELECT provider, state, count(*) FROM credentials GROUP BY provider, state"
        )
        return {(p, s): n for p, s, n in found}

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
        """The account's lock file, flocked: waiting for it, or only if it is free now."""
        path = lock_file(self._lock_dir, provider, account)
        started = time.monotonic()
        fd = await _flock(path) if wait else _flock_now(path)
        who = {"provider": provider, "account": account}
        if fd is None:
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
            os.close(fd)  # closing the only descriptor of the file description unlocks it
            log.debug(
                "refresh_lock_released",
                extra={**who, "held_seconds": time.monotonic() - acquired},
            )

    async def ping(self) -> None:
        await self._fetch("SELECT 1")

    async def close(self) -> None:
        await self._conn.close()


def sqlite_path(url: str) -> str:
    """``sqlite:///var/lib/x.db`` -> ``/var/lib/x.db``; ``sqlite://x.db`` -> ``x.db``."""
    return url.removeprefix("sqlite://")


def lock_dir(path: str) -> Path:
    """The directory of refresh lock files that belongs to the database at ``path``."""
    db = Path(path)
    return db.with_name(db.name + ".locks")


def lock_file(directory: Path, provider: str, account: str) -> Path:
    """One lock file per account; hashed, so names are safe and collisions need not be handled."""
    digest = hashlib.blake2b(f"{provider}\0{account}".encode(), digest_size=16).hexdigest()
    return directory / f"{digest}.lock"


def _open_lock_file(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot open refresh lock file {path}: {exc}") from exc


def _flock_now(path: Path) -> int | None:
    """Open ``path`` and flock it if no one holds it (LOCK_NB: the call never waits).

    Returns the descriptor (closing it releases the lock), or None when it is held.
    """
    fd = _open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # EWOULDBLOCK: another open file description holds it
        os.close(fd)
        return None
    except OSError as exc:
        os.close(fd)
        raise StoreError(f"cannot lock refresh lock file {path}: {exc}") from exc
    return fd


async def _flock(path: Path) -> int:
    """Open ``path`` and take an exclusive flock on it without blocking the event loop.

    Returns the descriptor; closing it releases the lock.
    """
    fd = _open_lock_file(path)
    job: concurrent.futures.Future[None] = concurrent.futures.Future()
    threading.Thread(target=_flock_job, args=(job, fd), name="sidecar-lock", daemon=True).start()
    try:
        await asyncio.wrap_future(job)
    except BaseException as exc:
        # Cancelled or failed. The job either never starts (cancelled before it ran) or ends
        # after taking the lock or failing; either way this closes the descriptor exactly once,
        # and only after the thread is done with it.
        job.add_done_callback(lambda _: os.close(fd))
        if isinstance(exc, OSError):
            raise StoreError(f"cannot lock refresh lock file {path}: {exc}") from exc
        raise
    return fd


def _flock_job(job: concurrent.futures.Future[None], fd: int) -> None:
    if not job.set_running_or_notify_cancel():
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except Exception as exc:
        job.set_exception(exc)
    else:
        job.set_result(None)


def _create_private(file: Path) -> None:
    """Create the database file readable by its owner only: even ciphertext stays private."""
    file.parent.mkdir(parents=True, exist_ok=True)
    if not file.exists():
        file.touch(mode=0o600)
    lock_dir(str(file)).mkdir(mode=0o700, exist_ok=True)
