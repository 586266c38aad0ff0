"""Background refresh and refresh-token keepalive, driven by the injected clock."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from aiohttp import web

from sidecar.config import ProviderConfig
from sidecar.credentials.refresher import SKIPPED_RECHECK_SECONDS, account_jitter, next_refresh_at
from sidecar.store import open_store
from sidecar.store import sqlite as sqlite_backend
from tests.conftest import sample, seed
from tests.test_store_contract import eventually, flock_waiters

DAY = 86400.0


def provider(**kw: object) -> ProviderConfig:
    base = ProviderConfig(name="p", token_url="http://x/t", grant="refresh_token", client_id="c")
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_schedule_is_a_fraction_of_lifetime_with_stable_jitter() -> None:
    p = provider(refresh_lead_fraction=0.2, refresh_jitter_fraction=0.1)
    at = next_refresh_at(p, "alice", expires_at=4600.0, refreshed_at=1000.0)  # 1 h lifetime
    jitter = account_jitter("p", "alice")
    assert 0 <= jitter < 1 and jitter == account_jitter("p", "alice")
    assert at == pytest.approx(4600 - 720 - jitter * 360)
    assert 4600 - 720 - 360 < at <= 4600 - 720
    spread = {next_refresh_at(p, f"u{i}", 4600.0, 1000.0) for i in range(200)}
    assert len(spread) == 200 and max(spread) - min(spread) > 300  # not all at once


def test_fixed_lead_is_capped_at_half_the_lifetime() -> None:
    p = provider(refresh_lead_fraction=0.2, refresh_lead_seconds=300, refresh_jitter_fraction=0)
    assert next_refresh_at(p, "a", expires_at=1000 + 3600, refreshed_at=1000) == 4600 - 720
    p = provider(refresh_lead_fraction=0, refresh_lead_seconds=900, refresh_jitter_fraction=0)
    assert next_refresh_at(p, "a", expires_at=1000 + 3600, refreshed_at=1000) == 4600 - 900
    assert next_refresh_at(p, "a", expires_at=1020, refreshed_at=1000) == 1010  # 20 s tokens
    assert next_refresh_at(provider(), "a", expires_at=None, refreshed_at=1000) is None


def test_keepalive_before_refresh_token_lapses() -> None:
    p = provider(refresh_token_lifetime_seconds=10 * DAY, refresh_jitter_fraction=0)
    at = next_refresh_at(p, "a", expires_at=None, refreshed_at=0.0)
    assert at == pytest.approx(9 * DAY)  # refresh_lead_fraction (0.1) of it left


async def test_refreshes_due_accounts_only(make_sidecar, idp, api, clock) -> None:
    sidecar = await make_sidecar()
    await seed(sidecar, idp, api, clock, account="soon", expires_in=600)
    await seed(sidecar, idp, api, clock, account="later", expires_in=3600)
    clock.advance(600 - 60)  # "soon" is inside its lead (20 % of 600 s = 120 s)
    next_due = await sidecar.refresher.run_once()
    assert idp.calls == 1 and idp.requests[0]["refresh_token"] == "soon-refresh-1"
    assert next_due is not None and clock() < next_due < clock() + 3600
    assert await sidecar.refresher.run_once() is not None
    assert idp.calls == 1  # the refreshed token is fresh again: nothing due


async def test_keepalive_refreshes_idle_account(make_sidecar, idp, api, clock) -> None:
    sidecar = await make_sidecar(provider={"refresh_token_lifetime_seconds": 10 * DAY})
    await seed(sidecar, idp, api, clock, account="idle", expires_in=None)
    clock.advance(8 * DAY - 1)  # the earliest is 9 days minus the jitter (up to a tenth)
    await sidecar.refresher.run_once()
    assert idp.calls == 0
    clock.advance(1 * DAY + 1)
    await sidecar.refresher.run_once()
    assert idp.calls == 1
    row = await sidecar.store.get("example", "idle")
    assert row is not None and row.refreshed_at == clock()


async def test_concurrency_is_bounded_per_provider(make_sidecar, idp, api, clock) -> None:
    sidecar = await make_sidecar(
        provider={"max_concurrent_refreshes": 3, "max_refreshes_per_second": 1000}
    )
    for i in range(12):
        await seed(sidecar, idp, api, clock, account=f"u{i}", expires_in=10)
    clock.advance(9)
    idp.gate = asyncio.Event()
    run = asyncio.ensure_future(sidecar.refresher.run_once())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while idp.in_flight < 3:
        assert loop.time() < deadline
        await asyncio.sleep(0.005)
    idp.gate.set()
    await run
    assert idp.calls == 12 and idp.max_in_flight == 3
    assert idp.reuse_detected == 0


async def test_restart_derives_schedule_from_store(make_sidecar, idp, api, clock) -> None:
    first = await make_sidecar()
    for i in range(5):
        await seed(first, idp, api, clock, account=f"u{i}", expires_in=3600)
    await first.stop()
    second = await make_sidecar()  # same database file
    await second.refresher.run_once()
    assert idp.calls == 0  # no storm after a restart
    clock.advance(3600 - 60)
    await second.refresher.run_once()
    assert idp.calls == 5


async def test_background_loop_runs_in_the_app(make_sidecar, idp, api, clock) -> None:
    sidecar = await make_sidecar(sidecar={"background_refresh": True})
    await seed(sidecar, idp, api, clock, expires_in=30)
    clock.advance(29)
    sidecar.refresher.wake()  # as an import does; otherwise the loop rescans on its own
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while idp.calls < 1:
        assert loop.time() < deadline, "background refresh did not happen"
        await asyncio.sleep(0.01)
    assert (await sidecar.credentials._load("example", "main")).token.access_token == "access-2"


async def test_failing_provider_slows_every_refresh(make_sidecar, idp, api, clock) -> None:
    sidecar = await make_sidecar(
        provider={"max_concurrent_refreshes": 1, "max_refreshes_per_second": 1000}
    )
    for i in range(10):
        await seed(sidecar, idp, api, clock, account=f"u{i}", expires_in=10)
    clock.advance(9)
    idp.script.extend([lambda: web.Response(status=502)] * 10)
    await sidecar.refresher.run_once()
    assert idp.calls == 3  # then the provider is backed off as a whole
    idp.script.clear()  # the provider recovers
    clock.advance(400)  # past every backoff
    await sidecar.refresher.run_once()
    assert idp.calls == 13
    rows = await sidecar.store.rows("example")
    assert all(r.refreshed_at == clock() for r in rows)


async def test_lost_answer_then_invalid_grant_is_refresh_outcome_lost(
    make_sidecar,
    idp,
    api,
    clock,
    client,
) -> None:
    sidecar = await make_sidecar()
    seeded = await seed(sidecar, idp, api, clock, expires_in=30, lifetime=3600)
    clock.advance(25)
    idp.drop_answers = 1  # the provider rotates, but the answer never arrives
    await sidecar.refresher.run_once()
    assert idp.calls == 1
    sent = await sidecar.store.get("example", "main")
    assert sent is not None and sent.refresh_attempt_at == clock()  # recorded before sending
    # The current access token is still valid: requests keep flowing meanwhile.
    async with client.get(sidecar.url("api") + "/x") as resp:
        assert resp.status == 200
        assert (await resp.json())["token"] == seeded.access_token
    clock.advance(5)  # past the backoff; the same refresh token is presented again
    await sidecar.refresher.run_once()
    assert [r["refresh_token"] for r in idp.requests] == [seeded.refresh_token] * 2
    assert idp.reuse_detected == 1  # the fake saw it: this is what a real provider punishes
    row = await sidecar.store.get("example", "main")
    assert row is not None
    assert (row.state, row.state_reason) == ("reauthorization_required", "refresh_outcome_lost")


async def test_lost_answer_retried_successfully_when_provider_did_not_rotate(
    make_sidecar,
    idp,
    api,
    clock,
) -> None:
    sidecar = await make_sidecar()
    seeded = await seed(sidecar, idp, api, clock, expires_in=30, lifetime=3600)
    clock.advance(25)
    idp.rotate = False  # this provider keeps refresh tokens: the lost answer cost nothing
    idp.drop_answers = 1
    await sidecar.refresher.run_once()
    clock.advance(5)
    await sidecar.refresher.run_once()
    assert [r["refresh_token"] for r in idp.requests] == [seeded.refresh_token] * 2
    row = await sidecar.store.get("example", "main")
    assert row is not None and row.state == "active"
    assert (await sidecar.credentials._load("example", "main")).token.access_token == "access-3"


async def test_refresh_interrupted_by_a_crash_is_visible_after_restart(
    make_sidecar,
    idp,
    api,
    clock,
) -> None:
    # A shutdown waits for a refresh in flight for no longer than the provider's timeout.
    first = await make_sidecar(provider={"timeout_seconds": 0.5})
    seeded = await seed(first, idp, api, clock, expires_in=30, lifetime=3600)
    clock.advance(25)
    idp.gate = asyncio.Event()  # the provider receives the refresh...
    crashed = asyncio.ensure_future(first.refresher.run_once())
    await asyncio.wait_for(idp.arrived.wait(), 5)
    crashed.cancel()  # ...and the process dies before the answer arrives
    await first.stop()
    idp.gate.set()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while idp.in_flight:  # the provider finishes: it has rotated the refresh token
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    second = await make_sidecar()  # restart on the same database
    row = await second.store.get("example", "main")
    assert row is not None and row.refresh_attempt_at is not None
    await second.refresher.run_once()  # its holder may still write a pair: left alone
    assert len(idp.requests) == 1
    clock.advance(30)  # unconcluded_refresh_wait_seconds: the holder is gone
    await second.refresher.run_once()
    assert [r["refresh_token"] for r in idp.requests] == [seeded.refresh_token] * 2
    row = await second.store.get("example", "main")
    assert row is not None
    assert (row.state, row.state_reason) == ("reauthorization_required", "refresh_outcome_lost")
    assert row.refresh_attempt_at is None


async def test_background_refresh_skips_an_account_another_replica_holds(
    make_sidecar, idp, api, clock
) -> None:
    """Another replica (a second store on the same file) holds the account's lock: the pass
    skips the account at once, counts the skip, records no backoff and looks again soon."""
    sidecar = await make_sidecar()
    await seed(sidecar, idp, api, clock, expires_in=30)
    clock.advance(29)
    other = await open_store(sidecar.config.store.url)
    try:
        async with other.hold("example", "main"):
            next_due = await asyncio.wait_for(sidecar.refresher.run_once(), 10)
            assert idp.calls == 0 and next_due == clock() + SKIPPED_RECHECK_SECONDS
            skipped = sample(
                sidecar, "sidecar_background_refreshes_skipped_total", provider="example"
            )
            assert skipped == 1
            assert sidecar.credentials.retry_at("example", "main") is None
        await sidecar.refresher.run_once()  # the next pass: the lock is free now
        assert idp.calls == 1 and idp.reuse_detected == 0
    finally:
        await other.close()


async def test_a_request_needing_an_account_the_background_skipped_waits_for_the_lock(
    make_sidecar, idp, api, clock
) -> None:
    """A request arriving with the background flight refused does not take that refusal for
    an answer: its own flight waits for the other replica's lock, then refreshes once."""
    sidecar = await make_sidecar()
    await seed(sidecar, idp, api, clock, expires_in=30)
    clock.advance(29)  # inside the 60 s skew: a request needs a refresh too
    credentials = sidecar.credentials
    other = await open_store(sidecar.config.store.url)
    lock = sqlite_backend.lock_file(
        sqlite_backend.lock_dir(sqlite_backend.sqlite_path(sidecar.config.store.url)),
        "example",
        "main",
    )
    try:
        async with other.hold("example", "main"):
            background = asyncio.ensure_future(
                credentials.refresh_if("example", "main", lambda cred: True)
            )
            await asyncio.sleep(0)  # the background flight is under way
            request = asyncio.ensure_future(credentials.refresh("example", "main", failed=None))
            assert await asyncio.wait_for(background, 10) is None

            async def request_waits() -> bool:
                return flock_waiters(lock) == 1

            await eventually(request_waits, "the request's flight waits for the lock")
            assert not request.done() and idp.calls == 0
        token = await asyncio.wait_for(request, 10)
        assert idp.calls == 1 and token.access_token == idp.issued_access[-1]
    finally:
        await other.close()


async def test_a_request_during_a_background_refresh_uses_its_result(
    make_sidecar, idp, api, clock
) -> None:
    """The background flight holds the lock and is waiting for the token endpoint; a request
    for the same account waits for that flight and uses its new token: one call."""
    sidecar = await make_sidecar()
    await seed(sidecar, idp, api, clock, expires_in=30)
    clock.advance(29)
    credentials = sidecar.credentials
    idp.gate = asyncio.Event()
    background = asyncio.ensure_future(credentials.refresh_if("example", "main", lambda c: True))
    await asyncio.wait_for(idp.arrived.wait(), 10)
    request = asyncio.ensure_future(credentials.refresh("example", "main", failed=None))
    idp.gate.set()
    refreshed = await asyncio.wait_for(background, 10)
    token = await asyncio.wait_for(request, 10)
    assert refreshed is not None and token == refreshed.token
    assert idp.calls == 1 and token.access_token == idp.issued_access[-1]
