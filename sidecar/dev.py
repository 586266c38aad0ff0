"""``sidecar dev``: a self-contained demo, no config and no credentials.

Starts, all on 127.0.0.1: a demo provider (a sign-in page and authorization codes with PKCE,
RFC 8414 metadata, short-lived tokens, refresh-token rotation and reuse detection), a demo API
that rejects expired or revoked tokens with 401, and the sidecar between them with two accounts
imported. Within a minute a user sees injection, background and on-demand refreshes, a retry
after a 401, and the metrics moving. It prints the provider's settings, so the README's
Quickstart (``accounts connect``, then ``run``) can be tried against it with no account
anywhere.
"""

from __future__ import annotations

import html
import itertools
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar import config as config_module
from sidecar.app import Sidecar
from sidecar.credentials.maintenance import import_credentials
from sidecar.crypto import TokenCipher, generate_key
from sidecar.errors import ListenError
from sidecar.grants.authorization_code import code_challenge
from sidecar.model import Clock, Credential, Token, fingerprint

DEMO_ACCOUNTS = ("alice", "bob")


@dataclass
class DemoProvider:
    """An OAuth token endpoint with rotation and reuse detection (RFC 9700 §4.14.2)."""

    clock: Clock
    lifetime: float = 20.0
    access: dict[str, tuple[str, float]] = field(default_factory=dict)  # token -> account, exp
    refresh: dict[str, str] = field(default_factory=dict)  # live refresh token -> account
    spent: dict[str, str] = field(default_factory=dict)  # rotated-away refresh token -> account
    # authorization code -> (account, redirect_uri, PKCE challenge); a code works once
    codes: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    issuer: str = ""  # the provider's URL, known once it listens
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def issue(self, account: str) -> Token:
        n = next(self._ids)
        access, refresh = (
            f"demo-at-{n}-{secrets.token_hex(4)}",
            f"demo-rt-{n}-{secrets.token_hex(4)}",
        )
        expires_at = self.clock() + self.lifetime
        self.access[access] = (account, expires_at)
        self.refresh[refresh] = account
        return Token(access, refresh, expires_at, issued_at=self.clock())

    def check(self, access: str) -> str | None:
        """The account an access token belongs to, if it is valid now."""
        account, expires_at = self.access.get(access, ("", 0.0))
        return account if account and self.clock() < expires_at else None

    def revoke_access(self) -> int:
        revoked = len(self.access)
        self.access.clear()
        return revoked

    async def token(self, request: web.Request) -> web.Response:
        form = await request.post()
        presented = str(form.get("refresh_token", ""))
        if form.get("grant_type") == "authorization_code":
            return self._exchange({k: str(v) for k, v in form.items()})
        if form.get("grant_type") != "refresh_token":
            return _oauth_error("unsupported_grant_type")
        if presented in self.spent:  # reuse: revoke the whole family
            victim = self.spent[presented]
            self.refresh = {t: a for t, a in self.refresh.items() if a != victim}
            return _oauth_error("invalid_grant", "refresh token reuse detected")
        account = self.refresh.pop(presented, None)
        if account is None:
            return _oauth_error("invalid_grant", "unknown refresh token")
        self.spent[presented] = account
        return self._token_response(self.issue(account))

    def _exchange(self, form: dict[str, str]) -> web.Response:
        """RFC 6749 §4.1.3 with PKCE S256 (RFC 7636 §4.6)."""
        account, redirect_uri, challenge = self.codes.pop(form.get("code", ""), ("", "", ""))
        if not account or form.get("redirect_uri") != redirect_uri:
            return _oauth_error("invalid_grant", "unknown or used code, or another redirect_uri")
        if code_challenge(form.get("code_verifier", "")) != challenge:
            return _oauth_error("invalid_grant", "PKCE verification failed")
        return self._token_response(self.issue(account))

    def _token_response(self, token: Token) -> web.Response:
        return web.json_response(
            {
                "access_token": token.access_token,
                "token_type": "Bearer",
                "refresh_token": token.refresh_token,
                "expires_in": int(self.lifetime),
            }
        )

    async def sign_in_page(self, request: web.Request) -> web.Response:
        """The authorization endpoint (RFC 6749 §4.1.1): a page to sign in as any user."""
        q = request.query
        if q.get("response_type") != "code" or q.get("code_challenge_method") != "S256":
            return web.Response(status=400, text="needs response_type=code and PKCE S256")
        hidden = "".join(
            f'<input type="hidden" name="{name}" value="{html.escape(q.get(name, ""))}">'
            for name in ("redirect_uri", "state", "code_challenge")
        )
        page = (
            "<!doctype html><title>Demo provider</title><h1>Sign in to the demo provider</h1>"
            f'<form method="post" action="/authorize">{hidden}'
            '<label>User <input name="user" value="demo-user"></label>'
            '<button name="approve" value="yes">Approve</button>'
            '<button name="deny" value="yes">Deny</button></form>'
        )
        return web.Response(text=page, content_type="text/html")

    async def approve(self, request: web.Request) -> web.Response:
        form = {k: str(v) for k, v in (await request.post()).items()}
        answer = {"state": form.get("state", ""), "iss": self.issuer}
        if "deny" in form:
            answer["error"] = "access_denied"
        else:
            answer["code"] = code = secrets.token_urlsafe(16)
            self.codes[code] = (form["user"], form["redirect_uri"], form["code_challenge"])
        raise web.HTTPFound(f"{form['redirect_uri']}?{urlencode(answer)}")

    async def metadata(self, request: web.Request) -> web.Response:
        """RFC 8414 authorization server metadata."""
        return web.json_response(
            {
                "issuer": self.issuer,
                "authorization_endpoint": f"{self.issuer}/authorize",
                "token_endpoint": f"{self.issuer}/token",
                "code_challenge_methods_supported": ["S256"],
                "authorization_response_iss_parameter_supported": True,
            }
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token", self.token)
        app.router.add_get("/authorize", self.sign_in_page)
        app.router.add_post("/authorize", self.approve)
        app.router.add_get("/.well-known/oauth-authorization-server", self.metadata)
        return app


def _oauth_error(error: str, description: str = "") -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=400)


