"""Discovery (RFC 8414, OpenID Connect Discovery): ``issuer`` fills the endpoints left out,
explicit keys win, the document is fetched once and only when needed, and a restart serves
stored tokens while the document cannot be fetched."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar import config as config_module
from sidecar.app import Sidecar
from sidecar.config import ProviderConfig
from sidecar.errors import ConfigError
from sidecar.grants.discovery import DiscoveryFailed, Endpoints, metadata_urls
from tests.conftest import base_config, seed
from tests.fakes import FakeTokenEndpoint, FakeUpstream, ManualClock
from tests.test_accounts_cli import sidecar as run_sidecar
from tests.test_cli import write_config

RFC8414 = "/.well-known/oauth-authorization-server"
OIDC = "/.well-known/openid-configuration"


@dataclass
class MetadataServer:
    """Serves one metadata document at ``path`` and counts every request."""

    path: str = RFC8414
    issuer_path: str = ""
    document: dict[str, Any] = field(default_factory=dict)
    hits: list[str] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits.append(request.path)
        if request.path != self.path:
            return web.Response(status=404)
        return web.json_response(self.document)

    @property
    def issuer(self) -> str:
        return self.url + self.issuer_path


@pytest.fixture
async def metadata(aiohttp_server: Any, idp: FakeTokenEndpoint) -> AsyncIterator[MetadataServer]:
    server_state = MetadataServer()
    app = web.Application()
    app.router.add_get("/{tail:.*}", server_state.handle)
    server = await aiohttp_server(app)
    server_state.url = str(server.make_url("")).rstrip("/")
    server_state.document = {
        "issuer": server_state.issuer,
        "token_endpoint": idp.url,  # type: ignore[attr-defined]
        "authorization_endpoint": server_state.url + "/authorize",
        "revocation_endpoint": server_state.url + "/revoke",
    }
    yield server_state


def provider(issuer: str, **keys: Any) -> ProviderConfig:
    keys = {"token_url": "", **keys}
    return ProviderConfig(name="p", grant="refresh_token", client_id="c", issuer=issuer, **keys)


def test_metadata_urls_follow_both_documents() -> None:
    assert metadata_urls("https://idp.example") == [
        "https://idp.example/.well-known/oauth-authorization-server",
        "https://idp.example/.well-known/openid-configuration",
    ]
    assert metadata_urls("https://idp.example/tenant/1") == [
        "https://idp.example/.well-known/oauth-authorization-server/tenant/1",
        "https://idp.example/tenant/1/.well-known/openid-configuration",
    ]


async def test_issuer_fills_what_is_left_out_once_and_explicit_keys_win(
    metadata: MetadataServer, idp: FakeTokenEndpoint
) -> None:
    endpoints = Endpoints(provider(metadata.issuer, revocation_url="https://pinned.example/revoke"))
    urls = await asyncio.gather(*(endpoints.token_url() for _ in range(10)))
    assert set(urls) == {idp.url}  # type: ignore[attr-defined]
    assert await endpoints.authorization_url() == metadata.url + "/authorize"
    assert await endpoints.revocation_url() == "https://pinned.example/revoke"
    assert metadata.hits == [RFC8414]  # fetched once for ten concurrent callers

    pinned = Endpoints(provider(metadata.issuer, token_url="https://pinned.example/token"))
    assert await pinned.token_url() == "https://pinned.example/token"
    assert metadata.hits == [RFC8414]  # an explicit token_url needs no document


async def test_openid_configuration_when_there_is_no_rfc8414_document(
    metadata: MetadataServer,
) -> None:
    metadata.path, metadata.issuer_path = "/tenant" + OIDC, "/tenant"
    metadata.document["issuer"] = metadata.issuer
    endpoints = Endpoints(provider(metadata.issuer))
    assert await endpoints.authorization_url() == metadata.url + "/authorize"
    assert metadata.hits == [RFC8414 + "/tenant", "/tenant" + OIDC]


async def test_a_document_for_another_issuer_is_refused(metadata: MetadataServer) -> None:
    metadata.document["issuer"] = "https://attacker.example"
    with pytest.raises(DiscoveryFailed, match=r"names issuer 'https://attacker\.example'"):
        await Endpoints(provider(metadata.issuer)).token_url()


async def test_unreachable_metadata_is_a_transient_failure() -> None:
    endpoints = Endpoints(provider("http://127.0.0.1:9"))
    with pytest.raises(DiscoveryFailed, match="cannot connect") as caught:
        await endpoints.token_url()
    assert not caught.value.outcome_unknown  # nothing was sent to a token endpoint


async def test_restart_serves_stored_tokens_while_the_document_cannot_be_fetched(
    secrets_dir: Path, idp: FakeTokenEndpoint, api: FakeUpstream, clock: ManualClock
) -> None:
    raw = base_config(secrets_dir, "", api.url, provider={"issuer": "http://127.0.0.1:9"})  # type: ignore[attr-defined]
    del raw["provider"][0]["token_url"]
    cfg = config_module.parse(raw, {}, secrets_dir)
    sidecar = await Sidecar.start(
        cfg, clock=clock, registry=CollectorRegistry(), rng=random.Random(7)
    )
    try:
        await seed(sidecar, idp, api, clock, "main", expires_in=3600)
        await seed(sidecar, idp, api, clock, "old", expires_in=30)  # STALE: needs a refresh
        async with aiohttp.ClientSession() as client:
            async with client.get(sidecar.url("api") + "/x") as resp:
                assert resp.status == 200  # a stored token needs no discovery
            headers = {"X-Sidecar-Account": "old"}
            async with client.get(sidecar.url("api") + "/x", headers=headers) as resp:
                assert resp.status == 200  # still valid: served while the refresh fails
            clock.advance(60)
            async with client.get(sidecar.url("api") + "/x", headers=headers) as resp:
                body = await resp.json()
                assert (resp.status, body["error"]) == (503, "token_unavailable")
        assert idp.calls == 0
        row = await sidecar.store.get("example", "old")
        assert row is not None and row.state == "active"  # transient: never reauthorization
    finally:
        await sidecar.stop()


async def test_check_config_online_shows_what_was_found(
    secrets_dir: Path, metadata: MetadataServer, idp: FakeTokenEndpoint
) -> None:
    raw = base_config(
        secrets_dir,
        "",
        "http://127.0.0.1:9",
        provider={"issuer": metadata.issuer, "revocation_url": "https://pinned.example/revoke"},
    )
    del raw["provider"][0]["token_url"]
    config = write_config(secrets_dir, raw)
    rc, out, err = await run_sidecar("check-config", "--config", str(config), "--online")
    assert rc == 0, err
    lines = out.splitlines()[1:]
    assert lines == [
        f"provider 'example': issuer {metadata.issuer} ({metadata.issuer}{RFC8414})",
        f"  token_url = {idp.url}",  # type: ignore[attr-defined]
        f"  authorization_url = {metadata.url}/authorize",
        "  revocation_url = https://pinned.example/revoke (configured; discovered "
        f"{metadata.url}/revoke)",
    ]
    metadata.document["issuer"] = "https://elsewhere.example"
    rc, out, _ = await run_sidecar("check-config", "--config", str(config), "--online")
    assert rc == 1 and "discovery failed" in out and "elsewhere.example" in out


def test_issuer_makes_token_url_optional_and_every_url_is_checked(secrets_dir: Path) -> None:
    raw = base_config(
        secrets_dir, "", "http://127.0.0.1:9", provider={"issuer": "https://idp.example"}
    )
    del raw["provider"][0]["token_url"]
    cfg = config_module.parse(raw, {}, secrets_dir).providers[0]
    assert (cfg.issuer, cfg.token_url, cfg.authorization_url) == ("https://idp.example", "", None)

    del raw["provider"][0]["issuer"]
    raw["provider"][0] |= {"authorization_url": "ftp://x", "redirect_uri": "callback"}
    with pytest.raises(ConfigError) as caught:
        config_module.parse(raw, {}, secrets_dir)
    assert caught.value.problems == [
        "provider[0].token_url: is required",
        "provider[0].authorization_url: must be an http(s) URL, got 'ftp://x'",
        "provider[0].redirect_uri: must be an http(s) URL, got 'callback'",
    ]
    raw["provider"][0] = {**raw["provider"][0], "issuer": "https://idp.example/?x=1"}
    raw["provider"][0].pop("authorization_url"), raw["provider"][0].pop("redirect_uri")
    with pytest.raises(ConfigError) as caught:
        config_module.parse(raw, {}, secrets_dir)
    assert caught.value.problems == [
        "provider[0].issuer: must be an http(s) URL without query or fragment, "
        "got 'https://idp.example/?x=1'"
    ]
