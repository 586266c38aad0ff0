"""Recovery after a token endpoint outage takes seconds, not minutes.

30 accounts with 8-second tokens; the token endpoint is behind a TCP relay the test cuts for
30 s (connections refused) and restores. The app is simulated on the injected clock: each
account is requested once a second, or after the Retry-After of its last 503, as a polite
client would. While the provider fails it is probed at most every ``recovery_probe_seconds``
(5 by default); the first probe that succeeds releases every account's backoff.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp

from sidecar.app import Sidecar
from tests.conftest import sample, seed
from tests.fakes import FakeTokenEndpoint, FakeUpstream, ManualClock
from tests.relay import Relay

ACCOUNTS, LIFETIME, OUTAGE, PROBE = 30, 8, 30, 5


class Issued(set[str]):
    """The API accepts every access token the token endpoint issued, as soon as issued."""

    def __init__(self, idp: FakeTokenEndpoint) -> None:
        super().__init__()
        self.idp = idp

    def __contains__(self, token: object) -> bool:
        return token in self.idp.issued_access


@dataclass
class App:
    """Requests every account on its schedule and remembers what it got."""

    sidecar: Sidecar
    client: aiohttp.ClientSession
    clock: ManualClock
    names: list[str]
    next_try: dict[str, float] = field(default_factory=dict)
    retry_afters: list[int] = field(default_factory=list)
    valid_token_failures: int = 0  # 503s while the account's token had not expired yet
    recovered: dict[str, float] = field(default_factory=dict)  # first 200 after the outage

    async def round(self, back: float | None, expires_at: float) -> None:
        now = self.clock()
        due = [n for n in self.names if self.next_try.get(n, now) <= now]
        answers = await asyncio.gather(*(self.request(n) for n in due))
        for name, (status, retry_after) in zip(due, answers, strict=True):
            if status == 200:
                self.next_try[name] = now + 1
                if back is not None:
                    self.recovered.setdefault(name, now - back)
                continue
            assert status == 503
            self.retry_afters.append(retry_after)
            self.next_try[name] = now + retry_after
            self.valid_token_failures += now < expires_at

    async def request(self, name: str) -> tuple[int, int]:
        url = self.sidecar.url("api") + "/x"
        async with self.client.get(url, headers={"X-Sidecar-Account": name}) as resp:
            return resp.status, int(resp.headers.get("Retry-After", "0"))


async def test_accounts_recover_within_one_probe_interval_after_an_outage(
    make_sidecar,
    idp: FakeTokenEndpoint,
    api: FakeUpstream,
    clock: ManualClock,
    client: aiohttp.ClientSession,
) -> None:
    relay = Relay.before(idp.url)  # type: ignore[attr-defined]
    await relay.up()
    sidecar = await make_sidecar(
        provider={
            "token_url": relay.url(idp.url),  # type: ignore[attr-defined]
            "refresh_skew_seconds": 1,
            "backoff_initial_seconds": 1,
        }
    )
    names = [f"user-{i:02d}" for i in range(ACCOUNTS)]
    for name in names:
        await seed(sidecar, idp, api, clock, account=name, expires_in=LIFETIME)
    api.valid = Issued(idp)
    app = App(sidecar, client, clock, names)
    start, expires_at = clock(), clock() + LIFETIME
    await relay.cut()
    back: float | None = None
    while len(app.recovered) < ACCOUNTS:
        if back is None and clock() - start >= OUTAGE:
            attempts_in_outage = sample(
                sidecar,
                "sidecar_token_refreshes_total",
                provider="example",
                result="transient_error",
            )
            await relay.up()
            back = clock()
        await app.round(back, expires_at)
        assert clock() - start < OUTAGE + 300, "the accounts never recovered"
        clock.advance(1)

    slowest = max(app.recovered.values())
    print(
        f"{ACCOUNTS} accounts, {OUTAGE} s outage: {attempts_in_outage:.0f} token calls during "
        f"it, max Retry-After {max(app.retry_afters)} s, all recovered {slowest:.0f} s after "
        f"the endpoint came back, {app.valid_token_failures} requests with a valid token "
        f"failed, reuse detected {idp.reuse_detected}"
    )
    assert slowest <= PROBE
    assert max(app.retry_afters) <= PROBE
    assert attempts_in_outage <= 3 + OUTAGE / 2  # bounded: a probe at most every few seconds
    assert app.valid_token_failures == 0
    presented = [r["refresh_token"] for r in idp.requests]
    assert len(presented) == len(set(presented)) == ACCOUNTS  # each once, after the outage
    assert idp.reuse_detected == 0
    await relay.cut()
