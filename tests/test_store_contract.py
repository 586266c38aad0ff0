"""One contract for every token store backend: memory, SQLite (a real file), PostgreSQL.

Every test runs against each backend. "Another instance" means a second store opened on the
same storage (for memory, the same object: nothing else can share it). Lock tests observe that
a waiter is really blocked (asyncio lock waiters, /proc/locks, pg_locks) before releasing the
holder, and check the order of events; nothing sleeps and hopes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import sqlite3
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from sidecar.errors import StoreError
from sidecar.store import StoredRow, TokenStore, open_store
from sidecar.store import postgres as pg_backend
from sidecar.store import sqlite as sqlite_backend
from sidecar.store.memory import MemoryStore

if TYPE_CHECKING:
    from tests.pg import PgSchema

pytest_plugins = ("tests.pg",)

ROOT = Path(__file__).resolve().parent.parent
P, A = "example", "alice"


def row(
    account: str = A, provider: str = P, blob: bytes = b"\x00sealed\xff", **kw: Any
) -> StoredRow:
    return StoredRow(provider, account, "k1", blob, kw.pop("expires_at", 1_700_000_600.25), **kw)


def flock_waiters(path: Path) -> int:
    """Processes or threads blocked in flock(2) on the file at ``path`` (from /proc/locks)."""
    if not path.exists():
        return 0
    st = path.stat()
    file = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    lines = Path("/proc/locks").read_text().splitlines()
    return sum(1 for line in lines if "->" in line.split() and file in line.split())


async def eventually(probe: Callable[[], Awaitable[bool]], what: str, within: float = 10.0) -> None:
    """Wait for an outside condition (a lock table, a file) with a deadline."""
    deadline = time.monotonic() + within
    while not await probe():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.01)


@dataclass
class Backend:
    name: str
    url: str | None  # None: storage no other process can share
    schema_version: int
    open_store: Callable[[], Awaitable[TokenStore]]
    lock_waiters: Callable[[str, str], Awaitable[int]]  # (provider, account) -> blocked holds
    set_schema_version: Callable[[int], Awaitable[None]] | None = None

    async def blocked(self, n: int = 1, provider: str = P, account: str = A) -> None:
        async def probe() -> bool:
            return await self.lock_waiters(provider, account) >= n

        await eventually(probe, f"{n} holder(s) wait for the {self.name} lock")

    def needs_processes(self) -> None:
        if self.url is None:
            pytest.skip(f"{self.name} storage belongs to one process")


def memory_backend() -> Backend:
    store = MemoryStore()

    async def opened() -> TokenStore:
        return store

    async def waiters(provider: str, account: str) -> int:
        lock = store._locks.get((provider, account))
        return len(lock._waiters or ()) if lock is not None else 0

    return Backend("memory", None, 0, opened, waiters)


def sqlite_backend_at(path: Path) -> Backend:
    url = f"sqlite://{path}"

    async def waiters(provider: str, account: str) -> int:
        directory = sqlite_backend.lock_dir(str(path))
        return flock_waiters(sqlite_backend.lock_file(directory, provider, account))

    async def set_version(version: int) -> None:
        with sqlite3.connect(path) as conn:
            conn.execute(f"PRAGMA user_version = {version}")

    return Backend(
        "sqlite",
        url,
        sqlite_backend.SCHEMA_VERSION,
        lambda: open_store(url),
        waiters,
        set_version,
    )


def postgres_backend(schema: PgSchema) -> Backend:
    return Backend(
        "postgres",
        schema.url,
        pg_backend.SCHEMA_VERSION,
        lambda: open_store(schema.url),
        schema.lock_waiters,
        schema.set_schema_version,
    )


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "memory":
        return memory_backend()
    if request.param == "sqlite":
        return sqlite_backend_at(tmp_path / "tokens.db")
    return postgres_backend(request.getfixturevalue("pg_schema"))


@pytest.fixture
async def stores(backend: Backend) -> AsyncIterator[Callable[[], Awaitable[TokenStore]]]:
    """Opens store instances on the backend's storage; closes them all after the test."""
    opened: list[TokenStore] = []

    async def open_one() -> TokenStore:
        store = await backend.open_store()
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()


@pytest.fixture
async def store(stores: Callable[[], Awaitable[TokenStore]]) -> TokenStore:
    return await stores()


# --- rows -------------------------------------------------------------------------------------


async def test_get_of_unknown_account_is_none(store: TokenStore) -> None:
    assert await store.get(P, "nobody") is None
    await store.ping()


