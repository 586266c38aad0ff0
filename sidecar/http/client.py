"""The connection pool to one upstream: HTTP/1.1 keep-alive, llhttp parsing, streaming bodies.

One pool per ``[[upstream]]``, bound to its target's origin: there is no way to send a request
anywhere else. It never follows redirects, never decodes content, adds only ``Host`` and the
framing fields. A reused connection that the upstream had already closed (it gets no byte of an
answer) is retried once on a new connection when the request is idempotent and its body can be
sent again, as Go's net/http does.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from sidecar.http.body import BodyStream
from sidecar.http.errors import (
    ConnectFailed,
    ConnectTimeout,
    PoolBusy,
    StaleConnection,
    UpstreamError,
)
from sidecar.http.messages import UpstreamResponse
from sidecar.http.upstream import RequestBody, UpstreamConnection

__all__ = [
    "IDEMPOTENT",
    "ConnectFailed",
    "ConnectTimeout",
    "HttpClient",
    "PoolBusy",
    "Reply",
    "RequestBody",
    "StaleConnection",
    "UpstreamConnection",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamResponse",
]

Headers = list[tuple[bytes, bytes]]

# RFC 9110 §9.2.2: a request that may have reached a dying connection can be sent again.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


class UpstreamPool:
    def __init__(
        self,
        target: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        max_connections: int,
        pool_wait: float | None = None,
    ) -> None:
        parts = urlsplit(target)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self._host_line = b"Host: %s\r\n" % parts.netloc.rpartition("@")[2].encode("ascii")
        self._ssl = ssl.create_default_context() if self._https else None
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._limit = max_connections
        self._pool_wait = pool_wait  # how long a request may wait for a slot (None: no bound)
        self._busy = 0  # connections carrying a request, or being opened for one
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._idle: list[UpstreamConnection] = []

    async def send(
        self,
        method: str,
        target: bytes,
        headers: Headers,
        body: RequestBody,
        length: int | None = None,
    ) -> UpstreamResponse:
        """Send one request and return once the answer's head has arrived.

        ``length`` is the size of a streamed body, when known; without it the body is chunked.
        """
        head = self.head(method, target, headers, body, length)
        for attempt in range(2):
            connection = self.reuse() or await self._acquire()
            try:
                return await connection.exchange(method, head, body, length is None)
            except StaleConnection:
                if attempt or isinstance(body, BodyStream) or method not in IDEMPOTENT:
                    raise
        raise AssertionError("unreachable")

    async def close(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()

    def head(
        self, method: str, target: bytes, headers: Headers, body: RequestBody, length: int | None
    ) -> bytes:
        """The request head as it goes on the wire, with Host and the framing fields."""
        lines = [b"%s %s HTTP/1.1\r\n" % (method.encode("ascii"), target), self._host_line]
        lines += [b"%s: %s\r\n" % pair for pair in headers]
        if isinstance(body, bytes):
            lines.append(b"Content-Length: %d\r\n" % len(body))
        elif body is not None and length is not None:
            lines.append(b"Content-Length: %d\r\n" % length)
        elif body is not None:
            lines.append(b"Transfer-Encoding: chunked\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def reuse(self) -> UpstreamConnection | None:
        """An idle keep-alive connection, when one is free and a slot too (no waiting)."""
        while self._idle and self._busy < self._limit:
            connection = self._idle.pop()
            if connection.usable:
                self._busy += 1
                return connection
            connection.close()
        return None

    async def _acquire(self) -> UpstreamConnection:
        """A connection, waiting (at most ``pool_wait``) for a slot when all are busy."""
        try:
            async with asyncio.timeout(self._pool_wait):
                while self._busy >= self._limit:
                    await self._wait_for_slot()
        except TimeoutError:
            raise PoolBusy(f"all {self._limit} connections stayed busy") from None
        connection = self.reuse()
        if connection is not None:
            return connection
        self._busy += 1
        try:
            return await self._connect()
        except BaseException:
            self._free_slot()
            raise

    async def _wait_for_slot(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._slot_waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter in self._slot_waiters:
                self._slot_waiters.remove(waiter)
            elif not waiter.cancelled():
                self._wake_one()  # the slot we were handed goes to the next in line
            raise

    async def _connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: UpstreamConnection(self._give_back, self.read_timeout, loop),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None,
                )
        except TimeoutError:
            raise ConnectTimeout("cannot connect: timed out") from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect: {type(exc).__name__}") from exc
        return connection

    def _give_back(self, connection: UpstreamConnection, reusable: bool) -> None:
        if reusable:
            self._idle.append(connection)
        else:
            connection.close()
        self._free_slot()

    def _free_slot(self) -> None:
        self._busy -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


MAX_REPLY_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole answer from a token, revocation or webhook endpoint."""

    status: int
    headers: Mapping[str, str]  # names in lower case
    body: bytes


class HttpClient:
    """Short exchanges with token, revocation and webhook endpoints: one keep-alive pool per origin.

    The sidecar speaks HTTP through one stack: the proxy's. Answers are read whole, up to
    ``MAX_REPLY_BYTES``; redirects are never followed (a token endpoint that redirects is
    misconfigured, and following it would send the client's credentials elsewhere).
    """

    def __init__(self, *, connect_timeout: float = 10.0, max_connections: int = 16) -> None:
        self._connect_timeout = connect_timeout
        self._max_connections = max_connections
        self._pools: dict[str, UpstreamPool] = {}

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], seconds: float
    ) -> Reply:
        """POST and read the whole answer, all within ``seconds``.

        Raises ConnectFailed when the request was never sent, TimeoutError or UpstreamError
        when it may have been.
        """
        parts = urlsplit(url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        fields = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        async with asyncio.timeout(seconds):
            response = await self._pool(parts.scheme, parts.netloc).send(
                "POST", target.encode("ascii"), fields, body
            )
            try:
                data = await _read_whole(response.body, MAX_REPLY_BYTES)
            finally:
                response.release()
        named = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
        return Reply(response.status, named, data)

    async def close(self) -> None:
        for pool in self._pools.values():
            await pool.close()
        self._pools.clear()

    def _pool(self, scheme: str, netloc: str) -> UpstreamPool:
        origin = f"{scheme}://{netloc}"
        pool = self._pools.get(origin)
        if pool is None:
            pool = self._pools[origin] = UpstreamPool(
                origin,
                connect_timeout=self._connect_timeout,
                read_timeout=3600.0,  # the caller's total timeout is what bounds an exchange
                max_connections=self._max_connections,
            )
        return pool


async def _read_whole(body: BodyStream, limit: int) -> bytes:
    data = await body.read_all(limit)
    if data is None:
        raise UpstreamError(f"the answer is larger than {limit} bytes")
    return data
