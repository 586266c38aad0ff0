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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import cast
from urllib.parse import urlsplit

import httptools

from sidecar.http.body import BodyStream

Headers = list[tuple[bytes, bytes]]
RequestBody = bytes | BodyStream | None
Answered = Callable[["UpstreamResponse | None", "BaseException | None"], None]


# RFC 9110 §9.2.2: a request that may have reached a dying connection can be sent again.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_FRAMING_NAME_LENGTHS = frozenset({len(b"content-length"), len(b"transfer-encoding")})


class UpstreamError(Exception):
    """The upstream could not be reached, or broke the connection or the protocol."""


class ConnectFailed(UpstreamError):
    """No connection could be made: the request was never sent."""


class ConnectTimeout(ConnectFailed, TimeoutError):
    """Connecting took longer than the connect timeout: the request was never sent."""


class StaleConnection(UpstreamError):
    """A reused connection closed before any byte of the answer: an idempotent request can
    be sent again on a new one."""


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    reason: bytes
    headers: Headers  # as received, nothing removed
    body: BodyStream
    length: int | None  # the announced Content-Length
    _connection: _Connection | None = field(default=None, repr=False)

    def release(self) -> None:
        """Done with this answer: an unfinished connection is closed, a finished one reused."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.abandon()


class UpstreamPool:
    def __init__(
        self,
        target: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        max_connections: int,
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
        self._busy = 0  # connections carrying a request, or being opened for one
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._idle: list[_Connection] = []

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

    def reuse(self) -> _Connection | None:
        """An idle keep-alive connection, when one is free and a slot too (no waiting)."""
        while self._idle and self._busy < self._limit:
            connection = self._idle.pop()
            if connection.usable:
                self._busy += 1
                return connection
            connection.close()
        return None

    async def _acquire(self) -> _Connection:
        """A connection, waiting for a slot when ``max_connections`` are busy."""
        while self._busy >= self._limit:
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
        connection = self.reuse()
        if connection is not None:
            return connection
        self._busy += 1
        try:
            return await self._connect()
        except BaseException:
            self._free_slot()
            raise

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self, loop),
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

    def _give_back(self, connection: _Connection, reusable: bool) -> None:
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


class _Connection(asyncio.Protocol):
    """One upstream connection, carrying one request at a time."""

    def __init__(self, pool: UpstreamPool, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._closed = False
        self._used = False  # has carried a request before
        self._in_use = False
        self._waiter: asyncio.Future[UpstreamResponse] | None = None
        self._callback: Answered | None = None  # instead of the waiter, for start()
        self._answered: UpstreamResponse | None = None  # head arrived, callback not yet run
        self._response: UpstreamResponse | None = None
        self._head_only = False  # the request was HEAD: the answer has no body
        self._reason = b""
        self._headers: Headers = []
        self._length: int | None = None
        self._until_close = False  # neither Content-Length nor chunked: the close ends it
        self._request_sent = False
        self._response_done = False
        self._got_bytes = False
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._pump: asyncio.Task[None] | None = None
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None

    @property
    def usable(self) -> bool:
        return not self._closed and self._transport is not None and not self._transport.is_closing()

    async def exchange(
        self, method: str, head: bytes, body: RequestBody, chunked: bool
    ) -> UpstreamResponse:
        assert self._transport is not None
        reused, self._used, self._in_use = self._used, True, True
        self._waiter = self._loop.create_future()
        self._head_only = method == "HEAD"
        self._request_sent = self._response_done = self._got_bytes = False
        self._last_read = self._loop.time()
        if isinstance(body, BodyStream):
            self._transport.write(head)
            self._pump = self._loop.create_task(self._send_body(body, chunked))
        else:
            self._transport.write(head + body if body else head)
            self._sent()
        try:
            return await self._waiter
        except BaseException as exc:
            self.abandon()
            if isinstance(exc, StaleConnection) and not reused:
                raise UpstreamError("the upstream closed the connection") from None
            raise

    def start(self, method: str, head: bytes, answered: Answered) -> None:
        """Send a bodiless request on a reused connection; ``answered`` gets the answer's
        head (with whatever body came with it) or the error, from the loop's I/O callbacks.

        A StaleConnection error means nothing of the answer came: the request may be sent
        again if it is idempotent.
        """
        assert self._transport is not None
        self._used = self._in_use = True
        self._callback = answered
        self._head_only = method == "HEAD"
        self._response_done = self._got_bytes = False
        self._transport.write(head)
        self._sent()

    def abandon(self) -> None:
        """The caller is done: reuse the connection if both messages are complete, else close."""
        if not self._in_use:
            return
        if not (self._request_sent and self._response_done):
            self._closed = True
            if self._pump is not None:
                self._pump.cancel()
        self._finish()

    def close(self) -> None:
        self._closed = True
        self._stop_timer()
        if self._transport is not None:
            self._transport.close()

    async def _send_body(self, body: BodyStream, chunked: bool) -> None:
        transport = self._transport
        assert transport is not None
        try:
            while data := await body.read():
                transport.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                if self._write_paused:
                    await self._wait_drained()
            if chunked:
                transport.write(b"0\r\n\r\n")
        except Exception:
            self._fail(UpstreamError("the request body could not be read"))
            return
        self._sent()

    def _sent(self) -> None:
        self._request_sent = True
        self._last_read = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_later(self._pool.read_timeout, self._check_read_timeout)
        if self._response_done:
            self._finish()

    def _finish(self) -> None:
        """Hand the connection back to the pool (once per request)."""
        if not self._in_use or (not self._closed and not self._response_done):
            return
        self._in_use = False
        self._pump = None
        reusable = not self._closed and self._parser.should_keep_alive()
        if self._response is not None:
            self._response._connection = None  # its release() must not touch the next request
        self._response = None
        self._pool._give_back(self, reusable)

    def _check_read_timeout(self) -> None:
        """The read timeout: one timer per connection, outliving the requests that armed it.

        It re-arms itself while bytes keep coming (or while we stopped reading), and lapses on
        an idle connection until the next request arms it; a request costs no timer of its own.
        """
        self._timer = None
        if self._closed or not self._in_use or self._response_done:
            return
        limit = self._pool.read_timeout
        waited = self._loop.time() - self._last_read
        holding = not self._request_sent or (
            self._response is not None and self._response.body.paused
        )
        if holding or waited < limit:
            delay = limit if holding else limit - waited
            self._timer = self._loop.call_later(delay, self._check_read_timeout)
            return
        self._fail(TimeoutError("the upstream did not answer in time"))

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, exc: BaseException) -> None:
        self._closed = True
        if self._response is not None:
            self._response.body.set_exception(exc)
        else:
            self._head_failed(exc)
        if self._transport is not None:
            self._transport.abort()

    def _head_failed(self, exc: BaseException) -> None:
        """No answer will come: tell whoever waits for its head."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)  # exchange() abandons the connection
        elif self._callback is not None:
            answered, self._callback = self._callback, None
            self.abandon()
            answered(None, exc)

    async def _wait_drained(self) -> None:
        self._drain = self._loop.create_future()
        await self._drain

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        self._last_read = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"malformed answer: {exc}"))
        if self._answered is not None:  # after the feed, so a short body is complete already
            response, self._answered = self._answered, None
            answered, self._callback = self._callback, None
            assert answered is not None
            answered(response, None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._stop_timer()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        if self._response is None and (self._waiter is not None or self._callback is not None):
            stale = StaleConnection if not self._got_bytes else UpstreamError
            self._head_failed(stale("the upstream closed the connection"))
        elif self._response is not None and not self._response_done:
            if self._until_close:
                self._complete()  # the close is the end of this body
            else:
                self._response.body.set_exception(UpstreamError("the answer was cut short"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._headers, self._length, self._until_close = [], None, True

    def on_status(self, reason: bytes) -> None:
        self._reason = reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) in _FRAMING_NAME_LENGTHS:  # skips lower() for most fields
            lower = name.lower()
            if lower == b"content-length":
                self._length, self._until_close = int(value), False
            elif lower == b"transfer-encoding":
                self._until_close = False
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            return  # 1xx interim answers are dropped; the final one follows
        assert self._transport is not None
        self._response = UpstreamResponse(
            status,
            self._reason,
            self._headers,
            BodyStream(self._transport),
            self._length,
            self,
        )
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(self._response)
        elif self._callback is not None:
            self._answered = self._response
        self._waiter = None
        if status in (204, 304):
            self._until_close = False  # no body, whatever the headers say (llhttp agrees)
        elif self._head_only:
            self._until_close = False
            self._complete()
            self._parser = httptools.HttpResponseParser(self)  # llhttp would wait for a body

    def on_body(self, data: bytes) -> None:
        if self._response is not None:
            self._response.body.feed(data)

    def on_message_complete(self) -> None:
        if self._response is not None and not self._response_done:
            self._complete()

    def _complete(self) -> None:
        assert self._response is not None
        self._response_done = True
        self._response.body.feed_eof()
        if self._until_close:
            self._closed = True
        if self._request_sent:
            self._finish()
