"""The forwarding path: streaming, headers, target pinning, redirects, upstream failures."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import sample, seed


async def raw_request(port: int, head: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send a hand-written request; the client library would not write these forms."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head_text, _, body = data.partition(b"\r\n\r\n")
    lines = head_text.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


async def test_headers_forwarded_cleaned_and_replaced(
    make_sidecar, idp, api, clock, client
) -> None:
    sidecar = await make_sidecar()
    token = await seed(sidecar, idp, api, clock)
    headers = {
        "Authorization": "Bearer app-supplied",
        "Host": "evil.example",
        "X-Custom": "kept",
        "Connection": "keep-alive, X-Drop-Me",
        "X-Drop-Me": "1",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic Zm9v",
        "TE": "trailers",
        "X-Sidecar-Account": "main",
        "Accept-Encoding": "gzip",
    }
    async with client.get(
        sidecar.url("api") + "/v1/things?a=1&b=%20",
        headers=headers,
        skip_auto_headers=("User-Agent", "Accept"),
    ) as resp:
        assert resp.status == 200
        assert resp.headers["X-Upstream"] == "yes"
    seen = api.seen[0]
    got = {k.lower(): v for k, v in seen["headers"].items()}
    assert got["authorization"] == f"Bearer {token.access_token}"
    assert seen["host"] == api.url.split("//")[1].rstrip("/")
    assert got["x-custom"] == "kept" and got["accept-encoding"] == "gzip"
    for gone in ("x-drop-me", "keep-alive", "proxy-authorization", "te", "x-sidecar-account"):
        assert gone not in got
    assert "user-agent" not in got and "accept" not in got  # nothing the app did not send
    assert seen["path_qs"] == "/v1/things?a=1&b=%20"


async def test_target_base_path_is_kept_and_dot_segments_cannot_escape(
    make_sidecar,
    idp,
    api,
    clock,
) -> None:
    sidecar = await make_sidecar(upstream={"target": api.url.rstrip("/") + "/base/v2"})
    await seed(sidecar, idp, api, clock)
    port = sidecar.addresses["api"][1]
    status, _, body = await raw_request(
        port, b"GET /a/../../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert status == 200 and json.loads(body)["path"] == "/base/v2/etc/passwd"
    status, headers, body = await raw_request(
        port, b"GET /a/%2e%2e/%2E%2E/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert (status, headers["x-sidecar-error"]) == (400, "invalid_path")
    assert json.loads(body)["error"] == "invalid_path"
    assert [s["path_qs"] for s in api.seen] == ["/base/v2/etc/passwd"]


async def test_absolute_form_and_host_header_cannot_redirect_the_request(
    make_sidecar,
    idp,
    api,
    clock,
    aiohttp_server,
) -> None:
    elsewhere = web.Application()
    stolen: list[str | None] = []

    async def steal(request: web.Request) -> web.Response:
        stolen.append(request.headers.get("Authorization"))
        return web.Response(text="stolen")

    elsewhere.router.add_route("*", "/{tail:.*}", steal)
    other = await aiohttp_server(elsewhere)
    sidecar = await make_sidecar()
    await seed(sidecar, idp, api, clock)
    port = sidecar.addresses["api"][1]
    evil = f"127.0.0.1:{other.port}".encode()
    status, _, body = await raw_request(
        port,
        b"GET http://"
        + evil
        + b"/x?q=1 HTTP/1.1\r\nHost: "
        + evil
        + b"\r\nConnection: close\r\n\r\n",
    )
    assert status == 200 and json.loads(body)["path"] == "/x?q=1"
    status, _, _ = await raw_request(
        port, b"GET //" + evil + b"/y HTTP/1.1\r\nHost: " + evil + b"\r\nConnection: close\r\n\r\n"
    )
    assert status == 200
    status, headers, body = await raw_request(
        port, b"CONNECT " + evil + b" HTTP/1.1\r\nHost: " + evil + b"\r\nConnection: close\r\n\r\n"
    )
    assert (status, headers["x-sidecar-error"]) == (405, "method_not_allowed")
    assert stolen == []
    assert [s["path_qs"] for s in api.seen] == ["/x?q=1", "//" + evil.decode() + "/y"]


async def test_redirects_are_not_followed(make_sidecar, idp, api, clock, client) -> None:
    sidecar = await make_sidecar()
    await seed(sidecar, idp, api, clock)
    async with client.get(sidecar.url("api") + "/redirect", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "http://127.0.0.2:1/steal"
    assert api.calls == 1


async def test_compressed_response_passes_through_untouched(
    make_sidecar, idp, api, clock, client
) -> None:
    sidecar = await make_sidecar()
    await seed(sidecar, idp, api, clock)
    async with client.get(
        sidecar.url("api") + "/gzip", headers={"Accept-Encoding": "gzip"}
    ) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        raw = await resp.read()  # the client session does not decompress
    assert json.loads(gzip.decompress(raw)) == {"compressed": True}


async def test_streams_large_bodies_both_ways(make_sidecar, idp, api, clock, client) -> None:
    sidecar = await make_sidecar()
    await seed(sidecar, idp, api, clock)
    size = 20 * 1024 * 1024

    async def produce():
        chunk = b"u" * 65536
        for _ in range(size // len(chunk)):
            yield chunk

    async with client.post(sidecar.url("api") + "/upload", data=produce()) as resp:
        assert (resp.status, await resp.json()) == (200, {"received": size})
    total = 0
    async with client.get(sidecar.url("api") + f"/big/{size}") as resp:
        assert resp.headers["Content-Length"] == str(size)
        async for chunk in resp.content.iter_any():
            total += len(chunk)
    assert total == size


async def test_head_and_status_codes_pass_through(make_sidecar, idp, api, clock, client) -> None:
    sidecar = await make_sidecar()
    await seed(sidecar, idp, api, clock)
    async with client.head(sidecar.url("api") + "/x") as resp:
        assert resp.status == 200
    async with client.delete(sidecar.url("api") + "/x") as resp:
        assert (await resp.json())["method"] == "DELETE"
    assert (
        sample(
            sidecar, "sidecar_requests_total", upstream="api", method="DELETE", status_class="2xx"
        )
        == 1
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_upstream_down_is_502(make_sidecar, idp, api, clock, client) -> None:
    sidecar = await make_sidecar(upstream={"target": f"http://127.0.0.1:{_free_port()}"})
    await seed(sidecar, idp, api, clock)
    async with client.get(sidecar.url("api") + "/x") as resp:
        assert resp.status == 502
        assert resp.headers["X-Sidecar-Error"] == "upstream_unavailable"
        assert (await resp.json())["error"] == "upstream_unavailable"


async def test_upstream_read_timeout_is_504(
    make_sidecar, idp, api, clock, client, aiohttp_server
) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="late")

    slow_app = web.Application()
    slow_app.router.add_get("/{tail:.*}", slow)
    server = await aiohttp_server(slow_app)
    sidecar = await make_sidecar(
        upstream={"target": str(server.make_url("")).rstrip("/"), "read_timeout_seconds": 0.2}
    )
    await seed(sidecar, idp, api, clock)
    try:
        async with client.get(sidecar.url("api") + "/x") as resp:
            assert resp.status == 504
            assert resp.headers["X-Sidecar-Error"] == "upstream_timeout"
    finally:
        release.set()


async def test_keep_alive_pool_reuses_connections(
    make_sidecar, idp, api, clock, client, aiohttp_server
) -> None:
    peers: set[tuple[str, int]] = set()

    async def record(request: web.Request) -> web.Response:
        peers.add(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", record)
    server = await aiohttp_server(app)
    sidecar = await make_sidecar(upstream={"target": str(server.make_url("")).rstrip("/")})
    await seed(sidecar, idp, api, clock)
    for _ in range(20):
        async with client.get(sidecar.url("api") + "/x") as resp:
            assert resp.status == 200
    assert len(peers) == 1


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_sidecar_errors_are_json_with_header(
    make_sidecar, idp, api, clock, client, method: str
) -> None:
    sidecar = await make_sidecar()
    async with client.request(
        method, sidecar.url("api") + "/x", headers={"X-Sidecar-Account": "ghost"}
    ) as resp:
        assert resp.status == 404
        assert resp.content_type == "application/json"
        assert resp.headers["X-Sidecar-Error"] == (await resp.json())["error"]


async def test_client_disconnect_does_not_cancel_refresh(make_sidecar, idp, api, clock) -> None:
    """A refresh is a rotation in progress: losing it would lose the new tokens."""
    sidecar = await make_sidecar()
    seeded = await seed(sidecar, idp, api, clock, expires_in=0)
    idp.gate = asyncio.Event()
    async with aiohttp.ClientSession() as impatient:
        with pytest.raises(asyncio.TimeoutError):
            await impatient.get(sidecar.url("api") + "/x", timeout=aiohttp.ClientTimeout(total=0.2))
    assert idp.calls == 1
    idp.gate.set()
    api.valid.add("access-2")
    async with aiohttp.ClientSession() as client, client.get(sidecar.url("api") + "/x") as resp:
        assert (await resp.json())["token"] == "access-2"
    assert [r["refresh_token"] for r in idp.requests] == [seeded.refresh_token]