async def test_upsert_inserts_at_version_1_and_replaces_with_a_bump(store: TokenStore) -> None:
    await store.upsert_many([row(A), row("bob")])
    assert (await store.get(P, A)) == row(A, version=1)
    await store.set_state(P, A, "reauthorization_required", "invalid_grant", 5.0)
    await store.upsert_many([row(A, blob=b"new pair", expires_at=None)])
    # A re-import replaces the pair and makes the account active again.
    assert (await store.get(P, A)) == row(A, blob=b"new pair", expires_at=None, version=2)
    assert (await store.get(P, "bob")) == row("bob", version=1)


async def test_upsert_many_writes_all_rows_or_none(store: TokenStore) -> None:
    await store.upsert_many([row(A)])
    bad = dataclasses.replace(row("carol"), ciphertext=None)  # violates the row contract
    with pytest.raises(StoreError):
        await store.upsert_many([row(A, blob=b"changed"), row("bob"), bad])
    assert await store.rows() == [row(A, version=1)]


async def test_bytes_and_numbers_round_trip_exactly(store: TokenStore) -> None:
    blob = bytes(range(256)) * 4
    original = row(A, blob=blob, expires_at=1_700_000_000.123456, refreshed_at=1_699_999_999.5)
    await store.upsert_many([original])
    assert await store.get(P, A) == dataclasses.replace(original, version=1)


async def test_compare_and_swap_replaces_the_pair_and_keeps_the_state(store: TokenStore) -> None:
    await store.upsert_many([row(A)])
    await store.set_state(P, A, "reauthorization_required", "invalid_grant", 7.5)
    swapped = row(A, blob=b"rotated", expires_at=99.0, refreshed_at=42.0, version=1)
    swapped = dataclasses.replace(swapped, key_id="k2", state="active", state_reason="ignored")
    assert await store.compare_and_swap(swapped, expected_version=1)
    assert await store.get(P, A) == StoredRow(
        P, A, "k2", b"rotated", 99.0, 2, "reauthorization_required", "invalid_grant", 7.5, 42.0
    )


async def test_refresh_attempt_is_recorded_and_cleared(store: TokenStore) -> None:
    await store.upsert_many([row(A)])
    await store.record_refresh_attempt(P, A, 12.5)
    stored = await store.get(P, A)
    assert stored is not None and stored.refresh_attempt_at == 12.5
    assert [r.refresh_attempt_at for r in await store.rows(P)] == [12.5]
    # A successful refresh writes the new pair without the marker.
    assert await store.compare_and_swap(row(A, blob=b"new", version=1), expected_version=1)
    stored = await store.get(P, A)
    assert stored is not None and stored.refresh_attempt_at is None
    await store.record_refresh_attempt(P, A, 13.0)
    await store.record_refresh_attempt(P, A, None)  # the outcome became known
    stored = await store.get(P, A)
    assert stored is not None and stored.refresh_attempt_at is None
    await store.record_refresh_attempt(P, A, 14.0)
    await store.upsert_many([row(A)])  # an import replaces the pair and clears it too
    stored = await store.get(P, A)
    assert stored is not None and stored.refresh_attempt_at is None


async def test_compare_and_swap_with_a_stale_version_writes_nothing(store: TokenStore) -> None:
    await store.upsert_many([row(A)])
    assert await store.compare_and_swap(row(A, blob=b"first"), expected_version=1)
    before = await store.get(P, A)
    assert not await store.compare_and_swap(row(A, blob=b"stale"), expected_version=1)
    assert not await store.compare_and_swap(row(A, blob=b"ahead"), expected_version=3)
    assert await store.get(P, A) == before
    assert before is not None and (before.version, before.ciphertext) == (2, b"first")


async def test_compare_and_swap_on_a_missing_row_creates_nothing(store: TokenStore) -> None:
    assert not await store.compare_and_swap(row(A), expected_version=0)
    assert not await store.compare_and_swap(row(A), expected_version=1)
    assert await store.get(P, A) is None


async def test_one_of_many_concurrent_swaps_wins(
    stores: Callable[[], Awaitable[TokenStore]],
) -> None:
    """Writers on several store instances, all holding version 1: exactly one succeeds."""
    first, second = await stores(), await stores()
    await first.upsert_many([row(A)])
    results = await asyncio.gather(
        *(
            (first, second)[i % 2].compare_and_swap(row(A, blob=f"w{i}".encode()), 1)
            for i in range(8)
        )
    )
    assert results.count(True) == 1
    stored = await second.get(P, A)
    assert stored is not None and stored.version == 2
    assert stored.ciphertext == f"w{results.index(True)}".encode()


