"""Streaming keeps memory flat: a large upload through a real sidecar process.

The default size keeps the suite quick; SIDECAR_TEST_UPLOAD_MIB=1024 runs the 1 GiB case.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.conftest import base_config
from tests.test_cli import free_port, sidecar_cmd, wait_ready, write_config

MIB = 1024 * 1024


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


async def test_large_upload_does_not_grow_memory(secrets_dir: Path, aiohttp_server, idp) -> None:
    size = int(os.environ.get("SIDECAR_TEST_UPLOAD_MIB", "256")) * MIB
    received = 0

    async def sink(request: web.Request) -> web.Response:
        nonlocal received
        received = 0
        async for chunk in request.content.iter_any():
            received += len(chunk)
        return web.json_response({"received": received})

    app = web.Application()
    app.router.add_post("/upload", sink)
    upstream = await aiohttp_server(app)
    raw = base_config(secrets_dir, idp.url, str(upstream.make_url("")).rstrip("/"))
    admin_port, proxy_port = free_port(), free_port()
    raw["admin"]["listen"] = f"127.0.0.1:{admin_port}"
    raw["upstream"][0]["listen"] = f"127.0.0.1:{proxy_port}"
    config = write_config(secrets_dir, raw)
    line = json.dumps({"account": "main", "access_token": "a", "refresh_token": "r"})
    assert (
        sidecar_cmd(
            "accounts", "import", "--config", str(config), "--provider", "example", stdin=line
        ).returncode
        == 0
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "run",
        "--config",
        str(config),
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await wait_ready(f"http://127.0.0.1:{admin_port}/readyz", proc)
        url = f"http://127.0.0.1:{proxy_port}/upload"

        async def body(total: int):
            chunk = b"\x00" * (256 * 1024)
            for _ in range(total // len(chunk)):
                yield chunk

        async with aiohttp.ClientSession() as client:
            async with client.post(url, data=body(8 * MIB)) as resp:  # warm up the paths
                assert resp.status == 200
            before = peak_rss_mib(proc.pid)
            async with client.post(url, data=body(size)) as resp:
                assert (resp.status, await resp.json()) == (200, {"received": size})
        growth = peak_rss_mib(proc.pid) - before
        print(
            f"\nupload {size // MIB} MiB: peak RSS {before:.1f} -> "
            f"{before + growth:.1f} MiB (+{growth:.1f} MiB)"
        )
        assert growth < 8, f"peak RSS grew by {growth:.1f} MiB during the upload"
    finally:
        proc.terminate()
        await proc.wait()
