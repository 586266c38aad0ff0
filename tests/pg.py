"""PostgreSQL for tests: a fresh schema per test in the server at ``SIDECAR_TEST_PG_DSN``.

Default ``postgresql://postgres@127.0.0.1:5432/test`` (trust auth). With no server reachable the
tests that need one skip with the reason, except under ``CI=true``, where they fail: CI must
never pass by skipping the PostgreSQL backend.

Use from a test module with ``pytest_plugins = ("tests.pg",)``.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import NoReturn
from urllib.parse import parse_qsl, urlencode, urlsplit

import asyncpg
import pytest

from sidecar.store.postgres import lock_key

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"


def pg_dsn() -> str:
    return os.environ.get("SIDECAR_TEST_PG_DSN", DEFAULT_DSN)


def with_search_path(dsn: str, schema: str) -> str:
    """The DSN with ``search_path`` set: asyncpg passes unknown query keys as settings."""
    parts = urlsplit(dsn)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "search_path"]
    return parts._replace(query=urlencode([*query, ("search_path", schema)])).geturl()


def unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: the PostgreSQL tests must run, not skip)")
    pytest.skip(reason)


async def connect_admin() -> asyncpg.Connection:
    dsn = pg_dsn()
    try:
        return await asyncpg.connect(dsn, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        unavailable(
            f"no PostgreSQL server reachable at {dsn} ({type(exc).__name__}: {exc}); "
            "start one or set SIDECAR_TEST_PG_DSN"
        )


@dataclass
class PgSchema:
    """A schema of its own for one test; ``url`` is a store URL that selects it."""

    admin: asyncpg.Connection
    name: str
    url: str

    async def lock_waiters(self, provider: str, account: str) -> int:
        """Sessions now blocked in pg_advisory_lock on this schema's lock for one account."""
        key = lock_key("refresh", self.name, provider, account) & (2**64 - 1)
        return int(
            await self.admin.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                "AND classid::bigint = $1 AND objid::bigint = $2 AND objsubid = 1",
                key >> 32,
                key & 0xFFFFFFFF,
            )
        )

    async def lock_holder(self, provider: str, account: str) -> int | None:
        """The server process id of the session holding one account's lock."""
        key = lock_key("refresh", self.name, provider, account) & (2**64 - 1)
        pid = await self.admin.fetchval(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND classid::bigint = $1 AND objid::bigint = $2 AND objsubid = 1",
            key >> 32,
            key & 0xFFFFFFFF,
        )
        return None if pid is None else int(pid)

    async def set_schema_version(self, version: int) -> None:
        await self.admin.execute(f'UPDATE "{self.name}".sidecar_schema SET version = $1', version)


@pytest.fixture
async def pg_schema() -> AsyncIterator[PgSchema]:
    admin = await connect_admin()
    name = f"sidecar_test_{secrets.token_hex(6)}"
    await admin.execute(f'CREATE SCHEMA "{name}"')
    try:
        yield PgSchema(admin, name, with_search_path(pg_dsn(), name))
    finally:
        await admin.execute(f'DROP SCHEMA "{name}" CASCADE')
        await admin.close()
