"""The admin accounts API through a real admin listener: authentication, listing, import,
authorization code exchange, forced refresh, revocation. Every answer is checked against the
OpenAPI document the server serves, and no answer or log line ever holds a token."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import aiohttp
import jsonschema
import pytest
from aiohttp import web

from sidecar import config as config_module
from sidecar.admin import AdminApi
from sidecar.app import Sidecar
from sidecar.credentials.accounts import AccountService
from sidecar.credentials.logins import Logins
from sidecar.errors import ConfigError
from sidecar.logs import JsonFormatter
from sidecar.metrics import Metrics
from sidecar.store.memory import MemoryStore
from tests.conftest import MakeSidecar, base_config, seed, write_secret
from tests.fakes import FakeTokenEndpoint, oauth_error

ADMIN_TOKEN = "admin-token-5f1d3c9e7a2b"
SPEC: dict[str, Any] = json.loads(resources.files("sidecar").joinpath("openapi.json").read_text())
ACCOUNT = "/v1/providers/{provider}/accounts/{account}"
ACCOUNTS = "/v1/providers/{provider}/accounts"
REDIRECT = "https://app.example.com/oauth/callback"
VERIFIER = "v" * 43 + "-._~0123456789"


def s256(verifier: str) -> str:
    """RFC 7636 §4.2: BASE64URL(SHA256(verifier)) without padding."""
    digest = hashlib.sha256(verifier.encode()).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


@dataclass
class AuthServer(FakeTokenEndpoint):
    """The fake token endpoint plus authorization codes (with PKCE) and RFC 7009 revocation."""

    codes: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    issue_refresh: bool = True
    revocations: list[dict[str, str]] = field(default_factory=list)
    revocation_auth: list[str | None] = field(default_factory=list)
    revoke_script: list[Callable[[], web.StreamResponse]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_post("/revoke", self.revoke)
        return app

    def code(self, redirect_uri: str = REDIRECT, verifier: str | None = None) -> str:
        """A code as the authorization endpoint would hand it to the redirect URI."""
        code = f"code-{next(self._ids)}"
        self.codes[code] = (redirect_uri, s256(verifier) if verifier else None)
        return code

    def _issue(self, form: dict[str, object]) -> web.Response:
        if form.get("grant_type") != "authorization_code":
            return super()._issue(form)
        pending = self.codes.pop(str(form.get("code")), None)  # a code works once
        if pending is None:
            return oauth_error("invalid_grant", "unknown or used code")
        redirect_uri, challenge = pending
        if form.get("redirect_uri") != redirect_uri:
            return oauth_error("invalid_grant", "redirect_uri mismatch")
        verifier = form.get("code_verifier")
        if challenge is not None and (verifier is None or s256(str(verifier)) != challenge):
            return oauth_error("invalid_grant", "PKCE verification failed")
        access, refresh = self.grant("user")
        body: dict[str, object] = {"access_token": access, "token_type": "Bearer"}
        if self.issue_refresh:
            body["refresh_token"] = refresh
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        return web.json_response(body)

    async def revoke(self, request: web.Request) -> web.StreamResponse:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.revocations.append(form)
        self.revocation_auth.append(request.headers.get("Authorization"))
        if self.revoke_script:
            return self.revoke_script.pop(0)()
        self.valid_refresh.discard(form["token"])
        return web.Response(status=200)


@pytest.fixture
async def idp(aiohttp_server: Any) -> AsyncIterator[AuthServer]:
    fake = AuthServer()
    server = await aiohttp_server(fake.app())
    fake.url = str(server.make_url("/token"))  # type: ignore[attr-defined]
    fake.revoke_url = str(server.make_url("/revoke"))  # type: ignore[attr-defined]
    yield fake


Start = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
def start(make_sidecar: MakeSidecar, secrets_dir: Path, idp: AuthServer) -> Start:
    """A sidecar with an admin token and a revocation endpoint; no background refresh, so
    every token endpoint call in a test is one the test made."""

    async def make(
        *, admin_token: str | None = ADMIN_TOKEN, provider: dict[str, Any] | None = None
    ) -> Sidecar:
        provider = {"revocation_url": idp.revoke_url, **(provider or {})}  # type: ignore[attr-defined]
        provider = {k: v for k, v in provider.items() if v is not None}  # None: leave it out
        admin = {}
        if admin_token is not None:
            write_secret(secrets_dir / "admin.token", admin_token + "\n")
            admin = {"token_file": "admin.token"}
        return await make_sidecar(provider=provider, admin=admin)

    return make


Answer = tuple[int, dict[str, str], Any]


async def admin(
    client: aiohttp.ClientSession,
    sidecar: Sidecar,
    method: str,
    template: str,
    *,
    token: str | None = ADMIN_TOKEN,
    query: dict[str, str] | None = None,
    body: object = None,
    data: bytes | None = None,
    provider: str = "example",
    account: str = "main",
) -> Answer:
    """Call the admin API and check the answer against the OpenAPI document."""
    path = template.format(provider=quote(provider, safe=""), account=quote(account, safe=""))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    kwargs: dict[str, Any] = {"json": body} if body is not None else {"data": data}
    async with client.request(
        method, sidecar.url("admin") + path, headers=headers, params=query, **kwargs
    ) as resp:
        answer = resp.status, dict(resp.headers), await resp.json()
    documented(method, template, *answer)
    return answer


def documented(method: str, template: str, status: int, headers: dict[str, str], body: Any) -> None:
    responses = SPEC["paths"][template][method.lower()]["responses"]
    assert str(status) in responses, f"{method} {template} answered undocumented {status}"
    schema = responses[str(status)]["content"]["application/json"]["schema"]
    jsonschema.Draft202012Validator({**schema, "components": SPEC["components"]}).validate(body)
    if status >= 400:
        assert headers["X-Sidecar-Error"] == body["error"]


def summary(account: str, **changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "account": account,
        "state": "active",
        "reason": None,
        "state_changed_at": None,
        "access_expires_at": None,
        "refresh_expires_at": None,
        "refreshed_at": None,
        "retry_at": None,
    }
    return base | changes


async def proxied(client: aiohttp.ClientSession, sidecar: Sidecar, account: str) -> Answer:
    headers = {"X-Sidecar-Account": account}
    async with client.get(sidecar.url("api") + "/x", headers=headers) as resp:
        return resp.status, dict(resp.headers), await resp.json()


# --- authentication -----------------------------------------------------------------------


async def test_probes_are_open_and_everything_else_needs_the_admin_token(start, client) -> None:
    sidecar = await start()
    for path in ("/healthz", "/readyz", "/metrics"):
        async with client.get(sidecar.url("admin") + path) as resp:
            assert resp.status == 200, path
    for token in (None, "wrong-token", ADMIN_TOKEN[:-1], ADMIN_TOKEN + "x"):
        status, headers, body = await admin(client, sidecar, "GET", "/v1/providers", token=token)
        assert (status, body["error"]) == (401, "unauthorized")
        assert headers["WWW-Authenticate"] == 'Bearer realm="sidecar-admin"'
    url = sidecar.url("admin") + "/v1/providers"
    basic = {"Authorization": "Basic " + ADMIN_TOKEN}  # right secret, wrong scheme
    async with client.get(url, headers=basic) as resp:
        assert resp.status == 401
    status, _, body = await admin(client, sidecar, "GET", "/v1/providers")
    assert status == 200
    assert body == {
        "providers": [
            {
                "name": "example",
                "grant": "refresh_token",
                "revocation": True,
                "accounts": {"active": 0, "reauthorization_required": 0},
            }
        ]
    }


async def test_unknown_paths_and_methods_answer_json_only_after_authentication(
    start, client
) -> None:
    sidecar = await start()
    base = sidecar.url("admin")
    async with client.get(base + "/v1/nothing") as resp:
        assert resp.status == 401  # no hint about which paths exist
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with client.get(base + "/v1/nothing", headers=auth) as resp:
        assert (resp.status, await resp.json()) == (
            404,
            {"error": "not_found", "message": "Not Found"},
        )
        assert resp.headers["X-Sidecar-Error"] == "not_found"
    async with client.patch(base + "/v1/providers", headers=auth) as resp:
        assert (resp.status, (await resp.json())["error"]) == (405, "method_not_allowed")
        assert resp.headers["Allow"] == "GET,HEAD"


async def test_without_a_token_file_the_api_is_off_and_probes_still_work(start, client) -> None:
    sidecar = await start(admin_token=None)
    for token in (None, ADMIN_TOKEN, ""):
        status, _, body = await admin(client, sidecar, "GET", "/v1/providers", token=token)
        assert (status, body["error"]) == (404, "admin_api_disabled")
        assert "token_file" in body["message"]
    async with client.get(sidecar.url("admin") + "/healthz") as resp:
        assert (resp.status, await resp.json()) == (200, {"status": "ok"})


def test_admin_token_file_and_revocation_url_are_validated(secrets_dir: Path) -> None:
    raw = base_config(secrets_dir, "http://127.0.0.1:9/token", "http://127.0.0.1:9")
    (secrets_dir / "open.token").write_text("x" * 32)
    (secrets_dir / "open.token").chmod(0o644)
    raw["admin"]["token_file"] = "open.token"
    raw["provider"][0]["revocation_url"] = "ftp://idp/revoke"
    with pytest.raises(ConfigError) as caught:
        config_module.parse(raw, {}, secrets_dir)
    assert caught.value.problems == [
        f"admin.token_file: {secrets_dir / 'open.token'} is readable by every user; chmod o-rwx it",
        "provider[0].revocation_url: must be an http(s) URL, got 'ftp://idp/revoke'",
    ]
    write_secret(secrets_dir / "short.token", "short\n")
    raw["admin"]["token_file"] = "short.token"
    raw["provider"][0]["revocation_url"] = "https://idp.example/revoke"
    with pytest.raises(ConfigError) as caught:
        config_module.parse(raw, {}, secrets_dir)
    assert caught.value.problems == [
        "admin.token_file: holds a token shorter than 16 characters "
        "(make one with `openssl rand -hex 32`)"
    ]
    write_secret(secrets_dir / "good.token", ADMIN_TOKEN + "\n")
    raw["admin"]["token_file"] = "good.token"
    cfg = config_module.parse(raw, {}, secrets_dir)
    assert cfg.admin.token == ADMIN_TOKEN and ADMIN_TOKEN not in repr(cfg)
    assert cfg.provider("example").revocation_url == "https://idp.example/revoke"


# --- listing ------------------------------------------------------------------------------


async def test_list_pages_in_account_order_and_filters_by_state(
    start, idp, api, clock, client
) -> None:
    sidecar = await start(provider={"refresh_token_lifetime_seconds": 864000})
    for name in ("erin", "bob", "dave", "alice", "carol"):
        await seed(sidecar, idp, api, clock, account=name, expires_in=600)
    await sidecar.store.set_state(
        "example", "bob", "reauthorization_required", "invalid_grant", 5.0
    )
    await sidecar.store.set_state("example", "dave", "reauthorization_required", "x", 6.0)
    times = {
        "access_expires_at": clock() + 600,
        "refreshed_at": clock(),
        "refresh_expires_at": clock() + 864000,  # the refresh token lifetime from the config
    }
    pages, cursor = [], None
    while True:
        query = {"limit": "2"} | ({"cursor": cursor} if cursor else {})
        status, _, body = await admin(client, sidecar, "GET", ACCOUNTS, query=query)
        assert status == 200 and body["provider"] == "example"
        pages.append([a["account"] for a in body["accounts"]])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == [["alice", "bob"], ["carol", "dave"], ["erin"]]
    query = {"state": "reauthorization_required"}
    status, _, body = await admin(client, sidecar, "GET", ACCOUNTS, query=query)
    assert status == 200
    assert body == {
        "provider": "example",
        "accounts": [
            summary(
                "bob",
                state="reauthorization_required",
                reason="invalid_grant",
                state_changed_at=5.0,
                **times,
            ),
            summary(
                "dave",
                state="reauthorization_required",
                reason="x",
                state_changed_at=6.0,
                **times,
            ),
        ],
        "next_cursor": None,
    }
    status, _, body = await admin(client, sidecar, "GET", ACCOUNTS, query={"state": "active"})
    assert [a["account"] for a in body["accounts"]] == ["alice", "carol", "erin"]
    status, _, body = await admin(client, sidecar, "GET", "/v1/providers")
    assert body["providers"][0]["accounts"] == {"active": 3, "reauthorization_required": 2}


async def test_list_reports_every_bad_parameter_at_once(start, client) -> None:
    sidecar = await start()
    query = {"state": "asleep", "limit": "0", "cursor": "!!!", "sort": "x"}
    status, _, body = await admin(client, sidecar, "GET", ACCOUNTS, query=query)
    assert status == 422
    assert body == {
        "error": "invalid_request",
        "message": "the request is invalid",
        "problems": [
            "sort: unknown parameter",
            "state: must be one of active, reauthorization_required, got 'asleep'",
            "limit: must be an integer from 1 to 1000, got '0'",
            "cursor: not a cursor this API returned",
        ],
    }
    status, _, body = await admin(client, sidecar, "GET", ACCOUNTS, provider="nope", query=query)
    assert (status, body["error"]) == (404, "unknown_provider")
    assert body["message"] == "no provider named 'nope' (configured: example)"


# --- import -------------------------------------------------------------------------------


async def test_put_creates_then_replaces_an_account_and_the_proxy_uses_it(
    start, api, clock, client
) -> None:
    sidecar = await start()
    pair = {"access_token": "at-1", "refresh_token": "rt-1", "expires_in": 3600, "scope": "r"}
    status, _, body = await admin(client, sidecar, "PUT", ACCOUNT, account="ann", body=pair)
    assert status == 201
    assert body == summary("ann", access_expires_at=clock() + 3600, refreshed_at=clock())
    api.valid.add("at-1")
    status, _, answer = await proxied(client, sidecar, "ann")
    assert (status, answer["token"]) == (200, "at-1")
    clock.advance(10)
    status, _, body = await admin(
        client,
        sidecar,
        "PUT",
        ACCOUNT,
        account="bo b/2",
        body={"access_token": "x", "refresh_token": "y"},
    )
    assert status == 201 and body["account"] == "bo b/2"
    status, _, body = await admin(
        client,
        sidecar,
        "PUT",
        ACCOUNT,
        account="bo b/2",
        body={"access_token": "z", "refresh_token": "y"},
    )
    assert status == 200 and body == summary("bo b/2", refreshed_at=clock())
    assert [r.account for r in await sidecar.store.rows("example")] == ["ann", "bo b/2"]


async def test_put_reactivates_an_account_that_needed_reauthorization(
    start, idp, api, clock, client
) -> None:
    sidecar = await start()
    await seed(sidecar, idp, api, clock, account="ann")
    await sidecar.store.set_state("example", "ann", "reauthorization_required", "invalid_grant", 1)
    pair = {"access_token": "at-new", "refresh_token": "rt-new"}
    status, _, body = await admin(client, sidecar, "PUT", ACCOUNT, account="ann", body=pair)
    assert (status, body["state"], body["reason"]) == (200, "active", None)
    api.valid.add("at-new")
    assert (await proxied(client, sidecar, "ann"))[2]["token"] == "at-new"


async def test_put_replaces_a_pair_the_running_proxy_has_cached(
    start, idp, api, clock, client
) -> None:
    sidecar = await start()
    await seed(sidecar, idp, api, clock, account="ann")
    assert (await proxied(client, sidecar, "ann"))[0] == 200  # cached now
    pair = {"access_token": "at-new", "refresh_token": "rt-new", "expires_in": 3600}
    assert (await admin(client, sidecar, "PUT", ACCOUNT, account="ann", body=pair))[0] == 200
    api.valid.add("at-new")
    assert (await proxied(client, sidecar, "ann"))[2]["token"] == "at-new"


async def test_put_reports_every_problem_and_stores_nothing(start, client) -> None:
    sidecar = await start()
    bad = {"refresh_token": 5, "expires_in": -1, "scope": ["a"], "extra": 1}
    status, _, body = await admin(client, sidecar, "PUT", ACCOUNT, account="x" * 257, body=bad)
    assert (status, body["problems"]) == (
        422,
        [
            "account: must be 1 to 256 printable characters",
            "extra: unknown field",
            "access_token: is required",
            "refresh_token: must be a non-empty string",
            "expires_in: must be a number of seconds, 0 or more",
            "scope: must be a string",
        ],
    )
    status, _, body = await admin(client, sidecar, "PUT", ACCOUNT, body={"access_token": "a"})
    assert (status, body["problems"]) == (422, ["refresh_token: is required"])
    status, _, body = await admin(client, sidecar, "PUT", ACCOUNT, data=b"{not json")
    assert (status, body["problems"]) == (422, ["body: must be JSON"])
    status, _, body = await admin(client, sidecar, "PUT", ACCOUNT, body=["a"])
    assert (status, body["problems"]) == (
        422,
        ["body: must be a JSON object", "access_token: is required", "refresh_token: is required"],
    )
    assert await sidecar.store.rows() == []


async def test_client_credentials_providers_take_no_pairs(start, client) -> None:
    sidecar = await start(provider={"grant": "client_credentials"})
    pair = {"access_token": "a", "refresh_token": "r"}
    status, _, body = await admin(client, sidecar, "PUT", ACCOUNT, body=pair)
    assert (status, body["error"]) == (409, "grant_not_supported")
    code = {"code": "c", "redirect_uri": REDIRECT}
    status, _, body = await admin(client, sidecar, "POST", ACCOUNT + "/authorize", body=code)
    assert (status, body["error"]) == (409, "grant_not_supported")


# --- authorization code -------------------------------------------------------------------


async def test_authorize_exchanges_a_pkce_code_once_and_stores_the_pair(
    start, idp, api, clock, client
) -> None:
    sidecar = await start()
    code = idp.code(verifier=VERIFIER)
    request = {"code": code, "redirect_uri": REDIRECT, "code_verifier": VERIFIER}
    status, _, body = await admin(
        client, sidecar, "POST", ACCOUNT + "/authorize", account="ann", body=request
    )
    assert status == 201
    assert body == summary("ann", access_expires_at=clock() + 3600, refreshed_at=clock()) | {
        "warnings": []
    }
    assert idp.calls == 1
    assert idp.requests == [
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "code_verifier": VERIFIER,
        }
    ]
    assert idp.auth_headers[0] is not None and idp.auth_headers[0].startswith("Basic ")
    access = idp.issued_access[-1]
    api.valid.add(access)
    assert (await proxied(client, sidecar, "ann"))[2]["token"] == access
    # The same code again: the provider says invalid_grant; the stored pair is untouched.
    rows_before = await sidecar.store.rows()
    status, _, body = await admin(
        client, sidecar, "POST", ACCOUNT + "/authorize", account="ann", body=request
    )
    assert (status, body) == (
        400,
        {
            "error": "authorization_rejected",
            "message": "invalid_grant: unknown or used code",
            "provider_error": "invalid_grant",
            "provider_error_description": "unknown or used code",
        },
    )
    assert await sidecar.store.rows() == rows_before and idp.calls == 2


async def test_authorize_with_a_wrong_verifier_or_redirect_uri_is_rejected(
    start, idp, client
) -> None:
    sidecar = await start()
    for request in (
        {"code": idp.code(verifier=VERIFIER), "redirect_uri": REDIRECT, "code_verifier": "w" * 43},
        {"code": idp.code(verifier=VERIFIER), "redirect_uri": REDIRECT},
        {"code": idp.code(), "redirect_uri": REDIRECT + "/other"},
    ):
        status, _, body = await admin(client, sidecar, "POST", ACCOUNT + "/authorize", body=request)
        assert (status, body["provider_error"]) == (400, "invalid_grant")
    assert idp.calls == 3 and await sidecar.store.rows() == []


async def test_authorize_reports_every_problem_without_calling_the_provider(
    start, idp, client
) -> None:
    sidecar = await start()
    request = {"redirect_uri": "/relative#frag", "code_verifier": "short", "state": "s"}
    status, _, body = await admin(client, sidecar, "POST", ACCOUNT + "/authorize", body=request)
    assert (status, body["problems"]) == (
        422,
        [
            "state: unknown field",
            "code: is required",
            "redirect_uri: must be an absolute URI without a fragment",
            "code_verifier: must be 43 to 128 characters of A-Z, a-z, 0-9, '-', '.', '_', '~' "
            "(RFC 7636 §4.1)",
        ],
    )
    assert idp.calls == 0


async def test_authorize_without_a_refresh_token_warns(start, idp, client) -> None:
    sidecar = await start()
    idp.issue_refresh = False
    request = {"code": idp.code(), "redirect_uri": REDIRECT}
    status, _, body = await admin(client, sidecar, "POST", ACCOUNT + "/authorize", body=request)
    assert status == 201 and len(body["warnings"]) == 1
    assert body["warnings"][0].startswith("the provider issued no refresh_token")


async def test_authorize_when_the_token_endpoint_fails(start, idp, client) -> None:
    sidecar = await start()
    idp.script.append(lambda: web.json_response({}, status=503, headers={"Retry-After": "7"}))
    request = {"code": idp.code(), "redirect_uri": REDIRECT}
    status, headers, body = await admin(
        client, sidecar, "POST", ACCOUNT + "/authorize", body=request
    )
    assert (status, body["error"], headers["Retry-After"]) == (
        502,
        "token_endpoint_unavailable",
        "7",
    )
    assert await sidecar.store.rows() == []


# --- refresh ------------------------------------------------------------------------------


async def test_refresh_calls_the_token_endpoint_once_and_the_proxy_uses_the_new_token(
    start, idp, api, clock, client
) -> None:
    sidecar = await start()
    await seed(sidecar, idp, api, clock, account="main", expires_in=3600)  # fresh
    clock.advance(100)
    status, _, body = await admin(client, sidecar, "POST", ACCOUNT + "/refresh")
    assert status == 200
    assert body == summary("main", access_expires_at=clock() + 3600, refreshed_at=clock())
    assert idp.calls == 1 and idp.requests[0]["grant_type"] == "refresh_token"
    api.valid.add("access-2")
    assert (await proxied(client, sidecar, "main"))[2]["token"] == "access-2"
    assert idp.calls == 1


async def test_refresh_of_a_dead_grant_marks_the_account_and_stops_calling(
    start, idp, api, clock, client
) -> None:
    sidecar = await start()
    await seed(sidecar, idp, api, clock)
    idp.valid_refresh.clear()  # the provider revoked the grant
    for _ in range(2):
        status, _, body = await admin(client, sidecar, "POST", ACCOUNT + "/refresh")
        assert (status, body["error"], body["reason"]) == (
            409,
            "reauthorization_required",
            "invalid_grant",
        )
    assert idp.calls == 1
    status, _, body = await admin(client, sidecar, "GET", ACCOUNT)
    assert (body["state"], body["reason"], body["state_changed_at"]) == (
        "reauthorization_required",
        "invalid_grant",
        clock(),
    )


async def test_refresh_transient_failure_answers_503_with_retry_after(
    start, idp, api, clock, client
) -> None:
    sidecar = await start()
    await seed(sidecar, idp, api, clock)
    idp.script.append(lambda: web.json_response({}, status=500))
    status, headers, body = await admin(client, sidecar, "POST", ACCOUNT + "/refresh")
    assert (status, body["error"]) == (503, "token_unavailable")
    assert int(headers["Retry-After"]) >= 1
    status, _, body = await admin(client, sidecar, "GET", ACCOUNT)
    assert body["state"] == "active" and body["retry_at"] > clock()
    assert idp.calls == 1


async def test_refresh_and_get_of_an_unknown_account(start, client) -> None:
    sidecar = await start()
    for method, template in (("POST", ACCOUNT + "/refresh"), ("GET", ACCOUNT)):
        status, _, body = await admin(client, sidecar, method, template, account="ghost")
        assert (status, body) == (
            404,
            {"error": "unknown_account", "message": "no account 'ghost' for provider 'example'"},
        )


# --- revoke and delete --------------------------------------------------------------------


async def test_delete_revokes_refresh_then_access_token_then_deletes(
    start, idp, api, clock, client
) -> None:
    sidecar = await start()
    token = await seed(sidecar, idp, api, clock, account="main")
    status, _, body = await admin(client, sidecar, "DELETE", ACCOUNT)
    assert (status, body) == (200, {"account": "main", "deleted": True, "revocation": "revoked"})
    assert idp.revocations == [
        {"token": token.refresh_token, "token_type_hint": "refresh_token"},
        {"token": token.access_token, "token_type_hint": "access_token"},
    ]
    assert len(idp.revocation_auth) == 2 and all(
        h is not None and h.startswith("Basic ") for h in idp.revocation_auth
    )
    assert idp.calls == 0 and await sidecar.store.rows() == []
    status, headers, body = await proxied(client, sidecar, "main")
    assert (status, headers["X-Sidecar-Error"]) == (404, "unknown_account")
    status, _, body = await admin(client, sidecar, "DELETE", ACCOUNT)
    assert (status, body["error"]) == (404, "unknown_account")
    assert len(idp.revocations) == 2


async def test_delete_skips_an_expired_access_token(start, idp, api, clock, client) -> None:
    sidecar = await start()
    token = await seed(sidecar, idp, api, clock, expires_in=10)
    clock.advance(11)
    assert (await admin(client, sidecar, "DELETE", ACCOUNT))[0] == 200
    assert idp.revocations == [{"token": token.refresh_token, "token_type_hint": "refresh_token"}]


async def test_after_delete_the_running_proxy_answers_unknown_account(
    start, idp, api, clock, client
) -> None:
    sidecar = await start()
    await seed(sidecar, idp, api, clock, account="main")
    assert (await proxied(client, sidecar, "main"))[0] == 200  # cached now
    assert (await admin(client, sidecar, "DELETE", ACCOUNT))[0] == 200
    status, headers, _ = await proxied(client, sidecar, "main")
    assert (status, headers["X-Sidecar-Error"]) == (404, "unknown_account")


async def test_delete_keeps_the_account_when_revocation_fails_unless_forced(
    start, idp, api, clock, client
) -> None:
    sidecar = await start()
    await seed(sidecar, idp, api, clock)
    idp.revoke_script.append(lambda: web.Response(status=503))
    idp.revoke_script.append(lambda: oauth_error("invalid_client", "bad secret", status=401))
    status, _, body = await admin(client, sidecar, "DELETE", ACCOUNT)
    assert (status, body["error"], body["provider_error"]) == (502, "revocation_failed", None)
    status, _, body = await admin(client, sidecar, "DELETE", ACCOUNT)
    assert (status, body["provider_error"]) == (502, "invalid_client")
    assert len(await sidecar.store.rows()) == 1
    status, _, body = await admin(client, sidecar, "DELETE", ACCOUNT, query={"force": "yes"})
    assert (status, body["problems"]) == (422, ["force: must be true or false, got 'yes'"])
    idp.revoke_script.append(lambda: web.Response(status=503))
    status, _, body = await admin(client, sidecar, "DELETE", ACCOUNT, query={"force": "true"})
    assert (status, body) == (200, {"account": "main", "deleted": True, "revocation": "failed"})
    assert await sidecar.store.rows() == [] and len(idp.revocations) == 3


async def test_delete_without_a_revocation_endpoint_just_deletes(
    start, idp, api, clock, client
) -> None:
    sidecar = await start(provider={"revocation_url": None})
    await seed(sidecar, idp, api, clock)
    status, _, body = await admin(client, sidecar, "DELETE", ACCOUNT)
    assert (status, body["revocation"]) == (200, "not_configured")
    assert idp.revocations == [] and await sidecar.store.rows() == []


async def test_an_unsupported_token_type_does_not_fail_the_revocation(
    start, idp, api, clock, client
) -> None:
    sidecar = await start()
    await seed(sidecar, idp, api, clock)
    idp.revoke_script.append(lambda: web.Response(status=200))
    idp.revoke_script.append(lambda: oauth_error("unsupported_token_type"))
    status, _, body = await admin(client, sidecar, "DELETE", ACCOUNT)
    assert (status, body["revocation"]) == (200, "revoked")


# --- the document, and secrets --------------------------------------------------------------


async def test_the_served_openapi_document_describes_every_route(start, client) -> None:
    sidecar = await start()
    status, _, body = await admin(client, sidecar, "GET", "/openapi.json")
    assert status == 200 and body == SPEC
    api = AdminApi(
        MemoryStore(),
        Metrics(),
        (),
        lambda: True,
        cast(AccountService, object()),
        "t" * 16,
        cast(Logins, object()),
    )
    routes = {(route.method.lower(), route.template) for route in api.routes}
    documented_routes = {
        (method, path)
        for path, item in SPEC["paths"].items()
        for method in item
        if method != "parameters"
    }
    assert routes == documented_routes


async def test_no_answer_or_log_line_holds_a_token(start, idp, api, clock, client, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    sidecar = await start()
    answers = []
    pair = {"access_token": "imported-at", "refresh_token": "imported-rt", "expires_in": 60}
    answers.append(await admin(client, sidecar, "PUT", ACCOUNT, account="a", body=pair))
    code = {
        "code": idp.code(verifier=VERIFIER),
        "redirect_uri": REDIRECT,
        "code_verifier": VERIFIER,
    }
    answers.append(
        await admin(client, sidecar, "POST", ACCOUNT + "/authorize", account="b", body=code)
    )
    idp.valid_refresh.add("imported-rt")
    answers.append(await admin(client, sidecar, "POST", ACCOUNT + "/refresh", account="a"))
    answers.append(await admin(client, sidecar, "GET", ACCOUNTS))
    answers.append(await admin(client, sidecar, "DELETE", ACCOUNT, account="b"))
    answers.append(await admin(client, sidecar, "DELETE", ACCOUNT, account="a"))
    assert [status for status, _, _ in answers] == [201, 201, 200, 200, 200, 200]
    secrets = {"imported-at", "imported-rt", VERIFIER, ADMIN_TOKEN, *idp.issued_access}
    secrets |= idp.valid_refresh | idp.rotated_away | {r["token"] for r in idp.revocations}
    text = json.dumps([body for _, _, body in answers])
    logged = "\n".join(JsonFormatter().format(record) for record in caplog.records)
    assert "account_imported" in logged and "account_deleted" in logged
    for secret in secrets:
        assert secret not in text and secret not in logged, secret
