"""``sidecar accounts list|authorize|refresh|revoke``, run as a user would, against a fake
token endpoint (authorization codes with PKCE, rotation, RFC 7009 revocation) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sidecar.credentials.codec import unseal
from sidecar.crypto import TokenCipher
from sidecar.model import Token
from sidecar.store.sqlite import SQLiteStore
from tests.conftest import base_config
from tests.fakes import oauth_error
from tests.test_admin_api import REDIRECT, VERIFIER, AuthServer
from tests.test_cli import write_config


@pytest.fixture
async def idp(aiohttp_server: Any) -> AsyncIterator[AuthServer]:
    fake = AuthServer()
    server = await aiohttp_server(fake.app())
    fake.url = str(server.make_url("/token"))  # type: ignore[attr-defined]
    fake.revoke_url = str(server.make_url("/revoke"))  # type: ignore[attr-defined]
    yield fake


@pytest.fixture
def config_file(secrets_dir: Path, idp: AuthServer) -> Path:
    raw = base_config(
        secrets_dir,
        idp.url,  # type: ignore[attr-defined]
        "http://127.0.0.1:9",
        provider={"revocation_url": idp.revoke_url},  # type: ignore[attr-defined]
    )
    return write_config(secrets_dir, raw)


async def sidecar(*args: str, stdin: str = "", cwd: Path | None = None) -> tuple[int, str, str]:
    """Run the command in a child process; the fakes keep serving on this loop meanwhile."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        *args,
        cwd=cwd,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def accounts(config: Path, action: str, *args: str, stdin: str = "") -> tuple[int, str, str]:
    return await sidecar(
        "accounts", action, "--config", str(config), "--provider", "example", *args, stdin=stdin
    )


async def stored_token(config: Path, account: str) -> Token | None:
    store = await SQLiteStore.open(str(config.parent / "tokens.db"))
    try:
        row = await store.get("example", account)
    finally:
        await store.close()
    keys = (config.parent / "store.key").read_text().split()
    cipher = TokenCipher([base64.urlsafe_b64decode(k) for k in keys])
    return None if row is None else unseal(cipher, row).token


async def test_list_shows_state_and_times_never_tokens(config_file: Path) -> None:
    lines = "".join(
        json.dumps(
            {"account": a, "access_token": f"at-{a}", "refresh_token": f"rt-{a}", "expires_in": 60}
        )
        + "\n"
        for a in ("carol", "alice", "bob")
    )
    code, _, err = await accounts(config_file, "import", stdin=lines)
    assert code == 0, err
    store = await SQLiteStore.open(str(config_file.parent / "tokens.db"))
    await store.set_state("example", "bob", "reauthorization_required", "invalid_grant", 0.0)
    await store.close()
    code, out, err = await accounts(config_file, "list")
    assert code == 0, err
    table = out.splitlines()
    assert table[0].split() == ["ACCOUNT", "STATE", "ACCESS", "EXPIRES", "REFRESHED", "REASON"]
    assert [row.split()[:2] for row in table[1:]] == [
        ["alice", "active"],
        ["bob", "reauthorization_required"],
        ["carol", "active"],
    ]
    assert table[2].split()[-1] == "invalid_grant" and table[1].split()[-1] == "-"
    code, out, _ = await accounts(config_file, "list", "--state", "active", "--json")
    listed = [json.loads(line) for line in out.splitlines()]
    assert [a["account"] for a in listed] == ["alice", "carol"]
    assert {a["access_expires_at"] - a["refreshed_at"] for a in listed} == {60.0}
    assert set(listed[0]) == {
        "account",
        "state",
        "reason",
        "state_changed_at",
        "access_expires_at",
        "refresh_expires_at",
        "refreshed_at",
        "retry_at",
    }
    assert "at-" not in out and "rt-" not in out


