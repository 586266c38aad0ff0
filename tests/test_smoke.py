from __future__ import annotations

import aiohttp

from tests.conftest import seed
from tests.fakes import FakeTokenEndpoint, FakeUpstream, ManualClock


async def test_injects_token(
    make_sidecar,
    idp: FakeTokenEndpoint,
    api: FakeUpstream,
    clock: ManualClock,
    client: aiohttp.ClientSession,
) -> None:
    sidecar = await make_sidecar()
    token = await seed(sidecar, idp, api, clock)
    async with client.get(sidecar.url("api") + "/v1/things?x=1") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body == {
        "method": "GET",
        "path": "/v1/things?x=1",
        "body_length": 0,
        "token": token.access_token,
    }
    assert idp.calls == 0
