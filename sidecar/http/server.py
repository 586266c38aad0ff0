"""The sidecar's HTTP/1.1 server: llhttp parsing (httptools) on asyncio protocols.

Every request an app makes passes through here, so this layer does only what a forwarding
proxy needs: parse a request, hand it to one handler, write the handler's answer with the
right framing, keep the connection alive. A web framework's server builds a request object
graph, a router match and a response writer per request, which cost more than the whole
forward (aiohttp's gave a third of the throughput). Here a request is a method, a target, a
header list and a body stream. The admin listener runs on it too, with a route table.

Limits: the request head is bounded (431 past it); a connection with no request in flight is
closed after ``KEEPALIVE_SECONDS``; pipelined requests are answered in order; an ``Upgrade``
or ``CONNECT`` request is answered and the connection then closed (no tunnels).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable
from http import HTTPStatus
from typing import cast

import httptools

from sidecar.http.body import BodyStream
from sidecar.http.messages import FastHandler, Handler, Headers, Request, Response
from sidecar.http.responses import error_response

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 128
KEEPALIVE_SECONDS = 75.0
NO_BODY_STATUSES = frozenset({204, 304})
# The fields the server reads itself: content-length, transfer-encoding, expect.
_SERVER_FIELD_LENGTHS = frozenset({14, 17, 6})


class HeadTooLarge(Exception):
    """The request head passed MAX_HEAD_BYTES or MAX_HEADERS."""


class _Connection(asyncio.Protocol):
    """One client connection: parse requests, run the handler for each in turn, write answers."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._loop = server.loop
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: Headers = []
        self._head_bytes = 0
        self._length: int | None = None
        self._framed = False  # Content-Length or Transfer-Encoding seen
        self._expect_continue = False
        self._request: Request | None = None  # the one being parsed
        self._pipeline: deque[Request] = deque()  # parsed, waiting for their turn
        self._busy = False  # a request is being answered (by a task, or by the fast path)
        self._task: asyncio.Task[None] | None = None
        self._upgraded = False  # no more HTTP on this connection after the current request
        self._closing = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._idle_since = self._loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._server.connections.add(self)
        self._arm_idle_timer(KEEPALIVE_SECONDS)

    def data_received(self, data: bytes) -> None:
        if self._upgraded:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._upgraded = True  # CONNECT or Upgrade: answer this request, then close
            if not self._busy and self._transport is not None:
                self._transport.close()  # it was answered already, from the fast path
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, HeadTooLarge):
                self._reject(431, "headers_too_large", "the request head is too large")
            else:
                raise
        except httptools.HttpParserError as exc:
            self._reject(400, "bad_request", f"malformed request: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._server.forget(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        for request in (self._request, *self._pipeline):
            if request is not None and request.body is not None:
                request.body.set_exception(ConnectionResetError("the app closed the connection"))
        self._pipeline.clear()
        self._resume_writers()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._resume_writers()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._url, self._headers, self._head_bytes = b"", [], 0
        self._length, self._framed, self._expect_continue = None, False, False

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value)
        if self._head_bytes > MAX_HEAD_BYTES or len(self._headers) >= MAX_HEADERS:
            raise HeadTooLarge
        if len(name) in _SERVER_FIELD_LENGTHS:  # skips lower() for most fields
            lower = name.lower()
            if lower == b"content-length":
                self._length, self._framed = int(value), True
            elif lower == b"transfer-encoding":
                self._framed = True
            elif lower == b"expect":
                self._expect_continue = value.lower() == b"100-continue"
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self._transport is not None
        body = BodyStream(self._transport) if self._framed else None
        request = Request(
            self._parser.get_method().decode("ascii"),
            self._url,
            self._headers,
            body,
            self._length,
            self._parser.should_keep_alive(),
            self._parser.get_http_version() == "1.1",
        )
        self._request = request
        if not self._busy:
            self._start(request)
        else:
            self._pipeline.append(request)
            self._transport.pause_reading()  # one queued request is enough

    def on_body(self, data: bytes) -> None:
        if self._request is not None and self._request.body is not None:
            self._request.body.feed(data)

    def on_message_complete(self) -> None:
        if self._request is not None and self._request.body is not None:
            self._request.body.feed_eof()
        self._request = None

    # Serving

    def shutdown(self) -> None:
        """Finish the request in flight (answered with ``Connection: close``), then close."""
        self._closing = True
        if not self._busy and self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._transport is not None:
            self._transport.abort()

    def _start(self, request: Request) -> None:
        assert self._transport is not None
        self._busy = True
        if self._expect_continue and request.body is not None and not request.body.complete:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        fast = self._server.fast
        if fast is not None and request.body is None and fast(request, self):
            return  # answered through deliver() or serve() later
        self.serve(request, self._server.handler(request))

    # Responder: how a fast handler answers

    def deliver(self, request: Request, response: Response) -> None:
        """Write an answer: at once when it is complete, from a task while it streams."""
        body = response.body
        if isinstance(body, BodyStream) and not body.complete:
            self._task = self._loop.create_task(self._answer(request, response), name="answer")
            return
        try:
            keep_alive = self._write_complete(request, response)
        finally:
            if response.release is not None:
                response.release()
        self._finish(keep_alive)

    def serve(self, request: Request, answer: Awaitable[Response]) -> None:
        """Answer with what ``answer`` produces, in a task."""
        self._task = self._loop.create_task(self._serve(request, answer), name="request")

    async def _serve(self, request: Request, answer: Awaitable[Response]) -> None:
        try:
            response = await answer
        except Exception:
            log.exception("handler_failed")
            response = error_response(500, "internal_error", "the sidecar failed on this request")
        await self._answer(request, response)

    async def _answer(self, request: Request, response: Response) -> None:
        try:
            keep_alive = await self._write(request, response)
        except Exception as exc:  # the upstream broke off mid-body: so must the app's answer
            log.warning("answer_cut_short", extra={"error": type(exc).__name__})
            keep_alive = False
            if self._transport is not None:
                self._transport.abort()
        finally:
            if response.release is not None:
                response.release()
        self._task = None
        self._finish(keep_alive)

    def _finish(self, keep_alive: bool) -> None:
        transport = self._transport
        assert transport is not None
        self._busy = False
        if not keep_alive or self._closing or transport.is_closing():
            transport.close()
        elif self._pipeline:
            self._start(self._pipeline.popleft())
            transport.resume_reading()
        else:
            self._idle_since = self._loop.time()

    def _write_complete(self, request: Request, response: Response) -> bool:
        """Write an answer whose body is all here; True when the connection stays open."""
        head, body, keep_alive, _ = self._frame(request, response)
        assert self._transport is not None and isinstance(body, bytes)
        self._transport.write(head + body if body else head)
        return keep_alive

    async def _write(self, request: Request, response: Response) -> bool:
        """Write the answer; True when the connection can carry another request."""
        head, body, keep_alive, chunked = self._frame(request, response)
        assert self._transport is not None
        if isinstance(body, bytes):
            self._transport.write(head + body if body else head)
        else:
            await self._stream(head, body, chunked)
        return keep_alive

    def _frame(
        self, request: Request, response: Response
    ) -> tuple[bytes, bytes | BodyStream, bool, bool]:
        """The head, the body to write (b"" when none may go), keep-alive, and chunking."""
        body = response.body
        if isinstance(body, BodyStream) and body.complete:
            body = body.take()  # all of it is here already: one write, with its length
        has_body = request.method != "HEAD" and _may_have_body(response.status)
        length = response.length
        if length is None and isinstance(body, bytes) and _may_have_body(response.status):
            length = len(body)
        chunked = has_body and length is None
        keep_alive = (
            request.keep_alive
            and not self._upgraded
            and not self._closing
            and (request.body is None or request.body.complete)
            and (not chunked or request.http11)  # HTTP/1.0: no chunks, the close ends the body
        )
        chunked = chunked and keep_alive
        head = _head(response, length, chunked, _connection_field(request, keep_alive))
        return head, body if has_body else b"", keep_alive, chunked

    async def _stream(self, head: bytes, body: BodyStream, chunked: bool) -> None:
        transport = self._transport
        assert transport is not None
        data = await body.read()
        transport.write(head + (_chunk(data) if chunked and data else data))
        while data and not transport.is_closing():
            if self._write_paused:
                await self._wait_drained()
            data = await body.read()
            if data:
                transport.write(_chunk(data) if chunked else data)
        if chunked:
            transport.write(b"0\r\n\r\n")

    async def _wait_drained(self) -> None:
        if self._drain is None:
            self._drain = self._loop.create_future()
        await self._drain

    def _resume_writers(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    def _reject(self, status: int, code: str, message: str) -> None:
        """Answer a request that cannot be parsed, and close: the stream cannot be resynced."""
        assert self._transport is not None
        if not self._busy:
            response = error_response(status, code, message)
            assert isinstance(response.body, bytes)
            connection = b"Connection: close\r\n"
            head = _head(response, len(response.body), False, connection)
            self._transport.write(head + response.body)
        self._transport.close()

    def _arm_idle_timer(self, delay: float) -> None:
        self._idle_timer = self._loop.call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        """Close a connection that carried no request for KEEPALIVE_SECONDS (one timer each)."""
        idle_for = self._loop.time() - self._idle_since
        if not self._busy and idle_for >= KEEPALIVE_SECONDS and self._transport is not None:
            self._transport.close()
        else:
            self._arm_idle_timer(max(KEEPALIVE_SECONDS - idle_for, 1.0))


def _may_have_body(status: int) -> bool:
    return status >= 200 and status not in NO_BODY_STATUSES


def _head(response: Response, length: int | None, chunked: bool, connection: bytes) -> bytes:
    reason = response.reason or _reason(response.status)
    lines = [b"HTTP/1.1 %d %s\r\n" % (response.status, reason)]
    lines += [b"%s: %s\r\n" % pair for pair in response.headers]
    if length is not None:
        lines.append(b"Content-Length: %d\r\n" % length)
    elif chunked:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    lines.append(connection)
    lines.append(b"\r\n")
    return b"".join(lines)


def _connection_field(request: Request, keep_alive: bool) -> bytes:
    """A Connection field only where the default of the client's HTTP version does not hold."""
    if keep_alive == (request.keep_alive and request.http11):
        return b""
    return b"Connection: keep-alive\r\n" if keep_alive else b"Connection: close\r\n"


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b"Unknown"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Server:
    """The listening socket and its connections; closes them gracefully on ``close``."""

    def __init__(
        self, handler: Handler, loop: asyncio.AbstractEventLoop, fast: FastHandler | None = None
    ) -> None:
        self.handler = handler
        self.fast = fast
        self.loop = loop
        self.connections: set[_Connection] = set()
        self.all_closed = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def listen(self, host: str, port: int, *, reuse_port: bool = False) -> tuple[str, int]:
        self._server = await self.loop.create_server(
            lambda: _Connection(self), host, port, backlog=1024, reuse_port=reuse_port or None
        )
        address: tuple[str, int] = self._server.sockets[0].getsockname()[:2]
        return address

    def forget(self, connection: _Connection) -> None:
        self.connections.discard(connection)
        if not self.connections:
            self.all_closed.set()

    async def close(self, grace_seconds: float) -> None:
        """Stop accepting, let requests in flight finish (at most ``grace_seconds``), abort."""
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.shutdown()
        if self.connections:
            self.all_closed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.all_closed.wait(), grace_seconds)
        for connection in list(self.connections):
            connection.abort()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
