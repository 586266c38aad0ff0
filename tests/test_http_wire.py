"""HTTP/1.1 on the wire: framing, pipelining, limits and upstream connection reuse.

The app side is written by hand where a client library would hide the bytes; some upstreams
are raw asyncio servers so that framing and connection closes happen exactly when a test says.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from tests.conftest import seed

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def exchange(port: int, data: bytes) -> bytes:
    """Send bytes, read until the sidecar closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length or chunked body, from a kept-alive connection."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if line)}
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        assert headers.get("transfer-encoding") == "chunked"
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
    return int(lines[0].split()[1]), headers, body


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[Answer], Awaitable[str]]]:
    servers: list[asyncio.Server] = []

    async def start(answer: Answer) -> str:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await answer(reader, writer)
            finally:
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def test_malformed_request_gets_json_400_and_close(make_sidecar, idp, api, clock) -> None:
    sidecar = await make_sidecar()
    await seed(sidecar, idp, api, clock)
    data = await exchange(sidecar.addresses["api"][1], b"GET / HTTP/1.1\r\nBad Header\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"X-Sidecar-Error: bad_request" in head and b"Connection: close" in head
    assert json.loads(body)["error"] == "bad_request"
    assert api.calls == 0


async def test_oversized_request_head_gets_431(make_sidecar, idp, api, clock) -> None:
    sidecar = await make_sidecar()
    await seed(sidecar, idp, api, clock)
    huge = b"X-Big: " + b"a" * 70_000 + b"\r\n"
    data = await exchange(sidecar.addresses["api"][1], b"GET / HTTP/1.1\r\n" + huge + b"\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431 ")
    assert json.loads(body)["error"] == "headers_too_large"
    assert api.calls == 0


async def test_pipelined_requests_are_answered_in_order(make_sidecar, idp, api, clock) -> None:
    sidecar = await make_sidecar()
    await seed(sidecar, idp, api, clock)
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.addresses["api"][1])
    writer.write(
        b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /second HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /third HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    paths = []
    for _ in range(3):
        status, _, body = await read_response(reader)
        assert status == 200
        paths.append(json.loads(body)["path"])
    writer.close()
    assert paths == ["/first", "/second", "/third"]
    assert api.seen[1]["body"] == b"hello"


async def test_http10_client_gets_a_body_it_can_frame(
    make_sidecar, idp, api, clock, raw_upstream
) -> None:
    async def unframed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart one, ")
        await writer.drain()
        writer.write(b"part two")
        writer.close()

    target = await raw_upstream(unframed)
    sidecar = await make_sidecar(upstream={"target": target})
    await seed(sidecar, idp, api, clock)
    data = await exchange(sidecar.addresses["api"][1], b"GET /x HTTP/1.0\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"chunked" not in head.lower()  # HTTP/1.0 knows no chunks: length or close
    assert body == b"part one, part two"


async def test_body_of_unknown_length_is_streamed_in_chunks(
    make_sidecar, idp, api, clock, raw_upstream
) -> None:
    more = asyncio.Event()

    async def slow_chunks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await more.wait()
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()

    target = await raw_upstream(slow_chunks)
    sidecar = await make_sidecar(upstream={"target": target})
    await seed(sidecar, idp, api, clock)
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.addresses["api"][1])
    writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert b"Transfer-Encoding: chunked" in head
    assert await asyncio.wait_for(reader.readuntil(b"first\r\n"), 10) == b"5\r\nfirst\r\n"
    more.set()  # the first part reached the app before the upstream sent the rest
    rest = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 10)
    assert rest == b"6\r\nsecond\r\n0\r\n\r\n"
    writer.close()


