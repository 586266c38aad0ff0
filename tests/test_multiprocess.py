"""Several real sidecar processes sharing one store: an account's refresh happens exactly once.

Each process is ``python -m sidecar run`` with its own config (listeners on port 0; the
addresses come from its "ready" log line) and the same store: one SQLite file, or one
PostgreSQL schema. The token endpoint is the rotating fake with reuse detection, served from
this test process; the upstream accepts only tokens the fake issued by refreshing.

The processes log at debug level, so each one reports how long it waited for the refresh lock
(``refresh_lock_acquired``), each lock its background refresher found taken and skipped
(``refresh_lock_busy``) and each background pass (``background_refresh_pass``); the tests print
those figures with the request latencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w

from sidecar.store import sqlite as sqlite_backend
from tests.conftest import base_config
from tests.fakes import FakeTokenEndpoint
from tests.test_store_contract import eventually, flock_waiters

pytest_plugins = ("tests.pg",)

ROOT = Path(__file__).resolve().parent.parent
PROCESSES, REQUESTS_EACH = 4, 50
PROVIDER, ACCOUNT = "example", "main"


@dataclass
class SidecarProcess:
    name: str
    process: asyncio.subprocess.Process
    events: list[dict[str, Any]] = field(default_factory=list)
    listeners: dict[str, list[Any]] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    output: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    def url(self, listener: str) -> str:
        host, port = self.listeners[listener][:2]
        return f"http://{host}:{port}"

    def logged(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]

    async def read_stderr(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.output.append(line)
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    self.events.append(event)
                    if event.get("event") == "ready":
                        self.listeners = event["listeners"]
                        self.ready.set()
        self.exited.set()


@dataclass
class SharedStore:
    url: str
    lock_waiters: Callable[[], Awaitable[int]]  # processes blocked on the account's lock


@pytest.fixture(params=["sqlite", "postgres"])
def shared_store(request: pytest.FixtureRequest, secrets_dir: Path) -> SharedStore:
    if request.param == "postgres":
        schema = request.getfixturevalue("pg_schema")

        async def pg_waiters() -> int:
            return int(await schema.lock_waiters(PROVIDER, ACCOUNT))

        return SharedStore(schema.url, pg_waiters)
    path = secrets_dir / "shared.db"
    lock = sqlite_backend.lock_file(sqlite_backend.lock_dir(str(path)), PROVIDER, ACCOUNT)

    async def sqlite_waiters() -> int:
        return flock_waiters(lock)

    return SharedStore(f"sqlite://{path}", sqlite_waiters)


@dataclass
class Cluster:
    """Starts sidecar processes; stops them all at the end of the test."""

    secrets_dir: Path
    idp: FakeTokenEndpoint
    upstream: str
    processes: list[SidecarProcess] = field(default_factory=list)

    def config(
        self, name: str, store_url: str, provider: dict[str, Any] | None = None, **sidecar: Any
    ) -> Path:
        raw = base_config(self.secrets_dir, self.idp.url, self.upstream, provider=provider)  # type: ignore[attr-defined]
        raw["store"]["url"] = store_url
        raw["sidecar"].update({"log_level": "debug", **sidecar})
        path = self.secrets_dir / f"{name}.toml"
        path.write_text(tomli_w.dumps(raw))
        return path

    async def import_expired(self, config: Path, access: str, refresh: str) -> None:
        """`sidecar accounts import` of a pair whose access token has already expired."""
        await self.import_many_expired(config, {ACCOUNT: (access, refresh)})

    async def import_many_expired(self, config: Path, pairs: dict[str, tuple[str, str]]) -> None:
        """`sidecar accounts import` of one expired (access, refresh) pair per account."""
        lines = "".join(
            json.dumps({"account": account, "access_token": a, "refresh_token": r, "expires_in": 0})
            + "\n"
            for account, (a, r) in pairs.items()
        )
        proc = await asyncio.create_subprocess_exec(
            *sidecar_cmd("accounts", "import", "--config", str(config), "--provider", PROVIDER),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        _, err = await asyncio.wait_for(proc.communicate(lines.encode()), 60)
        assert proc.returncode == 0, err.decode()

    async def start(self, configs: dict[str, Path]) -> list[SidecarProcess]:
        started = []
        for name, config in configs.items():
            process = await asyncio.create_subprocess_exec(
                *sidecar_cmd("run", "--config", str(config)),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                cwd=ROOT,
            )
            sidecar = SidecarProcess(name, process)
            sidecar.reader = asyncio.create_task(sidecar.read_stderr())
            self.processes.append(sidecar)
            started.append(sidecar)
        await asyncio.gather(*(self._ready(s) for s in started))
        return started

    async def _ready(self, sidecar: SidecarProcess, within: float = 60.0) -> None:
        """The "ready" log line, then /readyz answering 200 (the store is reachable)."""
        ready = asyncio.create_task(sidecar.ready.wait())
        exited = asyncio.create_task(sidecar.exited.wait())
        await asyncio.wait({ready, exited}, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        exited.cancel()
        assert sidecar.ready.is_set(), f"{sidecar.name} never got ready:\n" + self.logs(sidecar)

        async def answers() -> bool:
            async with aiohttp.ClientSession() as session:
                try:
                    async with session.get(sidecar.url("admin") + "/readyz") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

        await eventually(answers, f"{sidecar.name} answers /readyz", within)

    def logs(self, *only: SidecarProcess) -> str:
        """The processes' own events (full logs are written beside their configs)."""
        shown = []
        for p in only or self.processes:
            (self.secrets_dir / f"{p.name}.log").write_text("\n".join(p.output) + "\n")
            own = [line for line in p.output if '"logger": "aiosqlite"' not in line]
            shown.append(f"--- {p.name} ({self.secrets_dir / p.name}.log)\n" + "\n".join(own[-40:]))
        return "\n".join(shown)

    async def stop(self) -> None:
        for sidecar in self.processes:
            if sidecar.process.returncode is None:
                sidecar.process.send_signal(signal.SIGTERM)
        for sidecar in self.processes:
            try:
                await asyncio.wait_for(sidecar.process.wait(), 20)
            except TimeoutError:
                sidecar.process.kill()
                await sidecar.process.wait()
            if sidecar.reader is not None:
                await sidecar.reader


