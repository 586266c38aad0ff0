"""The command line, run as a user would: import, key rotation, run and SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w
from aiohttp import web

from sidecar.crypto import generate_key
from sidecar.store.sqlite import SQLiteStore
from tests.conftest import base_config, write_secret


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp: Path, raw: dict[str, Any]) -> Path:
    path = tmp / "config.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


def sidecar_cmd(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def config_file(secrets_dir: Path) -> Path:
    return write_config(
        secrets_dir, base_config(secrets_dir, "http://127.0.0.1:9/token", "http://127.0.0.1:9")
    )


def test_import_reports_bad_lines_and_imports_nothing(config_file: Path) -> None:
    lines = "\n".join(
        [
            json.dumps({"account": "a", "access_token": "x", "refresh_token": "y"}),
            "not json",
            json.dumps({"account": "b", "access_token": "x"}),
            json.dumps(
                {"account": "c", "access_token": "x", "refresh_token": "y", "expires_in": -5}
            ),
            json.dumps({"account": "a", "access_token": "x", "refresh_token": "y"}),
        ]
    )
    result = sidecar_cmd(
        "accounts", "import", "--config", str(config_file), "--provider", "example", stdin=lines
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "nothing imported: 4 bad line(s)",
        "  line 2: not a JSON object",
        "  line 3: refresh_token is required for a refresh_token provider",
        "  line 4: expires_in must be a number of seconds, 0 or more",
        "  line 5: account 'a' appears twice",
    ]
    assert not (config_file.parent / "tokens.db").exists() or _count(config_file) == 0


def _count(config_file: Path) -> int:
    async def count() -> int:
        store = await SQLiteStore.open(str(config_file.parent / "tokens.db"))
        try:
            return len(await store.rows())
        finally:
            await store.close()

    return asyncio.run(count())


def test_import_then_rotate_keys(config_file: Path) -> None:
    lines = "".join(
        json.dumps(
            {
                "account": f"u{i}",
                "access_token": f"at{i}",
                "refresh_token": f"rt{i}",
                "expires_in": 3600,
            }
        )
        + "\n"
        for i in range(3)
    )
    result = sidecar_cmd(
        "accounts", "import", "--config", str(config_file), "--provider", "example", stdin=lines
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "imported 3 account(s) into provider 'example'"
    assert "at0" not in result.stdout + result.stderr
    assert _count(config_file) == 3
    key_file = config_file.parent / "store.key"
    write_secret(key_file, generate_key() + "\n" + key_file.read_text())
    result = sidecar_cmd("keys", "rotate", "--config", str(config_file))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("re-encrypted 3 row(s) with key ")


def test_import_unknown_provider(config_file: Path) -> None:
    result = sidecar_cmd(
        "accounts", "import", "--config", str(config_file), "--provider", "nope", stdin=""
    )
    assert result.returncode == 2 and "no provider named 'nope'" in result.stderr


def test_keys_generate_prints_a_usable_key() -> None:
    result = sidecar_cmd("keys", "generate")
    import base64

    assert len(base64.urlsafe_b64decode(result.stdout.strip())) == 32


async def wait_ready(url: str, proc: asyncio.subprocess.Process, deadline: float = 20) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    async with aiohttp.ClientSession() as session:
        while loop.time() < end:
            assert proc.returncode is None, "sidecar exited early"
            try:
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)
    raise AssertionError("sidecar did not become ready")


@dataclass
class SidecarProcess:
    proc: asyncio.subprocess.Process
    proxy_url: str


async def start_sidecar_process(
    secrets_dir: Path, token_url: str, target: str, access_token: str, stderr: int
) -> SidecarProcess:
    """`sidecar accounts import` one account, then `sidecar run` until /readyz answers."""
    raw = base_config(secrets_dir, token_url, target)
    admin_port, proxy_port = free_port(), free_port()
    raw["admin"]["listen"] = f"127.0.0.1:{admin_port}"
    raw["upstream"][0]["listen"] = f"127.0.0.1:{proxy_port}"
    config = write_config(secrets_dir, raw)
    line = json.dumps(
        {
            "account": "main",
            "access_token": access_token,
            "refresh_token": access_token + "-refresh",
        }
    )
    imported = sidecar_cmd(
        "accounts", "import", "--config", str(config), "--provider", "example", stdin=line
    )
    assert imported.returncode == 0, imported.stderr
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "run", "--config", str(config), stderr=stderr
    )
    try:
        await wait_ready(f"http://127.0.0.1:{admin_port}/readyz", proc)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return SidecarProcess(proc, f"http://127.0.0.1:{proxy_port}")


async def test_run_serves_and_sigterm_drains_in_flight(
    secrets_dir: Path, aiohttp_server, idp
) -> None:
    release, arrived = asyncio.Event(), asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.json_response({"auth": request.headers.get("Authorization")})

    app = web.Application()
    app.router.add_get("/{tail:.*}", slow)
    upstream = await aiohttp_server(app)
    started = await start_sidecar_process(
        secrets_dir,
        idp.url,
        str(upstream.make_url("")).rstrip("/"),
        "cli-access-token",
        asyncio.subprocess.PIPE,
    )
    proc, proxy_url = started.proc, started.proxy_url
    proxy_port = int(proxy_url.rsplit(":", 1)[1])
    try:
        async with aiohttp.ClientSession() as client:
            request = asyncio.ensure_future(client.get(f"{proxy_url}/x"))
            await asyncio.wait_for(arrived.wait(), 10)
            proc.send_signal(signal.SIGTERM)
            # Stopped accepting: a new connection is refused while the old request drains.
            loop = asyncio.get_running_loop()
            end = loop.time() + 10
            while True:
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", proxy_port)
                    w.close()
                except OSError:
                    break
                assert loop.time() < end, "listener still accepting after SIGTERM"
                await asyncio.sleep(0.02)
            release.set()
            resp = await request
            assert resp.status == 200
            assert await resp.json() == {"auth": "Bearer cli-access-token"}
            resp.release()
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        assert proc.stderr is not None
        logs = (await proc.stderr.read()).decode()
        events = [json.loads(line)["event"] for line in logs.splitlines()]
        assert events[-1] == "stopped" and "ready" in events and "stopping" in events
        assert "cli-access-token" not in logs  # nor its refresh token, "cli-access-token-refresh"
        assert "s3cr3t" not in logs
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        release.set()
