"""Relative paths in the config file, the SQLite store's included, resolve against the config
file's directory in every command, whatever directory the command runs from. Each command is a
real ``sidecar`` process started from a directory that is not the config file's."""

from __future__ import annotations

import asyncio
import json
import shlex
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
import tomli_w

from sidecar import config as config_module
from sidecar.crypto import generate_key
from tests.conftest import CLIENT_SECRET, base_config, write_secret
from tests.fakes import FakeTokenEndpoint, FakeUpstream
from tests.test_accounts_cli import sidecar
from tests.test_cli import free_port, wait_ready
from tests.test_config import problems_of


async def run_in(cwd: Path, command: str, stdin: str = "") -> tuple[int, str, str]:
    """A ``sidecar`` command (split as a shell would) run in a child process from ``cwd``."""
    return await sidecar(*shlex.split(command), stdin=stdin, cwd=cwd)


def relative_config(sub: Path, token_url: str, target: str) -> tuple[int, int]:
    """A config in ``sub`` whose every path is relative: store, key file, client secret."""
    sub.mkdir()
    write_secret(sub / "store.key", generate_key() + "\n")
    write_secret(sub / "client-secret", CLIENT_SECRET + "\n")
    raw = base_config(sub, token_url, target)
    raw["store"] = {"url": "sqlite://tokens.db", "key_file": "store.key"}
    raw["provider"][0]["client_secret_file"] = "client-secret"
    admin_port, proxy_port = free_port(), free_port()
    raw["admin"]["listen"] = f"127.0.0.1:{admin_port}"
    raw["upstream"][0]["listen"] = f"127.0.0.1:{proxy_port}"
    (sub / "config.toml").write_text(tomli_w.dumps(raw))
    return admin_port, proxy_port


async def test_every_command_uses_the_store_beside_the_config_file(
    tmp_path: Path, idp: FakeTokenEndpoint, api: FakeUpstream
) -> None:
    admin_port, proxy_port = relative_config(
        tmp_path / "sub",
        idp.url,  # type: ignore[attr-defined]
        api.url.rstrip("/"),  # type: ignore[attr-defined]
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    access, refresh = idp.grant("main")
    api.valid.add(access)
    line = json.dumps(
        {"account": "main", "access_token": access, "refresh_token": refresh, "expires_in": 4}
    )

    # From the config file's parent, as in "sidecar accounts import --config sub/config.toml".
    code, out, err = await run_in(
        tmp_path, "accounts import --config sub/config.toml --provider example", stdin=line
    )
    assert (code, out.strip()) == (0, "imported 1 account(s) into provider 'example'"), err
    assert (tmp_path / "sub" / "tokens.db").exists()
    assert not (tmp_path / "tokens.db").exists()

    rel = "../sub/config.toml"  # from a sibling directory from now on
    code, out, err = await run_in(
        elsewhere, f"accounts list --config {rel} --provider example --json"
    )
    assert code == 0, err
    assert [json.loads(x)["account"] for x in out.splitlines()] == ["main"]

    code, out, err = await run_in(elsewhere, f"check-config --config {rel}")
    assert code == 0 and "decrypt all 1 stored row(s)" in out, (out, err)
    # The imported token lives 4 s: the default 60-s skew is cut to a tenth of that.
    assert err.splitlines() == [
        "warning: provider[0].refresh_skew_seconds: 60 s is cut to 0.4 s for provider "
        "'example''s 4-s tokens (the shortest lifetime of 1 stored): the skew is at most 0.1 "
        "of a token's lifetime"
    ]

    code, out, err = await run_in(elsewhere, f"keys rotate --config {rel}")
    assert code == 0 and out.startswith("re-encrypted 0 row(s)"), (out, err)

    idp.expires_in = 3600
    api.valid.add("access-2")
    code, out, err = await run_in(
        elsewhere, f"accounts refresh --config {rel} --provider example --account main"
    )
    assert code == 0 and out.startswith("refreshed account 'main'"), (out, err)
    assert idp.requests[-1]["refresh_token"] == refresh

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "run",
        "--config",
        rel,
        cwd=elsewhere,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await wait_ready(f"http://127.0.0.1:{admin_port}/readyz", proc)
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"http://127.0.0.1:{proxy_port}/x") as resp,
        ):
            assert (resp.status, (await resp.json())["token"]) == (200, "access-2")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert idp.calls == 1  # run used the refreshed pair the other commands stored
    assert sorted(p.name for p in elsewhere.iterdir()) == []  # nothing created here


def test_the_sqlite_url_is_made_absolute_against_the_config_directory(
    secrets_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(secrets_dir.parent)  # a relative base_dir, as "--config sub/config.toml"
    base = Path(secrets_dir.name)
    raw = base_config(secrets_dir, "http://127.0.0.1:1/t", "http://127.0.0.1:2")
    raw["store"]["url"] = "sqlite://data/tokens.db"
    cfg = config_module.parse(raw, {}, base)
    assert cfg.store.url == f"sqlite://{secrets_dir / 'data' / 'tokens.db'}"
    raw["store"]["url"] = "sqlite:///var/lib/sidecar/tokens.db"
    assert config_module.parse(raw, {}, base).store.url == "sqlite:///var/lib/sidecar/tokens.db"
    raw["store"]["url"] = "sqlite://"
    assert problems_of(raw, base) == ["store.url: sqlite:// needs a path, e.g. sqlite://tokens.db"]
