"""SIGTERM during a refresh: the answer is stored before the process exits, so no replica ever
presents the rotated-away refresh token (a pod rollout must never kill an account).

Real ``sidecar run`` processes on one store (a SQLite file, or a PostgreSQL schema). The fake
token endpoint rotates on arrival, detects reuse, and holds its answer until the test has sent
SIGTERM and the process has begun to stop.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from sidecar import config as config_module
from sidecar.credentials.codec import unseal
from sidecar.crypto import TokenCipher
from sidecar.model import Token
from sidecar.store import open_store
from tests.fakes import FakeTokenEndpoint
from tests.test_multiprocess import ACCOUNT, PROVIDER, Cluster, SidecarProcess
from tests.test_store_contract import eventually

pytest_plugins = ("tests.pg",)


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, secrets_dir: Path) -> str:
    if request.param == "postgres":
        return str(request.getfixturevalue("pg_schema").url)
    return f"sqlite://{secrets_dir / 'shared.db'}"


@pytest.fixture
async def cluster(
    secrets_dir: Path, idp: FakeTokenEndpoint, refreshed_only_upstream: str
) -> AsyncIterator[Cluster]:
    """Processes whose upstream accepts only access tokens the fake issued by refreshing."""

    running = Cluster(secrets_dir, idp, refreshed_only_upstream)
    try:
        yield running
    finally:
        await running.stop()


async def stored_token(config: Path) -> tuple[Token, float | None]:
    """The account's pair as the store holds it, and its unconcluded refresh mark."""
    cfg = config_module.load(config, {})
    store = await open_store(cfg.store.url)
    try:
        row = await store.get(PROVIDER, ACCOUNT)
    finally:
        await store.close()
    assert row is not None
    return unseal(TokenCipher(cfg.store.keys), row).token, row.refresh_attempt_at


async def stopping(process: SidecarProcess) -> None:
    async def began() -> bool:
        return bool(process.logged("stopping"))

    await eventually(began, f"{process.name} begins to stop", 30)


async def test_sigterm_during_a_refresh_stores_the_new_pair_before_exiting(
    cluster: Cluster, store_url: str
) -> None:
    idp = cluster.idp
    provider = {"timeout_seconds": 30}  # the held answer must not time out
    first = cluster.config("first", store_url, provider, background_refresh=True)
    access, seed = idp.grant(ACCOUNT)
    await cluster.import_expired(first, access, seed)
    idp.gate = asyncio.Event()
    (process,) = await cluster.start({"first": first})
    await asyncio.wait_for(idp.arrived.wait(), 30)  # the background refresher presented seed

    process.process.send_signal(signal.SIGTERM)
    await stopping(process)
    assert idp.in_flight == 1  # the answer is still held: the process is waiting for it
    released = time.monotonic()
    idp.gate.set()
    assert await asyncio.wait_for(process.process.wait(), 30) == 0
    print(f"exited {time.monotonic() - released:.2f} s after the token endpoint answered")

    token, attempt = await stored_token(first)
    assert token.access_token == idp.issued_access[-1]
    assert token.refresh_token in idp.valid_refresh and token.refresh_token != seed
    assert attempt is None  # the refresh concluded: nobody needs to guess its outcome

    # A second process serves the stored pair, and its own refresh presents the new token.
    second = cluster.config("second", store_url, provider)
    (replica,) = await cluster.start({"second": second})
    async with (
        aiohttp.ClientSession() as session,
        session.get(replica.url("api") + "/items") as response,
    ):
        assert (response.status, (await response.json())["token"]) == (200, token.access_token)
    refresh = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "accounts", "refresh", "--config", str(second),
        "--provider", PROVIDER, "--account", ACCOUNT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(refresh.communicate(), 60)
    assert refresh.returncode == 0, err.decode()
    presented = [r["refresh_token"] for r in idp.requests]
    duplicates = len(presented) - len(set(presented))
    print(f"presented {len(presented)} refresh token(s), {duplicates} duplicate(s), reuse "
          f"detected {idp.reuse_detected}, accounts lost 0 of 1")  # fmt: skip
    assert presented == [seed, token.refresh_token]
    assert idp.reuse_detected == 0


async def test_shutdown_waits_for_a_refresh_no_longer_than_the_provider_timeout(
    cluster: Cluster, secrets_dir: Path
) -> None:
    """A token endpoint that never answers: the process still exits, once the provider's
    timeout_seconds has passed, and the unconcluded refresh stays marked for the next one."""
    idp = cluster.idp
    config = cluster.config(
        "first", f"sqlite://{secrets_dir / 'one.db'}", {"timeout_seconds": 2},
        background_refresh=True,
    )  # fmt: skip
    access, seed = idp.grant(ACCOUNT)
    await cluster.import_expired(config, access, seed)
    idp.gate = asyncio.Event()  # never set
    (process,) = await cluster.start({"first": config})
    await asyncio.wait_for(idp.arrived.wait(), 30)
    signalled = time.monotonic()
    process.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.process.wait(), 30) == 0
    took = time.monotonic() - signalled
    assert took < 2 + 5 + 3, took  # timeout_seconds, the write allowance, process exit
    _, attempt = await stored_token(config)
    assert attempt is not None  # the outcome is unknown: the next refresh treats it so
    events = [json.loads(line)["event"] for line in process.output if line.startswith("{")]
    assert events[-1] == "stopped"
    idp.gate.set()
