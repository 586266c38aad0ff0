"""Token lifecycle through the real proxy: freshness, single-flight, retry once, rotation,
fatal and transient token-endpoint errors. Time moves only by the injected clock."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from sidecar.model import Token, TokenState
from tests.conftest import sample, seed
from tests.fakes import FakeTokenEndpoint, FakeUpstream, ManualClock, oauth_error
from tests.test_store_contract import eventually


async def get(
    client: aiohttp.ClientSession, url: str, account: str | None = None, **kw: object
) -> tuple[int, dict[str, str], dict[str, object]]:
    headers = {"X-Sidecar-Account": account} if account else {}
    async with client.get(url, headers=headers, **kw) as resp:  # type: ignore[arg-type]
        return resp.status, dict(resp.headers), await resp.json()


def test_freshness_is_a_pure_function_of_token_time_and_skew() -> None:
    token = Token("a", "r", expires_at=1000.0)
    assert token.state(now=939.0, skew=60) is TokenState.FRESH
    assert token.state(now=940.0, skew=60) is TokenState.STALE
    assert token.state(now=999.9, skew=60) is TokenState.STALE
    assert token.state(now=1000.0, skew=60) is TokenState.INVALID
    assert Token("a").state(now=1e12, skew=60) is TokenState.FRESH  # no expiry given


async def test_expiry_is_absolute_from_receipt(make_sidecar, idp, api, clock, client) -> None:
    sidecar = await make_sidecar()
    # Inside the 60 s skew: STALE (a 1-h token near its end)
    await seed(sidecar, idp, api, clock, expires_in=30, lifetime=3600)
    idp.expires_in = 600
    api.valid.add("access-2")
    status, _, body = await get(client, sidecar.url("api") + "/x")
    assert (status, body["token"], idp.calls) == (200, "access-2", 1)
    stored = await sidecar.credentials._load("example", "main")
    assert stored.token.expires_at == clock() + 600
    clock.advance(539)  # 61 s left: still fresh, no refresh
    api.valid.add("access-3")
    assert (await get(client, sidecar.url("api") + "/x"))[2]["token"] == "access-2"
    assert idp.calls == 1
    clock.advance(2)  # 59 s left: STALE, refreshed before the request goes out
    assert (await get(client, sidecar.url("api") + "/x"))[2]["token"] == "access-3"
    assert idp.calls == 2


async def test_hundred_concurrent_requests_cause_one_refresh(
    make_sidecar,
    idp: FakeTokenEndpoint,
    api: FakeUpstream,
    clock: ManualClock,
    client,
) -> None:
    sidecar = await make_sidecar()
    await seed(sidecar, idp, api, clock, expires_in=3600)
    clock.advance(3601)  # expired
    api.valid.add("access-2")
    idp.gate = asyncio.Event()
    requests = [asyncio.ensure_future(get(client, sidecar.url("api") + "/x")) for _ in range(100)]
    await asyncio.wait_for(idp.arrived.wait(), 5)
    # Let every request reach the sidecar and join the flight before the refresh completes.
    deadline = asyncio.get_running_loop().time() + 5
    while sample(sidecar, "sidecar_refresh_waiters_coalesced_total", provider="example") < 99:
        assert asyncio.get_running_loop().time() < deadline, "requests did not coalesce"
        await asyncio.sleep(0.005)
    idp.gate.set()
    results = await asyncio.gather(*requests)
    assert idp.calls == 1
    assert {(status, body["token"]) for status, _, body in results} == {(200, "access-2")}
    assert api.seen_auth.count("Bearer " + "seed-access-1") == 0  # expired token never sent


async def test_different_accounts_refresh_concurrently(
    make_sidecar, idp, api, clock, client
) -> None:
    sidecar = await make_sidecar()
    await seed(sidecar, idp, api, clock, account="alice", expires_in=10, lifetime=3600)
    await seed(sidecar, idp, api, clock, account="bob", expires_in=10, lifetime=3600)
    api.valid.update({"access-3", "access-4"})
    idp.gate = asyncio.Event()
    reqs = [
        asyncio.ensure_future(get(client, sidecar.url("api") + "/x", account=a))
        for a in ("alice", "bob")
    ]
    deadline = asyncio.get_running_loop().time() + 5
    while idp.in_flight < 2:  # both refreshes are at the token endpoint at the same time
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.005)
    idp.gate.set()
    results = await asyncio.gather(*reqs)
    assert idp.calls == 2 and idp.max_in_flight == 2
    assert sorted(body["token"] for _, _, body in results) == ["access-3", "access-4"]


async def test_401_refreshes_once_and_replays_with_body(
    make_sidecar, idp, api, clock, client
) -> None:
    sidecar = await make_sidecar()
    token = await seed(sidecar, idp, api, clock)
    api.valid.discard(token.access_token)  # revoked upstream, unexpired by our clock
    api.valid.add("access-2")
    async with client.post(sidecar.url("api") + "/items", data=b"payload-123") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["token"] == "access-2" and body["body_length"] == 11
    assert [s["body"] for s in api.seen] == [b"payload-123", b"payload-123"]
    assert idp.calls == 1
    assert sample(sidecar, "sidecar_retries_total", upstream="api", outcome="replayed") == 1


@pytest.mark.parametrize("warm", [False, True], ids=["new-connection", "pooled-connection"])
async def test_401_on_a_get_refreshes_once_and_replays(
    make_sidecar, idp, api, clock, client, warm: bool
) -> None:
    """Both ways a GET is forwarded: from a coroutine on a new upstream connection, and from
    the I/O callbacks of a pooled one (the fast path), which hands the 401 to the coroutine."""
    sidecar = await make_sidecar()
    token = await seed(sidecar, idp, api, clock)
    if warm:
        assert (await get(client, sidecar.url("api") + "/warm"))[0] == 200
    api.valid.discard(token.access_token)  # revoked upstream, unexpired by our clock
    api.valid.add("access-2")
    requests = [get(client, sidecar.url("api") + "/x") for _ in range(5)]
    answers = await asyncio.gather(*requests)
    assert [(status, body["token"]) for status, _, body in answers] == [(200, "access-2")] * 5
    assert idp.calls == 1
    assert api.seen_auth.count("Bearer access-2") == 5
    assert (
        sample(sidecar, "sidecar_requests_total", upstream="api", method="GET", status_class="2xx")
        == 5 + warm
    )


async def test_second_invalid_token_answer_goes_back_unchanged(
    make_sidecar, idp, api, clock, client
) -> None:
    sidecar = await make_sidecar()
    token = await seed(sidecar, idp, api, clock)
    api.valid.clear()  # the API rejects everything
    api.challenge = 'Bearer error="invalid_token"'
    async with client.get(sidecar.url("api") + "/x") as resp:
        assert resp.status == 401
        assert "X-Sidecar-Error" not in resp.headers
        assert resp.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
        assert await resp.json() == {"upstream": "unauthorized"}
    assert api.calls == 2 and idp.calls == 1
    assert api.seen_auth == [f"Bearer {token.access_token}", "Bearer access-2"]


async def test_401_on_an_already_replaced_token_does_not_refresh_again(
    make_sidecar,
    idp,
    api,
    clock,
    client,
) -> None:
    sidecar = await make_sidecar()
    old = await seed(sidecar, idp, api, clock)
    api.valid.discard(old.access_token)
    api.valid.add("access-2")
    # Another request already refreshed: the failed token is no longer the current one.
    new = await sidecar.credentials.refresh("example", "main", failed=old)
    assert new.access_token == "access-2" and idp.calls == 1
    again = await sidecar.credentials.refresh("example", "main", failed=old)
    assert again.access_token == "access-2" and idp.calls == 1


async def test_challenge_required_mode_ignores_plain_401(
    make_sidecar, idp, api, clock, client
) -> None:
    sidecar = await make_sidecar(
        upstream={"require_invalid_token_challenge": True, "retry_statuses": [401, 403]}
    )
    token = await seed(sidecar, idp, api, clock)
    api.valid.discard(token.access_token)
    api.challenge = 'Bearer realm="x", error="insufficient_scope"'
    assert (await get(client, sidecar.url("api") + "/x"))[0] == 401
    assert idp.calls == 0 and api.calls == 1
    api.challenge = 'Bearer realm="x", error="invalid_token", error_description="expired"'
    api.valid.add("access-2")
    status, _, body = await get(client, sidecar.url("api") + "/x")
    assert (status, body["token"], idp.calls) == (200, "access-2", 1)


async def test_large_body_is_streamed_and_not_replayed(
    make_sidecar, idp, api, clock, client
) -> None:
    sidecar = await make_sidecar(upstream={"replay_limit_bytes": 1024})
    token = await seed(sidecar, idp, api, clock)
    api.valid.discard(token.access_token)
    api.valid.add("access-2")
    async with client.post(sidecar.url("api") + "/upload", data=b"z" * 5000) as resp:
        assert resp.status == 401  # not replayable: the app sees the first answer
    assert sample(sidecar, "sidecar_retries_total", upstream="api", outcome="not_replayable") == 1
    assert idp.calls == 1  # refreshed anyway, so the app's own retry succeeds
    async with client.post(sidecar.url("api") + "/upload", data=b"z" * 5000) as resp:
        assert (resp.status, await resp.json()) == (200, {"received": 5000})


async def test_chunked_body_under_the_limit_is_replayed(
    make_sidecar, idp, api, clock, client
) -> None:
    sidecar = await make_sidecar(upstream={"replay_limit_bytes": 1024})
    token = await seed(sidecar, idp, api, clock)
    api.valid.discard(token.access_token)
    api.valid.add("access-2")

    async def chunks():
        yield b"ab"
        yield b"cd"

    async with client.post(sidecar.url("api") + "/items", data=chunks()) as resp:
        assert resp.status == 200
        assert (await resp.json())["body_length"] == 4
    assert [s["body"] for s in api.seen] == [b"abcd", b"abcd"]


async def test_rotation_persists_before_use_and_never_resends(
    make_sidecar, idp, api, clock, client
) -> None:
    sidecar = await make_sidecar()
    seeded = await seed(sidecar, idp, api, clock, expires_in=10, lifetime=3600)
    api.valid.update({"access-2", "access-3"})
    assert (await get(client, sidecar.url("api") + "/x"))[2]["token"] == "access-2"
    stored = await sidecar.credentials._load("example", "main")
    assert stored.token.refresh_token == "refresh-2"
    clock.advance(4000)
    assert (await get(client, sidecar.url("api") + "/x"))[2]["token"] == "access-3"
    presented = [r["refresh_token"] for r in idp.requests]
    assert presented == [seeded.refresh_token, "refresh-2"]
    assert idp.reuse_detected == 0


async def test_refresh_without_refresh_token_keeps_the_old_one(
    make_sidecar, idp, api, clock, client
) -> None:
    sidecar = await make_sidecar()
    seeded = await seed(sidecar, idp, api, clock, expires_in=10, lifetime=3600)
    idp.rotate = False
    api.valid.update({"access-2", "access-3"})
    await get(client, sidecar.url("api") + "/x")
    clock.advance(4000)
    await get(client, sidecar.url("api") + "/x")
    assert [r["refresh_token"] for r in idp.requests] == [seeded.refresh_token] * 2
    assert (await sidecar.credentials._load("example", "main")).token.refresh_token == (
        seeded.refresh_token
    )


@pytest.mark.parametrize("error", ["invalid_grant", "invalid_client"])
async def test_fatal_error_marks_account_and_stops_calling(
    make_sidecar, idp, api, clock, client, error: str
) -> None:
    sidecar = await make_sidecar()
    await seed(sidecar, idp, api, clock, expires_in=10, lifetime=3600)
    idp.script.append(lambda: oauth_error(error, "grant revoked"))
    for _ in range(3):
        status, headers, body = await get(client, sidecar.url("api") + "/x")
        assert status == 401
        assert headers["X-Sidecar-Error"] == "reauthorization_required"
        assert body["error"] == "reauthorization_required" and body["reason"] == error
    assert idp.calls == 1 and api.calls == 0
    row = await sidecar.store.get("example", "main")
    assert row is not None
    assert (row.state, row.state_reason, row.state_changed_at) == (
        "reauthorization_required",
        error,
        clock(),
    )
    assert (
        sample(sidecar, "sidecar_token_refreshes_total", provider="example", result="fatal_error")
        == 1
    )


async def test_fatal_is_read_from_error_field_not_substring(
    make_sidecar, idp, api, clock, client
) -> None:
    sidecar = await make_sidecar()
    await seed(sidecar, idp, api, clock, expires_in=100)
    idp.script.append(lambda: oauth_error("temporarily_unavailable", "not an invalid_grant"))
    status, _, _ = await get(client, sidecar.url("api") + "/x")
    assert status == 200  # transient: the unexpired token keeps being used
    row = await sidecar.store.get("example", "main")
    assert row is not None and row.state == "active"


def _garbage_answers() -> list[web.Response]:
    return [
        web.Response(status=500, text="boom"),
        web.Response(status=429, headers={"Retry-After": "30"}),
        web.Response(status=200, text="<html>not json</html>"),
        web.json_response({"token_type": "Bearer"}),  # no access_token
        web.json_response({"access_token": "x", "token_type": "mac"}),
        web.json_response({"access_token": "x", "expires_in": "soon"}),
    ]


@pytest.mark.parametrize("answer", range(6))
async def test_transient_error_keeps_tokens_and_unexpired_token(
    make_sidecar, idp, api, clock, client, answer: int
) -> None:
    sidecar = await make_sidecar()
    seeded = await seed(sidecar, idp, api, clock, expires_in=30, lifetime=3600)  # STALE
    before = await sidecar.store.get("example", "main")
    idp.script.append(lambda: _garbage_answers()[answer])
    status, _, body = await get(client, sidecar.url("api") + "/x")
    assert (status, body["token"]) == (200, seeded.access_token)
    assert await sidecar.store.get("example", "main") == before  # untouched
    # Backing off: the next request does not call the token endpoint again.
    assert (await get(client, sidecar.url("api") + "/x"))[0] == 200
    assert idp.calls == 1


async def test_expired_token_and_failing_endpoint_give_503(
    make_sidecar, idp, api, clock, client
) -> None:
    sidecar = await make_sidecar()
    seeded = await seed(sidecar, idp, api, clock, expires_in=30)
    clock.advance(31)
    idp.script.append(lambda: web.Response(status=503))
    status, headers, body = await get(client, sidecar.url("api") + "/x")
    assert status == 503 and body["error"] == "token_unavailable"
    assert headers["X-Sidecar-Error"] == "token_unavailable"
    retry_after = int(headers["Retry-After"])
    assert 1 <= retry_after <= 5  # backoff_initial_seconds = 5, with jitter
    assert api.calls == 0  # an expired token is never injected
    # During the backoff nothing is retried; after it, the refresh succeeds.
    assert (await get(client, sidecar.url("api") + "/x"))[0] == 503
    assert idp.calls == 1
    clock.advance(retry_after)
    api.valid.add("access-2")
    status, _, body = await get(client, sidecar.url("api") + "/x")
    assert (status, body["token"], idp.calls) == (200, "access-2", 2)
    assert seeded.access_token not in {a.removeprefix("Bearer ") for a in api.seen_auth if a}
    assert sample(sidecar, "sidecar_expired_token_injections_total", upstream="api") == 0


async def test_backoff_grows_exponentially(make_sidecar, idp, api, clock, client) -> None:
    # Recovery probes capped far away: the exponential shows (by default it stops at 5 s).
    sidecar = await make_sidecar(provider={"recovery_probe_seconds": 1000})
    await seed(sidecar, idp, api, clock, expires_in=0)
    waits = []
    for _ in range(4):
        idp.script.append(lambda: web.Response(status=500))
        _, headers, _ = await get(client, sidecar.url("api") + "/x")
        waits.append(int(headers["Retry-After"]))
        clock.advance(waits[-1])
    assert idp.calls == 4
    # Full jitter within [ceiling/2, ceiling], ceilings 5, 10, 20, 40.
    for wait, ceiling in zip(waits, (5, 10, 20, 40), strict=True):
        assert ceiling / 2 <= wait <= ceiling


async def test_unknown_account(make_sidecar, idp, api, clock, client) -> None:
    sidecar = await make_sidecar()
    status, headers, body = await get(client, sidecar.url("api") + "/x", account="nobody")
    assert (status, headers["X-Sidecar-Error"], body["error"]) == (
        404,
        "unknown_account",
        "unknown_account",
    )
    assert api.calls == 0


async def test_account_header_is_required_without_default(
    secrets_dir, idp, api, clock, client
) -> None:
    from prometheus_client import CollectorRegistry

    from sidecar import config as config_module
    from sidecar.app import Sidecar
    from tests.conftest import base_config

    raw = base_config(secrets_dir, idp.url, api.url)
    del raw["upstream"][0]["default_account"]
    sidecar = await Sidecar.start(
        config_module.parse(raw, {}, secrets_dir), clock=clock, registry=CollectorRegistry()
    )
    try:
        await seed(sidecar, idp, api, clock, account="alice")
        status, headers, body = await get(client, sidecar.url("api") + "/x")
        assert (status, headers["X-Sidecar-Error"]) == (400, "account_required")
        status, _, body = await get(client, sidecar.url("api") + "/x", account="alice")
        assert status == 200 and body["token"].startswith("alice-access")
        assert "x-sidecar-account" not in {k.lower() for k in api.seen[-1]["headers"]}
    finally:
        await sidecar.stop()


async def test_client_credentials_grant(make_sidecar, idp, api, clock, client) -> None:
    sidecar = await make_sidecar(
        provider={
            "grant": "client_credentials",
            "scopes": ["read"],
            "auth_method": "client_secret_post",
        }
    )
    api.valid.update({"access-1", "access-2"})
    status, _, body = await get(client, sidecar.url("api") + "/x")
    assert (status, body["token"]) == (200, "access-1")
    assert idp.requests[0] == {
        "grant_type": "client_credentials",
        "scope": "read",
        "client_id": "client-1",
        "client_secret": "s3cr3t-client-value",
    }
    assert (await get(client, sidecar.url("api") + "/x"))[2]["token"] == "access-1"
    clock.advance(3600)
    assert (await get(client, sidecar.url("api") + "/x"))[2]["token"] == "access-2"
    assert idp.calls == 2


async def test_client_secret_basic_is_form_encoded(make_sidecar, idp, api, clock, client) -> None:
    from tests.fakes import basic_credentials

    sidecar = await make_sidecar()
    await seed(sidecar, idp, api, clock, expires_in=0)
    api.valid.add("access-2")
    await get(client, sidecar.url("api") + "/x")
    assert basic_credentials(idp.auth_headers[0]) == ("client-1", "s3cr3t-client-value")
    assert "client_secret" not in idp.requests[0]


async def test_new_refresh_token_is_not_used_until_persisted(
    make_sidecar, idp, api, clock, client
) -> None:
    """A store failure after a rotation keeps the new pair in memory: its access token is
    served (the provider issued it), the old refresh token is not sent again, and the pair is
    written once the store is back, without waiting for a request."""
    sidecar = await make_sidecar()
    seeded = await seed(sidecar, idp, api, clock, expires_in=0)
    api.valid.add("access-2")
    store = sidecar.store
    original = store.compare_and_swap
    failing = True

    async def flaky(row, expected_version):  # the SQLite file is fine; simulate an outage
        from sidecar.errors import StoreError

        if failing:
            raise StoreError("disk full")
        return await original(row, expected_version)

    store.compare_and_swap = flaky  # type: ignore[method-assign]
    for _ in range(2):
        status, _, body = await get(client, sidecar.url("api") + "/x")
        assert (status, body["token"]) == (200, "access-2")
    assert [r["refresh_token"] for r in idp.requests] == [seeded.refresh_token]
    failing = False

    async def written() -> bool:
        row = await store.get("example", "main")
        return row is not None and row.version == 2

    await eventually(written, "the pair is written once the store takes it", 10)
    assert [r["refresh_token"] for r in idp.requests] == [seeded.refresh_token]
    assert (await sidecar.credentials._load("example", "main")).token.refresh_token == "refresh-2"


async def test_store_outage_keeps_serving_a_valid_cached_token(
    make_sidecar, idp, api, clock, client
) -> None:
    sidecar = await make_sidecar()
    # STALE: wants a refresh (a 1-h token near its end)
    seeded = await seed(sidecar, idp, api, clock, expires_in=30, lifetime=3600)
    api.valid.add("access-2")
    status, _, body = await get(client, sidecar.url("api") + "/x")
    assert (status, body["token"]) == (200, "access-2")
    clock.advance(3600 - 30)  # STALE again
    await sidecar.store.close()  # the store goes away
    status, _, body = await get(client, sidecar.url("api") + "/x")
    assert (status, body["token"]) == (200, "access-2")  # still valid: keeps flowing
    assert idp.calls == 1 and seeded.access_token not in body["token"]
    clock.advance(31)  # now expired: never injected, a clear 503 instead
    status, headers, _ = await get(client, sidecar.url("api") + "/x")
    assert (status, headers["X-Sidecar-Error"]) == (503, "token_unavailable")
