"""``sidecar dev``: a self-contained demo, no config and no credentials.

Starts, all on 127.0.0.1: a demo token endpoint (short-lived tokens, refresh-token rotation
and reuse detection), a demo API that rejects expired or revoked tokens with 401, and the
sidecar between them with two accounts imported. Within a minute a user sees injection,
background and on-demand refreshes, a retry after a 401, and the metrics moving.
"""

from __future__ import annotations

import itertools
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar import config as config_module
from sidecar.app import Sidecar
from sidecar.credentials.maintenance import import_credentials
from sidecar.crypto import TokenCipher, generate_key
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
        token = self.issue(account)
        return web.json_response(
            {
                "access_token": token.access_token,
                "token_type": "Bearer",
                "refresh_token": token.refresh_token,
                "expires_in": int(self.lifetime),
            }
        )

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token", self.token)
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
            ]
        )


async def _serve(app: web.Application, port: int) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def start_dev(
    clock: Clock,
    *,
    state_dir: Path | None = None,
    proxy_port: int = 8081,
    admin_port: int = 9901,
    lifetime: float = 20.0,
    registry: CollectorRegistry | None = None,
) -> DevStack:
    provider = DemoProvider(clock, lifetime)
    idp_runner, idp_url = await _serve(provider.app(), 0)
    api_runner, api_url = await _serve(demo_api(provider), 0)
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
