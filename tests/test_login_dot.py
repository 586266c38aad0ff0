"""The login flow against a real authorization server: django-oauth-toolkit on 127.0.0.1.

The provider is configured by ``issuer`` only, so its token, authorization and revocation
endpoints all come from its RFC 8414 metadata. A person's part (signing in, pressing
"Authorize") is played by an HTTP client following the URL the sidecar prints.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from sidecar import config as config_module
from sidecar.app import Sidecar
from tests.authserver import CLIENT_ID, CLIENT_SECRET, Browser, Dot, start_dot
from tests.conftest import base_config, write_secret
from tests.test_accounts_cli import accounts, stored_token
from tests.test_accounts_cli import sidecar as run_sidecar
from tests.test_cli import write_config

ADMIN_TOKEN = "admin-token-for-login-tests"


@pytest.fixture(scope="module")
def dot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dot]:
    server = start_dot(tmp_path_factory.mktemp("dot"))
    yield server
    server.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    b = Browser()
    yield b
    await b.close()


def dot_config(tmp: Path, dot: Dot) -> dict[str, Any]:
    write_secret(tmp / "client-secret", CLIENT_SECRET)
    write_secret(tmp / "admin.token", ADMIN_TOKEN)
    raw = base_config(
        tmp,
        "",
        "http://127.0.0.1:9",
        provider={"issuer": dot.issuer, "client_id": CLIENT_ID, "scopes": ["read"]},
    )
    del raw["provider"][0]["token_url"]  # discovered
    raw["admin"]["token_file"] = "admin.token"
    return raw


async def connect_process(config: Path, account: str) -> tuple[asyncio.subprocess.Process, str]:
    """Start `sidecar accounts connect`; return it and the URL it prints."""
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "sidecar", "accounts", "connect", "--config", str(config)),
        *("--provider", "example", "--account", account, "--no-browser", "--timeout", "60"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    async with asyncio.timeout(60):
        while True:
            line = (await proc.stdout.readline()).decode()
            assert line, "connect exited before printing the URL"
            if line.startswith("  http"):
                return proc, line.strip()


async def test_connect_signs_in_at_a_real_server_and_stores_a_working_pair(
    dot: Dot, secrets_dir: Path, browser: Browser
) -> None:
    config = write_config(secrets_dir, dot_config(secrets_dir, dot))
    proc, url = await connect_process(config, "alice")
    query = parse_qs(urlsplit(url).query)
    assert url.startswith(dot.issuer + "/o/authorize/?")
    assert query["code_challenge_method"] == ["S256"] and query["scope"] == ["read"]
    assert query["redirect_uri"][0].startswith("http://127.0.0.1:")

    status, page, landed = await browser.sign_in(url)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert (status, proc.returncode) == (200, 0), (page, err.decode())
    assert "is connected" in page
    assert "connected new account 'alice' of provider 'example'" in out.decode()
    code = parse_qs(urlsplit(landed).query)["code"][0]
    token = await stored_token(config, "alice")
    assert token is not None and token.refresh_token
    for secret in (code, token.access_token, token.refresh_token):
        assert secret not in out.decode() + err.decode() + page

    # The stored pair is real: the server refreshes it (rotating the refresh token)...
    rc, out_text, err_text = await accounts(config, "refresh", "--account", "alice")
    assert rc == 0, err_text
    refreshed = await stored_token(config, "alice")
    assert refreshed is not None and refreshed.refresh_token != token.refresh_token
    # ...and revokes it at the discovered revocation endpoint.
    rc, out_text, err_text = await accounts(config, "revoke", "--account", "alice")
    assert (rc, out_text.strip()) == (
        0,
        "revoked and deleted account 'alice' of provider 'example'",
    )


async def test_admin_api_connect_and_callback_against_a_real_server(
    dot: Dot, secrets_dir: Path, browser: Browser
) -> None:
    cfg = config_module.parse(dot_config(secrets_dir, dot), {}, secrets_dir)
    sidecar = await Sidecar.start(cfg, registry=CollectorRegistry())
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    base = sidecar.url("admin") + "/v1/providers/example/accounts/bob"
    try:
        async with aiohttp.ClientSession(headers=headers) as admin:
            async with admin.post(base + "/connect") as resp:
                assert resp.status == 200
                started = await resp.json()
            assert started["redirect_uri"] == sidecar.url("admin") + "/oauth/callback"
            status, page, landed = await browser.sign_in(started["authorization_url"])
            assert (status, "is connected" in page) == (200, True), page
            async with admin.get(base) as resp:
                assert (resp.status, (await resp.json())["state"]) == (200, "active")
            # A replayed redirect gets an error page, and the code is not sent again.
            status, page = await browser.get(landed)
            assert status == 400 and "Unknown or used sign-in link" in page
    finally:
        await sidecar.stop()


async def test_cancel_at_the_server_ends_connect_with_its_error_and_nothing_stored(
    dot: Dot, secrets_dir: Path, browser: Browser
) -> None:
    config = write_config(secrets_dir, dot_config(secrets_dir, dot))
    proc, url = await connect_process(config, "carol")
    status, page, _ = await browser.sign_in(url, approve=False)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert (status, proc.returncode) == (400, 1)
    assert "Sign-in was not completed" in page and "access_denied" in page
    assert "access_denied" in err.decode()
    assert await stored_token(config, "carol") is None


async def test_check_config_online_shows_the_real_servers_endpoints(
    dot: Dot, secrets_dir: Path
) -> None:
    config = write_config(secrets_dir, dot_config(secrets_dir, dot))
    rc, out, err = await run_sidecar("check-config", "--config", str(config), "--online")
    assert rc == 0, err
    assert out.splitlines()[1:] == [
        f"provider 'example': issuer {dot.issuer} "
        f"({dot.issuer}/.well-known/oauth-authorization-server)",
        f"  token_url = {dot.issuer}/o/token/",
        f"  authorization_url = {dot.issuer}/o/authorize/",
        f"  revocation_url = {dot.issuer}/o/revoke_token/",
    ]
