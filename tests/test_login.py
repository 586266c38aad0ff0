"""The login flow's guarantees, through a real admin listener against the fake authorization
server (which counts token requests): a ``state`` works once and expires, an unknown one gets
an error page, and none of these ever reaches the token endpoint."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from sidecar.app import Sidecar
from sidecar.connect import LoginFailed, loopback_redirect
from sidecar.credentials.logins import LOGIN_TTL_SECONDS
from sidecar.grants.authorization_code import code_challenge
from tests import test_admin_api
from tests.conftest import base_config
from tests.fakes import ManualClock
from tests.test_accounts_cli import sidecar
from tests.test_admin_api import AuthServer, Start, admin
from tests.test_cli import write_config
from tests.test_login_dot import connect_process

# The admin API tests' fixtures: a sidecar with an admin token, and the fake server.
idp, start = test_admin_api.idp, test_admin_api.start

AUTHORIZE = "https://idp.example/authorize"


async def begin(client: aiohttp.ClientSession, sidecar: Sidecar, **body: Any) -> dict[str, Any]:
    status, _, started = await admin(
        client, sidecar, "POST", "/v1/providers/{provider}/accounts/{account}/connect", body=body
    )
    assert status == 200, started
    return started


CHALLENGES: dict[str, str] = {}  # callback URL -> the challenge its authorization URL carried


def idp_challenges(callback: str) -> set[str]:
    return {CHALLENGES[callback]}


def redirect_with_code(idp: AuthServer, started: dict[str, Any]) -> str:
    """What the provider does once the person approves: a code bound to the request's
    redirect URI and PKCE challenge, and the browser sent back with it and the state."""
    query = {k: v[0] for k, v in parse_qs(urlsplit(started["authorization_url"]).query).items()}
    code = f"code-{len(idp.codes) + 1}"
    idp.codes[code] = (query["redirect_uri"], query["code_challenge"])
    callback = f"{query['redirect_uri']}?code={code}&state={query['state']}"
    CHALLENGES[callback] = query["code_challenge"]
    return callback


async def browse(client: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with client.get(url) as resp:  # no admin token: a browser has none
        assert resp.headers["Cache-Control"] == "no-store"
        assert resp.headers["Referrer-Policy"] == "no-referrer"
        return resp.status, await resp.text()


async def test_connect_url_carries_pkce_s256_state_and_the_callback(start: Start, client) -> None:
    sidecar = await start(provider={"authorization_url": AUTHORIZE, "scopes": ["read", "write"]})
    started = await begin(client, sidecar)
    url = started["authorization_url"]
    assert url.startswith(AUTHORIZE + "?")
    query = {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}
    assert query["response_type"] == "code" and query["client_id"] == "client-1"
    assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
    assert query["scope"] == "read write" and len(query["state"]) >= 43
    assert (
        query["redirect_uri"]
        == started["redirect_uri"]
        == sidecar.url("admin") + ("/oauth/callback")
    )
    # A second login gets a fresh state and verifier.
    again = parse_qs(urlsplit((await begin(client, sidecar))["authorization_url"]).query)
    assert again["state"][0] != query["state"]
    assert again["code_challenge"][0] != query["code_challenge"]


async def test_callback_exchanges_once_and_a_replay_gets_an_error_page(
    start: Start, client, idp: AuthServer
) -> None:
    sidecar = await start(provider={"authorization_url": AUTHORIZE})
    callback = redirect_with_code(idp, await begin(client, sidecar))
    status, page = await browse(client, callback)
    assert (status, idp.calls) == (200, 1), page
    assert "Account &#x27;main&#x27; of provider &#x27;example&#x27; is connected" in page
    # The fake accepted the code only because the verifier matched the URL's challenge.
    sent = idp.requests[0]
    assert (sent["grant_type"], len(sent["code_verifier"])) == ("authorization_code", 64)
    assert code_challenge(sent["code_verifier"]) in idp_challenges(callback)
    status, page = await browse(client, callback)
    assert (status, idp.calls) == (400, 1)
    assert "Unknown or used sign-in link" in page and "nothing was exchanged" in page
    status, _, body = await admin(
        client, sidecar, "GET", "/v1/providers/{provider}/accounts/{account}"
    )
    assert (status, body["state"]) == (200, "active")


async def test_unknown_expired_and_denied_states_never_reach_the_token_endpoint(
    start: Start, client, idp: AuthServer, clock: ManualClock
) -> None:
    sidecar = await start(provider={"authorization_url": AUTHORIZE})
    callback_base = sidecar.url("admin") + "/oauth/callback"
    for query in ("", "?code=x", "?code=x&state=forged", "?code=x&state=%FF%FE"):
        status, page = await browse(client, callback_base + query)
        assert status == 400 and "Unknown or used sign-in link" in page, query

    expired = redirect_with_code(idp, await begin(client, sidecar))
    clock.advance(LOGIN_TTL_SECONDS + 1)
    status, page = await browse(client, expired)
    assert status == 400 and "Unknown or used sign-in link" in page

    started = await begin(client, sidecar)
    state = parse_qs(urlsplit(started["authorization_url"]).query)["state"][0]
    denied = f"{callback_base}?error=access_denied&error_description=no&state={state}"
    status, page = await browse(client, denied)
    assert status == 400 and "Sign-in was not completed" in page and "access_denied" in page
    status, page = await browse(client, denied)  # the state was used up by the denial
    assert status == 400 and "Unknown or used sign-in link" in page
    assert idp.calls == 0


async def test_connect_needs_an_authorization_endpoint_and_a_pair_grant(
    start: Start, client
) -> None:
    sidecar = await start()
    path = "/v1/providers/{provider}/accounts/{account}/connect"
    status, _, body = await admin(client, sidecar, "POST", path, body={})
    assert (status, body["error"]) == (409, "not_connectable")
    assert "authorization_url" in body["message"]
    status, _, body = await admin(client, sidecar, "POST", path, body={"x": 1})
    assert (status, body["error"]) == (422, "invalid_request")


@pytest.mark.parametrize(
    ("uri", "bound"),
    [
        ("http://127.0.0.1/callback", ("127.0.0.1", 0, "/callback")),
        ("http://127.0.0.1:8765/cb", ("127.0.0.1", 8765, "/cb")),
        ("http://[::1]:8765/cb", ("::1", 8765, "/cb")),
        ("http://localhost:8765", ("127.0.0.1", 8765, "/")),
    ],
)
def test_loopback_redirect_uris(uri: str, bound: tuple[str, int, str]) -> None:
    assert loopback_redirect(uri) == bound


@pytest.mark.parametrize(
    "uri",
    [
        "https://127.0.0.1/cb",
        "http://example.com/cb",
        "http://10.0.0.1/cb",
        "http://127.0.0.1/cb?x=1",
    ],
)
def test_connect_refuses_a_redirect_uri_it_cannot_listen_on(uri: str) -> None:
    with pytest.raises(LoginFailed, match="not a loopback http URI"):
        loopback_redirect(uri)


async def test_connect_command_refuses_a_redirect_uri_it_cannot_receive(secrets_dir: Path) -> None:
    raw = base_config(secrets_dir, "http://127.0.0.1:9/token", "http://127.0.0.1:9")
    raw["provider"][0]["authorization_url"] = AUTHORIZE
    config = write_config(secrets_dir, raw)
    args = ("accounts", "connect", "--config", str(config), "--provider", "example")
    rc, out, err = await sidecar(
        *args, "--account", "a", "--redirect-uri", "https://app.example/cb"
    )
    assert (rc, out) == (1, "")
    assert "is not a loopback http URI" in err


async def test_connect_listener_shows_unknown_states_an_error_and_keeps_waiting(
    secrets_dir: Path, idp: AuthServer
) -> None:
    raw = base_config(secrets_dir, idp.url, "http://127.0.0.1:9")  # type: ignore[attr-defined]
    raw["provider"][0]["authorization_url"] = AUTHORIZE
    proc, url = await connect_process(write_config(secrets_dir, raw), "main")
    callback = redirect_with_code(idp, {"authorization_url": url})
    async with aiohttp.ClientSession() as browser:
        forged = callback.replace("state=", "state=x")
        status, page = await browse(browser, forged)
        assert (status, idp.calls) == (400, 0)
        assert "Unknown or used sign-in link" in page
        status, page = await browse(browser, callback.split("?")[0].rsplit("/", 1)[0] + "/other")
        assert status == 404
        status, page = await browse(browser, callback)
        assert (status, idp.calls) == (200, 1), page
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert "connected new account 'main' of provider 'example'" in out.decode()
    code = parse_qs(urlsplit(callback).query)["code"][0]
    assert code not in out.decode() + err.decode()
