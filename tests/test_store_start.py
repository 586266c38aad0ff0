"""Starting while PostgreSQL is away: retry with backoff, not ready meanwhile, then serve;
or give up after ``[store] connect_retry_seconds`` with the usual message.

Real ``sidecar run`` processes reach PostgreSQL through a TCP relay the test controls.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import pytest
import tomli_w

from sidecar import config as config_module
from sidecar.errors import ConfigError
from tests.conftest import base_config
from tests.relay import Relay
from tests.test_cli import free_port

if TYPE_CHECKING:
    from tests.pg import PgSchema

pytest_plugins = ("tests.pg",)


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float) -> None:
    """Poll ``check`` until it holds, failing after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not await check():
        assert loop.time() < end, f"timed out waiting until {what}"
        await asyncio.sleep(0.05)


async def status(url: str) -> tuple[int, dict[str, Any]] | None:
    """The status and JSON body at ``url``, or None when nothing listens there."""
    try:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            return response.status, await response.json()
    except aiohttp.ClientConnectionError:
        return None


def write_config(tmp: Path, store_url: str, admin_port: int, retry: float) -> Path:
    raw = base_config(tmp, "http://127.0.0.1:9/token", "http://127.0.0.1:9")
    raw["store"].update({"url": store_url, "connect_retry_seconds": retry})
    raw["admin"]["listen"] = f"127.0.0.1:{admin_port}"
    path = tmp / "config.toml"
    path.write_text(tomli_w.dumps(raw))
    return path


async def start(config: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "run", "--config", str(config),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


def events(stderr: bytes) -> list[dict[str, Any]]:
    found = []
    for line in stderr.decode().splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return found


async def test_start_waits_for_an_unreachable_store_not_ready_meanwhile(
    secrets_dir: Path, pg_schema: PgSchema
) -> None:
    relay = Relay.before(pg_schema.url)
    await relay.up()
    await relay.cut()  # the port is known, nothing listens: PostgreSQL is away
    admin = f"http://127.0.0.1:{free_port()}"
    config = write_config(secrets_dir, relay.url(pg_schema.url), int(admin.rsplit(":", 1)[1]), 60)
    process = await start(config)
    try:

        async def not_ready() -> bool:
            return await status(admin + "/readyz") is not None

        await eventually(not_ready, "the admin listener answers", 30)
        assert await status(admin + "/readyz") == (
            503,
            {"error": "not_ready", "message": "starting: waiting for the token store"},
        )
        assert await status(admin + "/healthz") == (200, {"status": "starting"})
        assert process.returncode is None

        await relay.up()
        came_back = time.monotonic()

        async def ready() -> bool:
            answer = await status(admin + "/readyz")
            return answer is not None and answer[0] == 200

        await eventually(ready, "ready once the store is back", 15)
        print(f"ready {time.monotonic() - came_back:.2f} s after the store came back")
        assert (await status(admin + "/healthz")) == (200, {"status": "ok"})
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
        assert process.stderr is not None
        logged = events(await process.stderr.read())
        retries = [e for e in logged if e["event"] == "store_unreachable"]
        assert retries and all(e["retry_in_seconds"] <= 5 for e in retries)
        assert [e["event"] for e in logged].count("ready") == 1
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await relay.cut()


async def test_start_gives_up_after_connect_retry_seconds_with_the_usual_message(
    secrets_dir: Path, pg_schema: PgSchema
) -> None:
    relay = Relay.before(pg_schema.url)
    await relay.up()
    await relay.cut()
    config = write_config(secrets_dir, relay.url(pg_schema.url), free_port(), 1.5)
    started = time.monotonic()
    process = await start(config)
    _, err = await asyncio.wait_for(process.communicate(), 60)
    elapsed = time.monotonic() - started
    assert process.returncode == 1
    last = err.decode().splitlines()[-1]
    assert last.startswith(f"error: PostgreSQL connecting to {relay.url(pg_schema.url)} failed")
    assert 1.5 <= elapsed < 20, elapsed
    assert len([e for e in events(err) if e["event"] == "store_unreachable"]) >= 2


async def test_sigterm_while_waiting_for_the_store_exits_0_at_once(
    secrets_dir: Path, pg_schema: PgSchema
) -> None:
    relay = Relay.before(pg_schema.url)
    await relay.up()
    await relay.cut()
    port = free_port()
    process = await start(write_config(secrets_dir, relay.url(pg_schema.url), port, 60))

    async def listening() -> bool:
        return await status(f"http://127.0.0.1:{port}/readyz") is not None

    await eventually(listening, "the admin listener answers", 30)
    process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(process.wait(), 10) == 0


def test_connect_retry_seconds_is_0_or_more(secrets_dir: Path) -> None:
    raw = base_config(secrets_dir, "http://127.0.0.1:9/token", "http://127.0.0.1:9")
    raw["store"]["connect_retry_seconds"] = -1
    with pytest.raises(ConfigError) as raised:
        config_module.parse(raw, {}, secrets_dir)
    assert raised.value.problems == ["store.connect_retry_seconds: must be 0 or more, got -1.0"]
    raw["store"]["connect_retry_seconds"] = 0
    assert config_module.parse(raw, {}, secrets_dir).store.connect_retry_seconds == 0