def sidecar_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sidecar", *args]


@pytest.fixture
async def cluster(
    secrets_dir: Path, idp: FakeTokenEndpoint, refreshed_only_upstream: str
) -> AsyncIterator[Cluster]:
    running = Cluster(secrets_dir, idp, refreshed_only_upstream)
    try:
        yield running
    finally:
        await running.stop()


async def start_replicas(
    cluster: Cluster, store: SharedStore, **sidecar: Any
) -> tuple[list[SidecarProcess], str]:
    """PROCESSES sidecars on one store holding an expired pair; returns them and the seed
    refresh token."""
    configs = {
        f"sidecar-{i}": cluster.config(f"sidecar-{i}", store.url, **sidecar)
        for i in range(PROCESSES)
    }
    access, refresh = cluster.idp.grant(ACCOUNT)
    await cluster.import_expired(configs["sidecar-0"], access, refresh)
    return await cluster.start(configs), refresh


@dataclass
class Result:
    process: str
    status: int
    token: str | None
    seconds: float


async def burst(processes: list[SidecarProcess], each: int) -> list[Result]:
    """``each`` concurrent requests into every process at once."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(sidecar: SidecarProcess) -> Result:
            start = time.perf_counter()
            async with session.get(sidecar.url("api") + "/items") as response:
                body = await response.json()
                return Result(
                    sidecar.name, response.status, body.get("token"), time.perf_counter() - start
                )

        return await asyncio.gather(*(one(p) for p in processes for _ in range(each)))


def report(title: str, processes: list[SidecarProcess], results: list[Result], calls: int) -> str:
    """What the closing note quotes: refresh count, lock waits, request latencies."""
    lines = [f"{title}: token endpoint calls = {calls}"]
    for sidecar in processes:
        waits = [e["waited_seconds"] for e in sidecar.logged("refresh_lock_acquired")]
        held = [e["held_seconds"] for e in sidecar.logged("refresh_lock_released")]
        latencies = sorted(r.seconds for r in results if r.process == sidecar.name)
        lines.append(
            f"  {sidecar.name}: lock waits {[f'{w * 1000:.1f}ms' for w in waits]}, "
            f"held {[f'{h * 1000:.1f}ms' for h in held]}, "
            f"refreshed here: {bool(sidecar.logged('token_refreshed'))}, "
            + (
                f"latency p50 {statistics.median(latencies) * 1000:.1f}ms "
                f"max {latencies[-1] * 1000:.1f}ms"
                if latencies
                else "no requests"
            )
        )
    text = "\n".join(lines)
    print(text)
    return text


def assert_refreshed_once(
    cluster: Cluster, processes: list[SidecarProcess], results: list[Result], seed: str
) -> None:
    idp = cluster.idp
    detail = cluster.logs()
    assert idp.calls == 1, detail
    assert idp.reuse_detected == 0
    assert [r["refresh_token"] for r in idp.requests] == [seed]
    refreshed = idp.issued_access[-1]
    assert [(r.status, r.token) for r in results] == [(200, refreshed)] * len(results), detail
    assert sum(bool(p.logged("token_refreshed")) for p in processes) == 1
    # A process took the lock at most once (a process that first read the row after the
    # refresh had nothing to do); all but the refreshing one found the new pair under it.
    assert all(len(p.logged("refresh_lock_acquired")) <= 1 for p in processes)


async def test_four_processes_refresh_an_expired_token_exactly_once(
    cluster: Cluster, shared_store: SharedStore
) -> None:
    processes, seed = await start_replicas(cluster, shared_store)
    results = await burst(processes, REQUESTS_EACH)
    report(
        f"{len(results)} requests, {len(processes)} processes",
        processes,
        results,
        cluster.idp.calls,
    )
    assert_refreshed_once(cluster, processes, results, seed)


async def test_the_lock_outlives_a_slow_token_endpoint(
    cluster: Cluster, shared_store: SharedStore
) -> None:
    """The endpoint answers 3 s after the other three processes are seen blocked on the lock
    (oauth2-proxy's lock expired after 2 s); they are still blocked then, and nobody refreshes
    twice."""
    processes, seed = await start_replicas(cluster, shared_store)
    cluster.idp.gate = asyncio.Event()
    requests = asyncio.create_task(burst(processes, REQUESTS_EACH))
    await asyncio.wait_for(cluster.idp.arrived.wait(), 30)

    async def others_wait() -> bool:
        return await shared_store.lock_waiters() == PROCESSES - 1

    await eventually(others_wait, "the other processes wait for the lock", 30)
    await asyncio.sleep(3.0)  # the slow token endpoint, answering 3 s after all wait
    assert await shared_store.lock_waiters() == PROCESSES - 1
    cluster.idp.gate.set()
    results = await asyncio.wait_for(requests, 60)
    report("slow endpoint (3 s)", processes, results, cluster.idp.calls)
    assert_refreshed_once(cluster, processes, results, seed)
    waits = sorted(
        e["waited_seconds"] for p in processes for e in p.logged("refresh_lock_acquired")
    )
    assert waits[0] < 1.0 and all(w >= 2.9 for w in waits[1:]), waits


def lock_figures(sidecar: SidecarProcess) -> dict[str, Any]:
    """What one process's logs say about its refresh locks and background passes."""
    acquired = sidecar.logged("refresh_lock_acquired")
    waits = [e["waited_seconds"] for e in acquired if e.get("blocking")]
    return {
        "refreshed": len(sidecar.logged("token_refreshed")),
        "skipped (lock busy)": len(sidecar.logged("refresh_lock_busy")),
        "tried and took": sum(1 for e in acquired if e.get("blocking") is False),
        "waited for the lock": len(waits),
        "longest wait ms": round(max(waits, default=0.0) * 1000, 1),
        "passes": len(sidecar.logged("background_refresh_pass")),
    }


def passed_with_nothing_due(sidecar: SidecarProcess) -> bool:
    """The background refresher finished a pass that found nothing due: every pass before it
    is over too, so this process will not refresh anything that is stored now."""
    return any(e["due"] == 0 for e in sidecar.logged("background_refresh_pass"))


async def test_background_refreshers_of_four_processes_refresh_once(
    cluster: Cluster, shared_store: SharedStore
) -> None:
    """With no requests at all, every replica's background refresher finds the expired
    account due at start. The token endpoint holds its answer; the other three refreshers find
    the lock taken and skip the account without waiting for it. Once the answer is stored,
    nobody refreshes again."""
    cluster.idp.gate = asyncio.Event()
    processes, seed = await start_replicas(cluster, shared_store, background_refresh=True)
    await asyncio.wait_for(cluster.idp.arrived.wait(), 30)

    async def others_skipped() -> bool:
        return sum(bool(p.logged("refresh_lock_busy")) for p in processes) == PROCESSES - 1

    await eventually(others_skipped, "the other refreshers skip the taken lock", 30)
    assert await shared_store.lock_waiters() == 0  # nobody queues behind the holder
    cluster.idp.gate.set()

    async def all_settled() -> bool:
        return all(passed_with_nothing_due(p) for p in processes)

    await eventually(all_settled, "every refresher finds nothing due", 30)
    results = await burst(processes, 5)
    report("background refreshers", processes, results, cluster.idp.calls)
    print({p.name: lock_figures(p) for p in processes})
    assert_refreshed_once(cluster, processes, results, seed)
    background = [e for p in processes for e in p.logged("refresh_lock_acquired")]
    assert sum(e["blocking"] is False for e in background) >= 1  # the refresher's own try


MANY_ACCOUNTS = 40


async def test_background_refreshers_split_many_due_accounts(
    cluster: Cluster, shared_store: SharedStore
) -> None:
    """Four replicas start with 40 expired accounts and no requests. Their refreshers split
    the accounts: each is refreshed exactly once, with the refresh token the fake issued for
    it, no replica ever waits for another's lock, and each replica refreshes some.

    The token endpoint holds its answers until every replica has come to the first account
    (all start with it) and taken some lock: nothing can be stored meanwhile, so three of them
    must skip the first account, and every replica is refreshing an account of its own."""
    idp = cluster.idp
    configs = {
        f"sidecar-{i}": cluster.config(
            f"sidecar-{i}",
            shared_store.url,
            provider={"timeout_seconds": 120},  # the held answers must not time out
            background_refresh=True,
        )
        for i in range(PROCESSES)
    }
    seeds = {f"user-{i:03d}": idp.grant(f"user-{i:03d}") for i in range(MANY_ACCOUNTS)}
    await cluster.import_many_expired(configs["sidecar-0"], seeds)
    idp.gate = asyncio.Event()
    started = time.perf_counter()
    processes = await cluster.start(configs)
    first = min(seeds)

    def came_to_first(p: SidecarProcess) -> bool:
        tried = p.logged("refresh_lock_acquired") + p.logged("refresh_lock_busy")
        return any(e["account"] == first for e in tried)

    async def all_working() -> bool:
        return all(came_to_first(p) and p.logged("refresh_lock_acquired") for p in processes)

    await eventually(all_working, "every replica took a lock and came to the first account", 60)
    assert sum(e["account"] == first for p in processes for e in p.logged("refresh_lock_busy")) >= (
        PROCESSES - 1
    )
    idp.gate.set()

    async def all_settled() -> bool:
        return all(passed_with_nothing_due(p) for p in processes)

    await eventually(all_settled, "every refresher finds nothing due", 60)
    elapsed = time.perf_counter() - started
    figures = {p.name: lock_figures(p) for p in processes}
    print(
        f"{MANY_ACCOUNTS} accounts, {PROCESSES} replicas: token endpoint calls = {idp.calls}, "
        f"reuse detected = {idp.reuse_detected}, {elapsed:.1f}s from start to settled"
    )
    for name, numbers in figures.items():
        print(f"  {name}: {numbers}")
    detail = cluster.logs()
    assert idp.calls == MANY_ACCOUNTS, detail
    assert idp.reuse_detected == 0, detail
    assert sorted(r["refresh_token"] for r in idp.requests) == sorted(r for _, r in seeds.values())
    assert sum(f["refreshed"] for f in figures.values()) == MANY_ACCOUNTS
    assert all(f["refreshed"] >= 1 for f in figures.values()), figures
    assert all(f["waited for the lock"] == 0 for f in figures.values()), figures
    assert not any(p.logged("background_refresh_failed") for p in processes), detail


async def test_the_fake_detects_reuse_when_processes_do_not_share_a_store(
    cluster: Cluster, secrets_dir: Path
) -> None:
    """The control: two sidecars with separate stores both hold the same expired pair. The
    second presents the refresh token the first already rotated away; the fake sees the reuse,
    revokes the family, and the second sidecar reports reauthorization_required."""
    configs = {
        name: cluster.config(name, f"sqlite://{secrets_dir / name}.db") for name in ("a", "b")
    }
    access, refresh = cluster.idp.grant(ACCOUNT)
    for config in configs.values():
        await cluster.import_expired(config, access, refresh)
    first, second = await cluster.start(configs)
    assert [(r.status, r.process) for r in await burst([first], 1)] == [(200, "a")]
    async with (
        aiohttp.ClientSession() as session,
        session.get(second.url("api") + "/items") as response,
    ):
        assert response.status == 401
        assert response.headers["X-Sidecar-Error"] == "reauthorization_required"
    idp = cluster.idp
    assert idp.calls == 2
    assert [r["refresh_token"] for r in idp.requests] == [refresh, refresh]
    assert idp.reuse_detected == 1
    assert idp.valid_refresh == set()  # the first sidecar's new refresh token is revoked too