def demo_api(provider: DemoProvider) -> web.Application:
    """An API that answers who you are, and rejects invalid tokens as RFC 6750 §3.1 says."""

    async def hello(request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        account = provider.check(token)
        if account is None:
            return web.json_response(
                {"error": "invalid_token"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return web.json_response(
            {"hello": account, "path": request.path, "token_fingerprint": fingerprint(token)}
        )

    async def revoke(request: web.Request) -> web.Response:
        return web.json_response({"revoked_access_tokens": provider.revoke_access()})

    app = web.Application()
    app.router.add_post("/demo/revoke", revoke)
    app.router.add_route("*", "/{tail:.*}", hello)
    return app


@dataclass
class DevStack:
    sidecar: Sidecar
    provider: DemoProvider
    runners: list[web.AppRunner]
    api_url: str
    provider_url: str

    async def stop(self) -> None:
        await self.sidecar.stop()
        for runner in self.runners:
            await runner.cleanup()

    def instructions(self) -> str:
        proxy, admin = self.sidecar.url("demo-api"), self.sidecar.url("admin")
        return "\n".join(
            [
                "oauth-sidecar demo is running (Ctrl-C stops it). Try:",
                f"  curl {proxy}/v1/hello               # alice, the default account",
                f"  curl -H 'X-Sidecar-Account: bob' {proxy}/v1/hello",
                f"  curl -H 'X-Sidecar-Account: nobody' -i {proxy}/v1/hello   # a sidecar error",
                f"  curl -X POST {self.api_url}/demo/revoke          # API drops its tokens: "
                "the next request is refreshed and replayed",
                f"  curl -s {admin}/metrics | grep '^sidecar_'     # refreshes, retries, requests",
                f"Tokens live {self.provider.lifetime:.0f} s; the background refresher renews them "
                "before they expire (watch token_refreshed in the log).",
                "",
                "The demo provider's settings, for a config of your own (the README's Quickstart "
                "uses them):",
                "  [[provider]]",
                '  name = "example"',
                f'  issuer = "{self.provider_url}"',
                '  client_id = "demo"',
                '  auth_method = "none"',
                f'  # the demo API, for [[upstream]]: target = "{self.api_url}"',
            ]
        )


async def _serve(app: web.Application, port: int, name: str) -> tuple[web.AppRunner, str]:
    """Serve a demo app on 127.0.0.1; a port in use is the same one-line error as the sidecar's."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
    except OSError as exc:
        await runner.cleanup()
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ListenError(name, "127.0.0.1", port, reason.lower()) from None
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def start_dev(
    clock: Clock,
    *,
    state_dir: Path | None = None,
    proxy_port: int = 8081,
    admin_port: int = 9901,
    provider_port: int = 0,
    api_port: int = 0,
    lifetime: float = 20.0,
    registry: CollectorRegistry | None = None,
) -> DevStack:
    provider = DemoProvider(clock, lifetime)
    idp_runner, idp_url = await _serve(provider.app(), provider_port, "demo provider")
    provider.issuer = idp_url
    try:
        api_runner, api_url = await _serve(demo_api(provider), api_port, "demo API")
    except ListenError:
        await idp_runner.cleanup()
        raise
    state = state_dir or Path(tempfile.mkdtemp(prefix="sidecar-dev-"))
    key_file = state / "store.key"
    key_file.write_text(generate_key())
    os.chmod(key_file, 0o600)
    raw = {
        "store": {"url": f"sqlite://{state / 'tokens.db'}", "key_file": str(key_file)},
        "admin": {"listen": f"127.0.0.1:{admin_port}"},
        "provider": [
            {
                "name": "demo",
                "token_url": f"{idp_url}/token",
                "client_id": "demo",
                "auth_method": "none",
                "refresh_skew_seconds": 3,
                "refresh_lead_fraction": 0.25,
            }
        ],
        "upstream": [
            {
                "name": "demo-api",
                "listen": f"127.0.0.1:{proxy_port}",
                "target": api_url,
                "provider": "demo",
                "default_account": "alice",
            }
        ],
    }
    cfg = config_module.parse(raw, {}, state)
    sidecar = await Sidecar.start(cfg, clock=clock, registry=registry)
    now = clock()
    creds = [Credential("demo", a, provider.issue(a), 0, refreshed_at=now) for a in DEMO_ACCOUNTS]
    await import_credentials(sidecar.store, TokenCipher(cfg.store.keys), creds)
    sidecar.refresher.wake()
    return DevStack(sidecar, provider, [idp_runner, api_runner], api_url, idp_url)
