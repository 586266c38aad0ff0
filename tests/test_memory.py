"""Streaming keeps memory flat: a large upload through a real sidecar process.

The default size keeps the suite quick; SIDECAR_TEST_UPLOAD_MIB=1024 runs the 1 GiB case.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.test_cli import start_sidecar_process

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
    started = await start_sidecar_process(
        secrets_dir,
        idp.url,
        str(upstream.make_url("")).rstrip("/"),
        "a",
        asyncio.subprocess.DEVNULL,
    )
    proc = started.proc
    try:
        url = f"{started.proxy_url}/upload"

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
