"""Re-authorization signals: logged, counted, and POSTed to [notify] url with retries."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from tests.conftest import sample, seed
from tests.fakes import oauth_error


async def test_reauthorization_is_posted_with_retries(
    make_sidecar, idp, api, clock, client, aiohttp_server
) -> None:
    received: list[dict[str, object]] = []
    delivered = asyncio.Event()

    async def receive(request: web.Request) -> web.Response:
        received.append(await request.json())
        if len(received) == 1:
            return web.Response(status=503)  # the first delivery fails
        delivered.set()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    hook = await aiohttp_server(app)
    sidecar = await make_sidecar(
        notify={"url": str(hook.make_url("/hook")), "retry_initial_seconds": 0.01}
    )
    seeded = await seed(sidecar, idp, api, clock, expires_in=0)
    idp.script.append(lambda: oauth_error("invalid_grant"))
    async with client.get(sidecar.url("api") + "/x") as resp:
        assert resp.status == 401
    await asyncio.wait_for(delivered.wait(), 5)
    assert len(received) == 2 and received[0] == received[1]
    assert received[1] == {
        "event": "reauthorization_required",
        "provider": "example",
        "account": "main",
        "reason": "invalid_grant",
        "time": clock(),
    }
    assert seeded.refresh_token not in json.dumps(received)
    assert (
        sample(
            sidecar,
            "sidecar_account_reauthorizations_total",
            provider="example",
            reason="invalid_grant",
        )
        == 1
    )
