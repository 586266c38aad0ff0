"""Admin listener (metrics, health) and logs that never carry a secret."""

from __future__ import annotations

import logging

import pytest
from aiohttp import web

from sidecar.logs import JsonFormatter
from tests.conftest import CLIENT_SECRET, sample, seed
from tests.fakes import oauth_error


async def test_health_and_readiness(make_sidecar, client) -> None:
    sidecar = await make_sidecar()
    async with client.get(sidecar.url("admin") + "/healthz") as resp:
        assert (resp.status, await resp.json()) == (200, {"status": "ok"})
    async with client.get(sidecar.url("admin") + "/readyz") as resp:
        assert (resp.status, await resp.json()) == (200, {"status": "ready"})
    await sidecar.store.close()  # the store goes away: not ready any more
    async with client.get(sidecar.url("admin") + "/readyz") as resp:
        assert resp.status == 503
        assert (await resp.json())["error"] == "store_unavailable"


async def test_metrics_endpoint_uses_own_registry(make_sidecar, idp, api, clock, client) -> None:
    from prometheus_client import REGISTRY

    sidecar = await make_sidecar()
    await seed(sidecar, idp, api, clock, account="a")
    await seed(sidecar, idp, api, clock, account="b", expires_in=0)
    idp.script.append(lambda: oauth_error("invalid_grant"))
    async with client.get(sidecar.url("api") + "/x", headers={"X-Sidecar-Account": "a"}):
        pass
    async with client.get(sidecar.url("api") + "/x", headers={"X-Sidecar-Account": "b"}):
        pass
    async with client.get(sidecar.url("admin") + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    assert 'sidecar_requests_total{method="GET",status_class="2xx",upstream="api"} 1.0' in text
    assert 'sidecar_errors_total{code="reauthorization_required",upstream="api"} 1.0' in text
    assert sample(sidecar, "sidecar_accounts", provider="example", state="active") == 1
    assert (
        sample(sidecar, "sidecar_accounts", provider="example", state="reauthorization_required")
        == 1
    )
    assert sample(sidecar, "sidecar_upstream_request_duration_seconds_count", upstream="api") == 1
    assert sample(sidecar, "sidecar_token_refresh_duration_seconds_count", provider="example") == 1
    assert (
        REGISTRY.get_sample_value(
            "sidecar_requests_total", {"upstream": "api", "method": "GET", "status_class": "2xx"}
        )
        is None
    )
    assert "account=" not in text  # no per-account series


async def test_logs_never_contain_tokens_or_secrets(
    make_sidecar, idp, api, clock, client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    sidecar = await make_sidecar()
    seeded = await seed(sidecar, idp, api, clock, expires_in=0)
    api.valid.update({"access-2", "access-3"})
    async with client.get(sidecar.url("api") + "/x") as resp:  # refresh on expiry
        assert resp.status == 200
    api.valid.discard("access-2")
    async with client.get(sidecar.url("api") + "/x") as resp:  # 401 -> refresh -> retry
        assert resp.status == 200
    clock.advance(7200)
    idp.script.append(lambda: web.Response(status=500, text="refresh_token=leak"))
    async with client.get(sidecar.url("api") + "/x") as resp:  # transient failure
        assert resp.status == 503
    clock.advance(600)
    idp.script.append(lambda: oauth_error("invalid_grant"))
    async with client.get(sidecar.url("api") + "/x") as resp:  # fatal failure
        assert resp.status == 401
    secrets = {
        seeded.access_token,
        seeded.refresh_token,
        CLIENT_SECRET,
        "access-2",
        "access-3",
        "refresh-2",
        "refresh-3",
    }
    formatter = JsonFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    events = {record.getMessage() for record in caplog.records}
    assert {"token_refreshed", "token_refresh_failed", "account_needs_reauthorization"} <= events
    for line in lines:
        for secret in secrets:
            assert secret not in line, line
