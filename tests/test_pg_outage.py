"""A PostgreSQL outage under traffic: valid tokens keep flowing, refreshes wait and resume.

The sidecar reaches PostgreSQL through a TCP relay that the test cuts (every connection
dropped, new ones refused) and restores, as a restart or a network partition would.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from sidecar.credentials.codec import unseal
from sidecar.crypto import TokenCipher
from sidecar.errors import StoreError
from tests.conftest import sample, seed
from tests.relay import Relay
from tests.test_store_contract import eventually

if TYPE_CHECKING:
    from tests.pg import PgSchema

pytest_plugins = ("tests.pg",)
ACCOUNT = "X-Sidecar-Account"


async def test_requests_flow_through_a_postgres_outage_and_the_refresh_resumes(
    make_sidecar, idp, api, clock, client, pg_schema: PgSchema
) -> None:
    relay = Relay.before(pg_schema.url)
    await relay.up()
    sidecar = await make_sidecar(store={"url": relay.url(pg_schema.url)})
    seeded = await seed(sidecar, idp, api, clock, expires_in=3600)
    async with client.get(sidecar.url("api") + "/x") as resp:
        assert resp.status == 200  # the pair is cached now
    clock.advance(3600 - 60)  # STALE: every request wants a refresh; the token is still valid
    api.valid.add("access-2")

    await relay.cut()
    for _ in range(3):
        for _ in range(5):
            async with client.get(sidecar.url("api") + "/x") as resp:
                assert resp.status == 200
                assert (await resp.json())["token"] == seeded.access_token
        clock.advance(6)  # past each refresh backoff: the next request tries again
    assert idp.calls == 0  # no attempt could be recorded, so none reached the provider

    await relay.up()
    clock.advance(6)
    async with client.get(sidecar.url("api") + "/x") as resp:
        assert resp.status == 200
        assert (await resp.json())["token"] == "access-2"  # the refresh resumed
    # One rotation reached the provider, its result is stored, no refresh token was reused.
    assert (idp.calls, idp.reuse_detected) == (1, 0)
    row = await sidecar.store.get("example", "main")
    assert row is not None and row.version == 2
    assert unseal(TokenCipher(sidecar.config.store.keys), row).token.access_token == "access-2"
    await relay.cut()


async def test_an_uncached_account_with_the_store_away_is_503_token_unavailable(
    make_sidecar, idp, api, clock, client, pg_schema: PgSchema
) -> None:
    """A ready replica whose store went away cannot read an account it has not cached yet:
    the app gets 503 token_unavailable with Retry-After (it may pass), never a 500."""
    relay = Relay.before(pg_schema.url)
    await relay.up()
    sidecar = await make_sidecar(store={"url": relay.url(pg_schema.url)})
    for account in ("cached", "cold-1", "cold-2"):
        await seed(sidecar, idp, api, clock, account=account)
    async with client.get(sidecar.url("api") + "/x", headers={ACCOUNT: "cached"}) as resp:
        assert resp.status == 200

    await relay.cut()
    for account in ("cold-1", "cold-2"):
        async with client.get(sidecar.url("api") + "/x", headers={ACCOUNT: account}) as resp:
            assert resp.status == 503
            assert resp.headers["X-Sidecar-Error"] == "token_unavailable"
            assert int(resp.headers["Retry-After"]) >= 1
            assert (await resp.json())["error"] == "token_unavailable"
    async with client.get(sidecar.url("api") + "/x", headers={ACCOUNT: "cached"}) as resp:
        assert resp.status == 200  # a cached, valid token needs no store
    assert sample(sidecar, "sidecar_errors_total", upstream="api", code="internal_error") == 0

    await relay.up()
    async with client.get(sidecar.url("api") + "/x", headers={ACCOUNT: "cold-1"}) as resp:
        assert resp.status == 200  # the store is back: the account is read and served
    await relay.cut()


async def test_a_pair_the_store_refused_is_served_and_written_when_the_store_is_back(
    make_sidecar, idp, api, clock, client, pg_schema: PgSchema
) -> None:
    """The provider rotated and answered, then the store went away before the write. The new
    access token is injected meanwhile (the old one expires), the refresh token is not
    presented again, and the pair is written as soon as the store is back, with no request."""
    relay = Relay.before(pg_schema.url)
    await relay.up()
    sidecar = await make_sidecar(store={"url": relay.url(pg_schema.url)})
    seeded = await seed(sidecar, idp, api, clock, expires_in=3600)
    async with client.get(sidecar.url("api") + "/x") as resp:
        assert resp.status == 200
    clock.advance(3600 - 30)  # STALE: the next request refreshes
    api.valid.add("access-2")
    idp.gate = asyncio.Event()
    first = asyncio.ensure_future(client.get(sidecar.url("api") + "/x"))
    await asyncio.wait_for(idp.arrived.wait(), 10)  # the provider has rotated...
    await relay.cut()  # ...and the store goes away before the answer is written
    idp.gate.set()
    async with await first as resp:
        assert (resp.status, (await resp.json())["token"]) == (200, "access-2")
    clock.advance(60)  # the old access token has expired
    for _ in range(5):
        async with client.get(sidecar.url("api") + "/x") as resp:
            assert (resp.status, (await resp.json())["token"]) == (200, "access-2")
    assert (idp.calls, idp.reuse_detected) == (1, 0)

    await relay.up()
    cipher = TokenCipher(sidecar.config.store.keys)

    async def written() -> bool:
        try:
            row = await sidecar.store.get("example", "main")
        except StoreError:
            return False
        return row is not None and unseal(cipher, row).token.access_token == "access-2"

    await eventually(written, "the pair is written once the store is back", 10)
    row = await sidecar.store.get("example", "main")
    assert row is not None and row.refresh_attempt_at is None and row.version == 2
    assert [r["refresh_token"] for r in idp.requests] == [seeded.refresh_token]
    assert idp.reuse_detected == 0
    await relay.cut()


async def test_a_replica_leaves_the_refresh_token_alone_while_anothers_pair_awaits_its_write(
    make_sidecar, idp, api, clock, client, pg_schema: PgSchema
) -> None:
    """Replica A's refresh reached the provider (rotated), then A lost the store: its lock died
    with the connection and the new pair is in A's memory only. Replica B, whose store is fine,
    takes the lock: it must not present the replaced refresh token (no grace period: reuse
    would kill the account). It waits; A writes the pair when its store is back; B uses it."""
    relay = Relay.before(pg_schema.url)
    await relay.up()
    a = await make_sidecar(store={"url": relay.url(pg_schema.url)})
    b = await make_sidecar(store={"url": pg_schema.url})
    # STALE: the next request refreshes (a 1-h token near its end)
    seeded = await seed(a, idp, api, clock, expires_in=5, lifetime=3600)
    api.valid.add("access-2")
    idp.gate = asyncio.Event()
    first = asyncio.ensure_future(client.get(a.url("api") + "/x"))
    await asyncio.wait_for(idp.arrived.wait(), 10)
    await relay.cut()  # A loses the store while the provider's answer is on its way
    idp.gate.set()
    async with await first as resp:
        assert (resp.status, (await resp.json())["token"]) == (200, "access-2")
    clock.advance(6)  # the seeded access token has expired: B needs a refresh

    failed_with_valid_token = 0
    for _ in range(3):
        async with client.get(b.url("api") + "/x") as resp:
            assert (resp.status, resp.headers["X-Sidecar-Error"]) == (503, "token_unavailable")
            assert int(resp.headers["Retry-After"]) >= 1
        failed_with_valid_token += 1  # A holds a valid token B cannot have yet
    assert [r["refresh_token"] for r in idp.requests] == [seeded.refresh_token]

    await relay.up()  # A writes its pair under the lock within a second
    cipher = TokenCipher(b.config.store.keys)

    async def written() -> bool:
        row = await b.store.get("example", "main")
        return row is not None and unseal(cipher, row).token.access_token == "access-2"

    await eventually(written, "A writes its pair once its store is back", 10)
    async with client.get(b.url("api") + "/x") as resp:
        assert (resp.status, (await resp.json())["token"]) == (200, "access-2")
    presented = [r["refresh_token"] for r in idp.requests]
    print(
        f"duplicate presentations {len(presented) - len(set(presented))}, reuse detected "
        f"{idp.reuse_detected}, accounts lost 0 of 1, requests to B answered 503 while A held "
        f"a valid token: {failed_with_valid_token}"
    )
    assert presented == [seeded.refresh_token] and idp.reuse_detected == 0
    row = await b.store.get("example", "main")
    assert row is not None and (row.state, row.refresh_attempt_at) == ("active", None)
    await relay.cut()