async def test_set_state_records_reason_and_time(store: TokenStore) -> None:
    await store.upsert_many([row(A)])
    await store.set_state(P, A, "reauthorization_required", "invalid_grant", 1234.5)
    stored = await store.get(P, A)
    assert stored is not None
    assert (stored.state, stored.state_reason, stored.state_changed_at) == (
        "reauthorization_required",
        "invalid_grant",
        1234.5,
    )
    assert stored.version == 1  # bookkeeping, not a new pair
    await store.set_state(P, "nobody", "reauthorization_required", "x", 1.0)
    assert await store.get(P, "nobody") is None


async def test_delete(store: TokenStore) -> None:
    await store.upsert_many([row(A), row("bob")])
    assert await store.delete(P, A)
    assert not await store.delete(P, A)
    assert [r.account for r in await store.rows()] == ["bob"]


async def test_rows_are_ordered_by_provider_then_account(store: TokenStore) -> None:
    accounts = ["zed", "Bob", "alice", "_x", "Zed", "äsa", "bob"]
    await store.upsert_many(
        [row(a, provider=p) for p in ("zeta", "alpha") for a in accounts] + [row("m", "Beta")]
    )
    expected = sorted([("Beta", "m"), *((p, a) for p in ("zeta", "alpha") for a in accounts)])
    assert [(r.provider, r.account) for r in await store.rows()] == expected
    assert [r.account for r in await store.rows("alpha")] == sorted(accounts)
    assert await store.rows("nope") == []


async def test_count_by_state(store: TokenStore) -> None:
    assert await store.count_by_state() == {}
    await store.upsert_many([row("a"), row("b"), row("c"), row("d", provider="other")])
    await store.set_state(P, "b", "reauthorization_required", "invalid_grant", 1.0)
    assert await store.count_by_state() == {
        (P, "active"): 2,
        (P, "reauthorization_required"): 1,
        ("other", "active"): 1,
    }


# --- the refresh lock -------------------------------------------------------------------------


@pytest.mark.parametrize("same_instance", [True, False], ids=["same-store", "two-stores"])
async def test_hold_makes_a_second_holder_wait_until_the_first_exits(
    backend: Backend, stores: Callable[[], Awaitable[TokenStore]], same_instance: bool
) -> None:
    first = await stores()
    second = first if same_instance else await stores()
    order: list[str] = []
    first_in, release_first = asyncio.Event(), asyncio.Event()

    async def holder() -> None:
        async with first.hold(P, A):
            order.append("first in")
            first_in.set()
            await release_first.wait()
            order.append("first out")

    async def waiter() -> None:
        async with second.hold(P, A):
            order.append("second in")

    held = asyncio.create_task(holder())
    await first_in.wait()
    waiting = asyncio.create_task(waiter())
    await backend.blocked(1)
    assert not waiting.done() and order == ["first in"]
    release_first.set()
    await asyncio.wait_for(asyncio.gather(held, waiting), 10)
    assert order == ["first in", "first out", "second in"]


async def test_holds_on_different_accounts_do_not_block_each_other(
    stores: Callable[[], Awaitable[TokenStore]],
) -> None:
    first, second = await stores(), await stores()
    async with first.hold(P, A), second.hold(P, "bob"), second.hold("other", A):
        pass  # would never get here if either blocked


async def test_hold_is_released_when_the_body_raises(store: TokenStore) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):  # the body's own exception, not translated into StoreError
        async with store.hold(P, A):
            raise Boom
    async with asyncio.timeout(10), store.hold(P, A):
        pass


async def test_a_cancelled_waiter_does_not_keep_the_lock(
    backend: Backend, stores: Callable[[], Awaitable[TokenStore]]
) -> None:
    first, second = await stores(), await stores()
    first_in, release_first = asyncio.Event(), asyncio.Event()

    async def holder() -> None:
        async with first.hold(P, A):
            first_in.set()
            await release_first.wait()

    async def waiter() -> None:
        async with second.hold(P, A):
            raise AssertionError("a cancelled waiter got the lock")

    held = asyncio.create_task(holder())
    await first_in.wait()
    waiting = asyncio.create_task(waiter())
    await backend.blocked(1)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    release_first.set()
    await held
    async with asyncio.timeout(10), second.hold(P, A), first.hold(P, "bob"):
        pass


HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from sidecar.store import open_store

    async def main():
        store = await open_store(sys.argv[1])
        if sys.argv[4] == "try_hold":
            async with store.try_hold(sys.argv[2], sys.argv[3]) as held:
                print("held" if held else "busy", flush=True)
                sys.stdin.readline()  # hold until killed
        else:
            async with store.hold(sys.argv[2], sys.argv[3]):
                print("held", flush=True)
                sys.stdin.readline()

    asyncio.run(main())
    """
)


@asynccontextmanager
async def holder_process(backend: Backend, how: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """A child process holding the lock on (P, A), taken with ``hold`` or ``try_hold``."""
    backend.needs_processes()
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLDER,
        str(backend.url),
        P,
        A,
        how,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert child.stdout is not None
        assert await asyncio.wait_for(child.stdout.readline(), 30) == b"held\n"
        yield child
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


async def kill(child: asyncio.subprocess.Process) -> None:
    child.send_signal(signal.SIGKILL)  # no cleanup runs: the OS or server must free the lock
    assert await child.wait() == -signal.SIGKILL


async def test_hold_excludes_another_process_and_is_released_when_it_dies(
    backend: Backend, store: TokenStore
) -> None:
    async with holder_process(backend, "hold") as child:
        entered = asyncio.Event()

        async def waiter() -> None:
            async with store.hold(P, A):
                entered.set()

        waiting = asyncio.create_task(waiter())
        await backend.blocked(1)
        assert not entered.is_set()
        await kill(child)
        await asyncio.wait_for(waiting, 10)
        assert entered.is_set()


# --- the non-blocking refresh lock (background refresh) ---------------------------------------


@pytest.mark.parametrize("same_instance", [True, False], ids=["same-store", "two-stores"])
async def test_try_hold_is_refused_at_once_while_another_holds(
    backend: Backend, stores: Callable[[], Awaitable[TokenStore]], same_instance: bool
) -> None:
    first = await stores()
    second = first if same_instance else await stores()
    async with first.hold(P, A):
        async with asyncio.timeout(10), second.try_hold(P, A) as held:
            assert held is False
        assert await backend.lock_waiters(P, A) == 0  # it never queued for the lock
        async with second.try_hold(P, "bob") as other, second.try_hold("other", A) as third:
            assert (other, third) == (True, True)  # other accounts' locks are free
    async with asyncio.timeout(10), second.try_hold(P, A) as held:
        assert held is True  # free once the holder exited; a refusal kept nothing


@pytest.mark.parametrize("same_instance", [True, False], ids=["same-store", "two-stores"])
async def test_a_lock_taken_by_try_hold_excludes_others_until_exit(
    backend: Backend, stores: Callable[[], Awaitable[TokenStore]], same_instance: bool
) -> None:
    first = await stores()
    second = first if same_instance else await stores()
    order: list[str] = []

    async def waiter() -> None:
        async with second.hold(P, A):
            order.append("second in")

    async with first.try_hold(P, A) as held:
        assert held is True
        async with second.try_hold(P, A) as again:
            assert again is False
        waiting = asyncio.create_task(waiter())
        await backend.blocked(1)
        assert not waiting.done()
        order.append("first out")
    await asyncio.wait_for(waiting, 10)
    assert order == ["first out", "second in"]
    async with asyncio.timeout(10), first.try_hold(P, A) as held:
        assert held is True


async def test_try_hold_is_released_when_the_body_raises(store: TokenStore) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        async with store.try_hold(P, A) as held:
            assert held is True
            raise Boom
    with pytest.raises(Boom):
        async with store.hold(P, A), store.try_hold(P, A) as held:
            assert held is False
            raise Boom  # a refused try_hold has nothing to release
    async with asyncio.timeout(10), store.hold(P, A), store.try_hold(P, "bob") as held:
        assert held is True


async def test_try_hold_is_refused_while_another_process_holds_until_it_dies(
    backend: Backend, store: TokenStore
) -> None:
    async with holder_process(backend, "hold") as child:
        async with asyncio.timeout(10), store.try_hold(P, A) as held:
            assert held is False
        await kill(child)

        async def obtained() -> bool:  # the kernel or server frees it soon, not at once
            async with store.try_hold(P, A) as held:
                return held

        await eventually(obtained, "the dead holder's lock is free")


async def test_a_lock_taken_by_try_hold_in_another_process_is_freed_when_it_dies(
    backend: Backend, store: TokenStore
) -> None:
    async with holder_process(backend, "try_hold") as child:
        async with store.try_hold(P, A) as held:
            assert held is False
        entered = asyncio.Event()

        async def waiter() -> None:
            async with store.hold(P, A):
                entered.set()

        waiting = asyncio.create_task(waiter())
        await backend.blocked(1)
        assert not entered.is_set()
        await kill(child)
        await asyncio.wait_for(waiting, 10)
        assert entered.is_set()


async def test_memory_try_hold_does_not_overtake_a_woken_waiter() -> None:
    """Just after a release the asyncio lock looks free while the waiter it woke has not run
    yet; try_hold must not queue behind that waiter (which could hold it for a whole
    refresh), nor take the lock from it."""
    store = MemoryStore()
    entered: list[str] = []

    async def waiter() -> None:
        async with store.hold(P, A):
            entered.append("waiter")

    async with store.hold(P, A):
        waiting = asyncio.create_task(waiter())

        async def queued() -> bool:
            lock = store._locks[(P, A)]
            return len(lock._waiters or ()) == 1

        await eventually(queued, "the waiter queued")
    async with asyncio.timeout(10), store.try_hold(P, A) as held:
        assert held is False
    await waiting
    assert entered == ["waiter"]
    async with store.try_hold(P, A) as held:
        assert held is True


# --- schema and migrations --------------------------------------------------------------------


async def test_reopening_migrates_nothing_and_keeps_rows(
    stores: Callable[[], Awaitable[TokenStore]],
) -> None:
    first = await stores()
    await first.upsert_many([row(A)])
    await first.close()
    again = await stores()
    assert await again.get(P, A) == row(A, version=1)
    await (await stores()).ping()


async def test_concurrent_opens_of_a_new_store_all_succeed(
    stores: Callable[[], Awaitable[TokenStore]],
) -> None:
    opened = await asyncio.gather(*(stores() for _ in range(4)))
    await opened[0].upsert_many([row(A)])
    for store in opened:
        assert await store.get(P, A) == row(A, version=1)


async def test_a_newer_schema_is_refused(
    backend: Backend, stores: Callable[[], Awaitable[TokenStore]]
) -> None:
    if backend.set_schema_version is None:
        pytest.skip(f"{backend.name} has no schema")
    await (await stores()).close()
    await backend.set_schema_version(backend.schema_version + 1)
    with pytest.raises(StoreError, match="newer than this release"):
        await backend.open_store()


# --- PostgreSQL only --------------------------------------------------------------------------


async def test_unreachable_postgres_is_a_store_error() -> None:
    with pytest.raises(StoreError, match=r"postgresql://u:\*\*\*@127\.0\.0\.1:1/db") as caught:
        await open_store("postgresql://u:secret-pw@127.0.0.1:1/db")
    assert "secret-pw" not in str(caught.value)


async def test_postgres_lock_whose_session_dies_is_freed(
    pg_schema: PgSchema, caplog: pytest.LogCaptureFixture
) -> None:
    """The server drops the lock with its session; the holder finishes without an error."""
    first, second = await open_store(pg_schema.url), await open_store(pg_schema.url)
    try:
        with caplog.at_level(logging.WARNING, "sidecar.store.postgres"):
            async with first.hold(P, A):
                pid = await pg_schema.lock_holder(P, A)
                assert pid is not None and await pg_schema.admin.fetchval(
                    "SELECT pg_terminate_backend($1)", pid
                )
                async with asyncio.timeout(10), second.hold(P, A):
                    pass
        assert [r.message for r in caplog.records] == ["refresh_lock_lost"]
        async with asyncio.timeout(10), first.hold(P, A):
            pass
    finally:
        await first.close()
        await second.close()


async def test_a_read_sees_what_another_instance_committed_before_it(
    stores: Callable[[], Awaitable[TokenStore]],
) -> None:
    """Overlapping reads on one connection must not pin an old snapshot: a process that takes
    the refresh lock after another process's write has to see that write."""
    reader, writer = await stores(), await stores()
    await writer.upsert_many([row(A)])
    for version in range(1, 21):
        crowd = [asyncio.create_task(reader.get(P, A)) for _ in range(50)]
        await asyncio.sleep(0)  # the crowd's reads are under way
        assert await writer.compare_and_swap(row(A, blob=f"v{version}".encode()), version)
        latest = await reader.get(P, A)
        assert latest is not None and latest.version == version + 1
        await asyncio.gather(*crowd)


async def test_postgres_store_recovers_when_the_server_drops_every_session(
    pg_schema: PgSchema,
) -> None:
    """A restart or failover: calls fail with StoreError (never a raw asyncpg error) at most
    until the pool has reconnected, and nothing stored is lost."""
    url = f"{pg_schema.url}&application_name={pg_schema.name}"
    store = await open_store(url)
    try:
        await store.upsert_many([row(A)])
        for _ in range(3):
            dropped = await pg_schema.admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = $1",
                pg_schema.name,
            )
            assert dropped >= 1
            outcomes = []
            for _ in range(5):
                try:
                    outcomes.append(await store.get(P, A))
                except StoreError:
                    outcomes.append(None)
            assert outcomes[-1] == row(A, version=1), outcomes
            async with asyncio.timeout(10), store.hold(P, A):
                pass
    finally:
        await store.close()
