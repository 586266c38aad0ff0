"""`sidecar dev`: the demo servers and the wiring are real code paths, tested like the rest."""

from __future__ import annotations

import aiohttp

from sidecar.dev import start_dev
from tests.conftest import sample
from tests.fakes import ManualClock


async def test_dev_stack_shows_injection_refresh_and_retry(tmp_path) -> None:
    clock = ManualClock()
    stack = await start_dev(clock, state_dir=tmp_path, proxy_port=0, admin_port=0)
    sidecar = stack.sidecar
    proxy = sidecar.url("demo-api")
    try:
        async with aiohttp.ClientSession() as client:
            async with client.get(proxy + "/v1/hello") as resp:
                assert (resp.status, (await resp.json())["hello"]) == (200, "alice")
            async with client.get(
                proxy + "/v1/hello", headers={"X-Sidecar-Account": "bob"}
            ) as resp:
                assert (await resp.json())["hello"] == "bob"
            # Background refresh renews tokens before they expire.
            clock.advance(16)
            await sidecar.refresher.run_once()
            assert (
                sample(sidecar, "sidecar_token_refreshes_total", provider="demo", result="success")
                == 2
            )
            # The API drops every token: the sidecar refreshes and replays.
            async with client.post(stack.api_url + "/demo/revoke") as resp:
                assert (await resp.json())["revoked_access_tokens"] == 4
            async with client.get(proxy + "/v1/hello") as resp:
                assert (resp.status, (await resp.json())["hello"]) == (200, "alice")
            assert (
                sample(sidecar, "sidecar_retries_total", upstream="demo-api", outcome="replayed")
                == 1
            )
            # The demo provider detects a reuse of a rotated-away refresh token.
            spent = next(iter(stack.provider.spent))
            async with client.post(
                stack.provider_url + "/token",
                data={"grant_type": "refresh_token", "refresh_token": spent},
            ) as resp:
                assert (resp.status, (await resp.json())["error"]) == (400, "invalid_grant")
        text = stack.instructions()
        assert proxy in text and "/metrics" in text and "demo/revoke" in text
        # Its provider's settings, for the README's Quickstart.
        assert f'  issuer = "{stack.provider_url}"' in text
        assert '  client_id = "demo"' in text and f'target = "{stack.api_url}"' in text
    finally:
        await stack.stop()