async def test_authorize_refresh_and_revoke_from_the_command_line(
    config_file: Path, idp: AuthServer
) -> None:
    code = idp.code(verifier=VERIFIER)
    status, out, err = await accounts(
        config_file,
        "authorize",
        "--account",
        "ann",
        "--code",
        code,
        "--redirect-uri",
        REDIRECT,
        "--code-verifier",
        VERIFIER,
    )
    assert (status, err) == (0, "")
    assert out.startswith("authorized new account 'ann' of provider 'example'; access token ")
    assert idp.requests == [
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "code_verifier": VERIFIER,
        }
    ]
    first = await stored_token(config_file, "ann")
    assert first is not None and first.access_token == idp.issued_access[-1]

    status, out, err = await accounts(config_file, "refresh", "--account", "ann")
    assert (status, err) == (0, "")
    assert out.startswith("refreshed account 'ann' of provider 'example'; access token expires")
    assert idp.calls == 2 and idp.requests[1]["refresh_token"] == first.refresh_token
    second = await stored_token(config_file, "ann")
    assert second is not None and second.refresh_token in idp.valid_refresh
    assert second.access_token == idp.issued_access[-1] != first.access_token

    status, out, err = await accounts(config_file, "revoke", "--account", "ann")
    assert (status, out, err) == (
        0,
        "revoked and deleted account 'ann' of provider 'example'\n",
        "",
    )
    assert idp.revocations == [
        {"token": second.refresh_token, "token_type_hint": "refresh_token"},
        {"token": second.access_token, "token_type_hint": "access_token"},
    ]
    assert await stored_token(config_file, "ann") is None
    status, out, err = await accounts(config_file, "revoke", "--account", "ann")
    assert (status, err) == (1, "error: no account 'ann' for provider 'example'\n")
    assert len(idp.revocations) == 2
    for secret in (code, VERIFIER, first.access_token, second.access_token):
        assert secret not in out + err


async def test_authorize_reports_every_problem_and_calls_nothing(
    config_file: Path, idp: AuthServer
) -> None:
    status, out, err = await accounts(
        config_file,
        "authorize",
        "--account",
        "ann",
        "--code",
        "",
        "--redirect-uri",
        "callback#x",
        "--code-verifier",
        "short",
    )
    assert (status, out) == (2, "")
    assert err.splitlines() == [
        "3 problem(s):",
        "  code: must be a non-empty string",
        "  redirect_uri: must be an absolute URI without a fragment",
        "  code_verifier: must be 43 to 128 characters of A-Z, a-z, 0-9, '-', '.', '_', '~' "
        "(RFC 7636 §4.1)",
    ]
    assert idp.calls == 0


async def test_a_rejected_code_and_a_dead_grant_are_errors(
    config_file: Path, idp: AuthServer
) -> None:
    args = ("--account", "ann", "--code", "never-issued", "--redirect-uri", REDIRECT)
    status, _, err = await accounts(config_file, "authorize", *args)
    assert (status, err) == (1, "error: invalid_grant: unknown or used code\n")
    pair = {"account": "ann", "access_token": "a", "refresh_token": "dead", "expires_in": 5}
    assert (await accounts(config_file, "import", stdin=json.dumps(pair)))[0] == 0
    status, _, err = await accounts(config_file, "refresh", "--account", "ann")
    logged, last = err.splitlines()
    assert (status, last) == (1, "error: account needs re-authorization: invalid_grant")
    assert json.loads(logged)["event"] == "account_needs_reauthorization"
    status, out, _ = await accounts(config_file, "list", "--json")
    assert json.loads(out)["state"] == "reauthorization_required"
    assert idp.calls == 2


async def test_revoke_keeps_the_account_when_the_provider_fails_unless_forced(
    config_file: Path, idp: AuthServer
) -> None:
    pair = {"account": "ann", "access_token": "a", "refresh_token": "r", "expires_in": 600}
    assert (await accounts(config_file, "import", stdin=json.dumps(pair)))[0] == 0
    idp.revoke_script.append(lambda: oauth_error("invalid_client", "bad secret", status=401))
    status, _, err = await accounts(config_file, "revoke", "--account", "ann")
    logged, last = err.splitlines()
    assert (status, last) == (
        1,
        "error: revocation failed (invalid_client: bad secret); the account is kept",
    )
    assert json.loads(logged) | {"ts": "-"} == {
        "ts": "-",
        "level": "warning",
        "logger": "sidecar.credentials.accounts",
        "event": "account_revocation_failed",
        "provider": "example",
        "account": "ann",
        "error": "invalid_client: bad secret",
    }
    assert await stored_token(config_file, "ann") is not None
    idp.revoke_script.append(lambda: web.Response(status=503))
    status, out, _ = await accounts(config_file, "revoke", "--account", "ann", "--force")
    assert (status, out) == (
        0,
        "deleted WITHOUT revocation (--force) account 'ann' of provider 'example'\n",
    )
    assert await stored_token(config_file, "ann") is None and len(idp.revocations) == 2


async def test_unknown_provider_is_a_usage_error(config_file: Path) -> None:
    status, _, err = await sidecar(
        "accounts", "list", "--config", str(config_file), "--provider", "nope"
    )
    assert status == 2 and "--provider: no provider named 'nope'" in err
