"""Short-lived tokens with the default configuration: no token is STALE when it is issued.

The token endpoint issues 4-second tokens, far shorter than the default 60-s refresh skew.
Every account is requested every quarter second, and time moves only by the injected clock.
The background refresher is run the way its loop runs it, at the moment ``run_once`` says the
next account is due. Counted: token endpoint calls against the minimum (one per lifetime per
account), and the refreshes that a request had to wait for.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.app import Sidecar
from tests.conftest import seed
from tests.fakes import FakeTokenEndpoint, FakeUpstream, ManualClock

LIFETIME, ACCOUNTS, LIFETIMES, REQUEST_EVERY = 4, 5, 50, 0.25


@dataclass
class ShortLivedTokens(FakeTokenEndpoint):
    """Issues 4-s tokens and remembers when each one expires."""

    now: ManualClock = field(default_factory=ManualClock)
    expiry: dict[str, float] = field(default_factory=dict)

    def _issue(self, form: dict[str, object]) -> web.Response:
        answer = super()._issue(form)
        if self.issued_access and self.issued_access[-1] not in self.expiry:
            self.expiry[self.issued_access[-1]] = self.now() + LIFETIME
        return answer


class Unexpired(set[str]):
    """The API accepts a token the endpoint issued, until it expires."""

    def __init__(self, idp: ShortLivedTokens) -> None:
        super().__init__()
        self.idp = idp

    def __contains__(self, token: object) -> bool:
        return isinstance(token, str) and self.idp.now() < self.idp.expiry.get(token, 0.0)


@pytest.fixture
async def idp(aiohttp_server: Any, clock: ManualClock) -> AsyncIterator[ShortLivedTokens]:
    fake = ShortLivedTokens(expires_in=LIFETIME, now=clock)
    server = await aiohttp_server(fake.app())
    fake.url = str(server.make_url("/token"))  # type: ignore[attr-defined]
    yield fake


@dataclass
class Traffic:
    sidecar: Sidecar
    idp: ShortLivedTokens
    client: aiohttp.ClientSession
    names: list[str]
    statuses: dict[int, int] = field(default_factory=dict)
    waited: int = 0  # token endpoint calls made while requests were being answered

    async def requests(self) -> None:
        before = self.idp.calls
        for status in await asyncio.gather(*(self.request(n) for n in self.names)):
            self.statuses[status] = self.statuses.get(status, 0) + 1
        self.waited += self.idp.calls - before

    async def request(self, name: str) -> int:
        url = self.sidecar.url("api") + "/x"
        async with self.client.get(url, headers={"X-Sidecar-Account": name}) as resp:
            await resp.read()
            return resp.status


async def start(make_sidecar, idp, api, clock, client) -> Traffic:  # type: ignore[no-untyped-def]
    # The provider settings are the defaults (base_config's skew is the default 60 s), except
    # the call rate limit: it runs on the event loop's real time, which this test compresses
    # (200 s of the clock in a few real seconds). The background loop is driven below.
    sidecar = await make_sidecar(
        provider={"backoff_initial_seconds": 1, "max_refreshes_per_second": 10_000}
    )
    names = [f"user-{i}" for i in range(ACCOUNTS)]
    for name in names:
        seeded = await seed(sidecar, idp, api, clock, account=name, expires_in=LIFETIME)
        idp.expiry[seeded.access_token] = clock() + LIFETIME
    api.valid = Unexpired(idp)
    return Traffic(sidecar, idp, client, names)


def report(label: str, traffic: Traffic, calls_per_lifetime: float) -> None:
    print(
        f"{label}: {ACCOUNTS} accounts, {LIFETIMES} lifetimes of {LIFETIME}-s tokens: "
        f"{traffic.idp.calls} token calls = {calls_per_lifetime:.3f} per lifetime per account; "
        f"{traffic.waited} made while requests waited; statuses {traffic.statuses}"
    )


async def test_short_tokens_with_background_refresh_are_refreshed_once_per_lifetime(
    make_sidecar,
    idp: ShortLivedTokens,
    api: FakeUpstream,
    clock: ManualClock,
    client: aiohttp.ClientSession,
) -> None:
    traffic = await start(make_sidecar, idp, api, clock, client)
    rounds = LIFETIMES * int(LIFETIME / REQUEST_EVERY)
    next_request, end = clock(), clock() + rounds * REQUEST_EVERY
    next_due = await traffic.sidecar.refresher.run_once()
    while next_request < end:
        # Whichever comes first: the refresher's wake-up or the next round of requests.
        at = next_request if next_due is None else min(next_due, next_request)
        clock.advance(max(at - clock(), 0.0))
        if next_due is not None and clock() >= next_due:
            next_due = await traffic.sidecar.refresher.run_once()
        if clock() >= next_request:
            await traffic.requests()
            next_request += REQUEST_EVERY

    per_lifetime = idp.calls / (ACCOUNTS * LIFETIMES)
    report("background", traffic, per_lifetime)
    assert traffic.statuses == {200: ACCOUNTS * LIFETIMES * int(LIFETIME / REQUEST_EVERY)}
    assert 1.0 <= per_lifetime <= 1.3
    assert traffic.waited == 0  # the background refresher always came first
    assert idp.reuse_detected == 0


async def test_short_tokens_refreshed_on_demand_only_are_fresh_when_issued(
    make_sidecar,
    idp: ShortLivedTokens,
    api: FakeUpstream,
    clock: ManualClock,
    client: aiohttp.ClientSession,
) -> None:
    traffic = await start(make_sidecar, idp, api, clock, client)
    for _ in range(LIFETIMES * int(LIFETIME / REQUEST_EVERY)):
        await traffic.requests()
        clock.advance(REQUEST_EVERY)

    per_lifetime = idp.calls / (ACCOUNTS * LIFETIMES)
    report("on demand", traffic, per_lifetime)
    assert traffic.statuses == {200: ACCOUNTS * LIFETIMES * int(LIFETIME / REQUEST_EVERY)}
    # Refreshed once inside the last tenth of each lifetime: 1 / 0.9 at most, not every request.
    assert 1.0 <= per_lifetime <= 1.3
    assert idp.reuse_detected == 0