async def test_chunked_upload_over_the_replay_limit_streams_in_chunks(
    make_sidecar, idp, api, clock
) -> None:
    sidecar = await make_sidecar(upstream={"replay_limit_bytes": 10})
    await seed(sidecar, idp, api, clock)
    chunks = [b"0123456789", b"abcdefghij", b"xyz"]
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    data = await exchange(
        sidecar.addresses["api"][1],
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n" + body,
    )
    assert data.startswith(b"HTTP/1.1 200 ")
    assert json.loads(data.partition(b"\r\n\r\n")[2])["received"] == 23
    assert api.received_bytes == 23


async def test_small_chunked_upload_is_sent_with_a_length(make_sidecar, idp, api, clock) -> None:
    sidecar = await make_sidecar()
    await seed(sidecar, idp, api, clock)
    await exchange(
        sidecar.addresses["api"][1],
        b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n",
    )
    seen = api.seen[0]
    assert seen["body"] == b"abc"
    headers = {k.lower(): v for k, v in seen["headers"].items()}  # type: ignore[attr-defined]
    assert headers["content-length"] == "3" and "transfer-encoding" not in headers


async def test_a_reused_connection_the_upstream_drops_is_retried_when_idempotent(
    make_sidecar, idp, api, clock, raw_upstream
) -> None:
    seen: list[bytes] = []

    async def answer_once_then_drop(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        seen.append((await read_request(reader)).split(b" ")[0])
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # "keep-alive"
        await writer.drain()
        # The next request on this connection meets an idle timeout: read, no answer, close.
        seen.append(b"dropped " + (await read_request(reader)).split(b" ")[0])

    target = await raw_upstream(answer_once_then_drop)
    sidecar = await make_sidecar(upstream={"target": target})
    await seed(sidecar, idp, api, clock)
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.addresses["api"][1])
    for _ in range(3):
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await read_response(reader))[::2] == (200, b"ok")
    assert seen == [b"GET", b"dropped GET", b"GET", b"dropped GET", b"GET"]
    # A POST may have been acted on: it is not sent twice, the app hears of the failure.
    writer.write(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n1")
    status, headers, _ = await read_response(reader)
    assert (status, headers["x-sidecar-error"]) == (502, "upstream_unavailable")
    assert seen[5:] == [b"dropped POST"]
    writer.close()


async def test_requests_wait_for_a_free_upstream_connection(
    make_sidecar, idp, api, clock, client, aiohttp_server
) -> None:
    in_flight = peak = 0
    release = asyncio.Event()
    arrived = asyncio.Event()

    async def hold(request: web.Request) -> web.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        arrived.set()
        await release.wait()
        in_flight -= 1
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/{tail:.*}", hold)
    server = await aiohttp_server(app)
    target = str(server.make_url("")).rstrip("/")
    sidecar = await make_sidecar(upstream={"target": target, "max_connections": 1})
    await seed(sidecar, idp, api, clock)

    async def get() -> int:
        async with client.get(sidecar.url("api") + "/x") as resp:
            await resp.read()
            return resp.status

    requests = [asyncio.ensure_future(get()) for _ in range(3)]
    await asyncio.wait_for(arrived.wait(), 10)
    release.set()
    assert await asyncio.gather(*requests) == [200, 200, 200]
    assert peak == 1


async def test_upgrade_request_is_answered_then_closed(make_sidecar, idp, api, clock) -> None:
    sidecar = await make_sidecar()
    await seed(sidecar, idp, api, clock)
    data = await exchange(
        sidecar.addresses["api"][1],
        b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
    )
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in head
    assert json.loads(body)["path"] == "/x"
    headers = {k.lower() for k in api.seen[0]["headers"]}  # type: ignore[attr-defined]
    assert "upgrade" not in headers and "http2-settings" not in headers


async def test_upgrade_request_answered_by_the_sidecar_itself_is_closed_too(
    make_sidecar, idp, api, clock
) -> None:
    sidecar = await make_sidecar()
    await seed(sidecar, idp, api, clock)
    data = await exchange(  # reads until the sidecar closes: a hang would time out
        sidecar.addresses["api"][1],
        b"GET /a/%2e%2e/x HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert json.loads(body)["error"] == "invalid_path"
    assert api.calls == 0
