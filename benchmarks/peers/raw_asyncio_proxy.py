"""The floor for one Python process: a raw asyncio.Protocol proxy on uvloop, no HTTP library.

Measurement only, not a usable proxy: it understands just enough HTTP/1.1 for the benchmark
(Content-Length framing both ways, no chunked bodies, no pipelining, no hop-by-hop
filtering), pairs each client connection with one upstream connection, rewrites only the
Authorization header, and passes every other byte through untouched. Whatever the sidecar
does per request on top of this is its own cost; what this costs is Python plus the event
loop plus the syscalls.

    python raw_asyncio_proxy.py --port 18105 --upstream 127.0.0.1:18080 [--token bench-token]
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop

HEAD_END = b"\r\n\r\n"


def content_length(head: bytes) -> int:
    i = head.lower().find(b"\r\ncontent-length:")
    if i < 0:
        return 0
    j = head.find(b"\r\n", i + 2)
    return int(head[i + 17 : j if j > 0 else None].strip())


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.remaining = -1  # body bytes of the current response still to pass through

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        out = self.client.transport
        if self.remaining > 0:
            self.remaining -= len(data)
            out.write(data)
            return
        self.buf += data
        end = self.buf.find(HEAD_END)
        if end < 0:
            return
        head, body, self.buf = self.buf[: end + 4], self.buf[end + 4 :], b""
        self.remaining = content_length(head) - len(body)
        out.write(head + body)  # the answer goes back as it came

    def pause_writing(self) -> None:
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


class Client(asyncio.Protocol):
    def __init__(self, upstream: tuple[str, int], auth: bytes) -> None:
        self.upstream_addr, self.auth = upstream, auth
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.up: Upstream | None = None
        self.pending: list[bytes] = []
        self.buf = b""
        self.remaining = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._connect(loop))
        task.add_done_callback(lambda t: t.exception() and self.transport.close())

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> None:
        host, port = self.upstream_addr
        _, self.up = await loop.create_connection(lambda: Upstream(self), host, port)
        for chunk in self.pending:
            self.up.transport.write(chunk)  # type: ignore[union-attr]
        self.pending.clear()

    def _send(self, data: bytes) -> None:
        if self.up is None or self.up.transport is None:
            self.pending.append(data)
        else:
            self.up.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.remaining > 0:
            self.remaining -= len(data)
            self._send(data)
            return
        self.buf += data
        end = self.buf.find(HEAD_END)
        if end < 0:
            return
        head, body, self.buf = self.buf[: end + 2], self.buf[end + 4 :], b""
        lines = [ln for ln in head.split(b"\r\n") if not ln.lower().startswith(b"authorization:")]
        self.remaining = content_length(head) - len(body)
        self._send(b"\r\n".join(lines) + self.auth + body)

    def pause_writing(self) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.close()


async def serve(args: argparse.Namespace) -> None:
    host, _, port = args.upstream.rpartition(":")
    auth = f"Authorization: Bearer {args.token}\r\n\r\n".encode()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Client((host, int(port)), auth), "127.0.0.1", args.port, backlog=4096
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="host:port")
    p.add_argument("--token", default="bench-token")
    uvloop.run(serve(p.parse_args()))
