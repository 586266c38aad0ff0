"""The sidecar's HTTP/1.1 server: llhttp parsing (httptools) on asyncio protocols.

Every request an app makes passes through here, so this layer does only what a forwarding
proxy needs: parse a request, hand it to one handler, write the handler's answer with the
right framing, keep the connection alive. The admin listener runs on it too, with a route table.

A connection's life is two explicit states (h11's ``_state.py`` is the model). Reading: IDLE
(between requests) -> HEAD -> BODY -> IDLE, or CLOSED once no further request may be read (a
framing error, an ``Upgrade`` or ``CONNECT``, ``Connection: close``, shutdown). Writing: IDLE
-> ANSWERING -> IDLE. Requests parsed while another is answered wait in order (pipelining).

RFC 9112's framing rules are applied strictly, and what is ambiguous is refused with a JSON
error and a close, as nginx does: anything llhttp rejects (CL with TE, differing lengths, bad
chunks, bare CR or LF, obs-fold), Transfer-Encoding in an HTTP/1.0 request (§6.1), a missing or
repeated Host (§3.2). A request that was parsed before the bad bytes still gets its answer
first. Trailer fields are read and dropped: they never change the request's head. Limits hold
for every byte read: a head over ``MAX_HEAD_BYTES`` gets 431 even while its last field is
incomplete, a head or a body that stops arriving gets 408 after its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

import httptools

from sidecar.http import wire
from sidecar.http.body import BodyStream
from sidecar.http.messages import FastHandler, Handler, Headers, Request, RequestError, Response
from sidecar.http.responses import error_response

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 128
# The fields the server reads itself: content-length, transfer-encoding, expect, host.
_SERVER_FIELD_LENGTHS = frozenset({14, 17, 6, 4})


@dataclass(frozen=True, slots=True)
class Limits:
    header_timeout: float = 60.0  # to send a whole request head
    body_timeout: float = 60.0  # between two reads of a request body (nginx's meaning)
    keepalive: float = 75.0  # an idle connection is closed after this


class _Refused(Exception):
    """A request the server refuses before any handler sees it."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


class Reading(enum.Enum):
    IDLE = "idle"  # between requests: the next byte begins one
    HEAD = "head"  # a request head is arriving
    BODY = "body"  # its body is arriving
    CLOSED = "closed"  # no further request is read from this connection


class Writing(enum.Enum):
    IDLE = "idle"
    ANSWERING = "answering"  # a handler (a task, or the fast path) owns the current request
    CLOSED = "closed"


class _Connection(asyncio.Protocol):
    """One client connection: parse requests, answer each in turn, enforce the limits."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._loop = server.loop
        self._limits = server.limits
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._reading = Reading.IDLE
        self._writing = Writing.IDLE
        self._url = b""
        self._headers: Headers = []
        self._field_bytes = 0  # of complete fields (and the target) in this head
        self._head_bytes = 0  # read while this head was incomplete
        self._stuck_bytes = 0  # read in BODY with no progress (a trailer field growing)
        self._progress = False  # the current feed moved the body along
        self._begun = 0  # requests begun in the current feed
        self._length: int | None = None
        self._framed = False  # Content-Length or Transfer-Encoding seen
        self._chunked = False
        self._hosts = 0
        self._expect_continue = False  # of the head being parsed
        self._request: Request | None = None  # the one whose body is being read
        self._held = False  # reading paused while parsed requests wait their turn
        self._queue: deque[Request] = deque()  # parsed, waiting for their turn
        self._current: Request | None = None  # being answered
        self._refusal: Response | None = None  # written once the queue is answered; then close
        self._dispatching = False
        self._task: asyncio.Task[None] | None = None
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._since = self._loop.time()  # idle since, head begun at, or last body read
        self._timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._server.connections.add(self)
        self._arm(self._limits.keepalive)

    def data_received(self, data: bytes) -> None:
        before = self._reading
        if before is Reading.CLOSED:
            return
        self._begun, self._progress = 0, False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._stop_reading()  # CONNECT or Upgrade: answer this request, then close
        except httptools.HttpParserError as exc:
            self._refuse_parse_error(exc)
        else:
            self._check_growth(before, len(data))
        self._dispatch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._reading = Reading.CLOSED
        self._writing = Writing.CLOSED
        self._server.forget(self)
        if self._timer is not None:
            self._timer.cancel()
        gone = RequestError(400, "client_closed", "the app closed the connection")
        for request in (self._request, *self._queue):
            if request is not None and request.body is not None:
                request.body.set_exception(gone)
        self._queue.clear()
        self._resume_writers()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._resume_writers()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._reading = Reading.HEAD
        self._begun += 1
        self._since = self._loop.time()
        self._url, self._headers, self._field_bytes, self._head_bytes = b"", [], 0, 0
        self._length, self._framed, self._chunked = None, False, False
        self._hosts, self._expect_continue = 0, False

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._field_bytes += len(url)
        if self._field_bytes > MAX_HEAD_BYTES:
            raise _Refused(431, "headers_too_large", "the request head is too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._field_bytes += len(name) + len(value)
        if self._field_bytes > MAX_HEAD_BYTES or len(self._headers) >= MAX_HEADERS:
            raise _Refused(431, "headers_too_large", "the request head is too large")
        if self._reading is not Reading.HEAD:
            self._progress = True
            return  # a trailer field: read and dropped, it never joins the head
        if len(name) in _SERVER_FIELD_LENGTHS:  # skips lower() for most fields
            self._server_field(name.lower(), value)
        self._headers.append((name, value))

    def _server_field(self, lower: bytes, value: bytes) -> None:
        if lower == b"content-length":
            self._length, self._framed = int(value), True
        elif lower == b"transfer-encoding":
            self._framed = self._chunked = True
        elif lower == b"expect":
            self._expect_continue = value.lower() == b"100-continue"
        elif lower == b"host":
            self._hosts += 1

    def on_headers_complete(self) -> None:
        assert self._transport is not None
        http11 = self._parser.get_http_version() == "1.1"
        if self._chunked and not http11:  # RFC 9112 §6.1: a smuggling vector, refused
            raise _Refused(400, "bad_request", "Transfer-Encoding in an HTTP/1.0 request")
        if self._hosts > 1 or (http11 and not self._hosts):  # RFC 9112 §3.2
            raise _Refused(400, "bad_request", "an HTTP/1.1 request needs exactly one Host")
        body = BodyStream(self._transport) if self._framed else None
        request = Request(
            self._parser.get_method().decode("ascii"),
            self._url,
            self._headers,
            body,
            self._length,
            self._parser.should_keep_alive(),
            http11,
            self._expect_continue,
        )
        self._reading = Reading.BODY
        self._request = request
        self._progress = True
        self._queue.append(request)

    def on_chunk_header(self) -> None:
        self._progress = True

    def on_body(self, data: bytes) -> None:
        self._progress = True
        self._since = self._loop.time()
        if self._request is not None and self._request.body is not None:
            self._request.body.feed(data)

    def on_message_complete(self) -> None:
        if self._request is not None and self._request.body is not None:
            self._request.body.feed_eof()
        self._request = None
        self._reading = Reading.IDLE
        self._since = self._loop.time()

    # Refusing

    def _check_growth(self, before: Reading, size: int) -> None:
        """Bytes read into an incomplete head or trailer field count as they arrive."""
        reading = self._reading
        if reading is Reading.HEAD and self._begun == (0 if before is Reading.HEAD else 1):
            # The feed held this head's bytes only (a head begun after another message's end
            # in the same feed is counted from the next feed on: a bounded undercount).
            self._head_bytes += size
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(_Refused(431, "headers_too_large", "the request head is too large"))
        elif reading is Reading.BODY and before is Reading.BODY and not self._begun:
            self._stuck_bytes = 0 if self._progress else self._stuck_bytes + size
            if self._stuck_bytes > MAX_HEAD_BYTES:
                self._refuse(_Refused(431, "headers_too_large", "a trailer field is too large"))

    def _refuse_parse_error(self, exc: httptools.HttpParserError) -> None:
        cause = exc.__context__
        if isinstance(cause, _Refused):
            self._refuse(cause)
        else:
            self._refuse(_Refused(400, "bad_request", f"malformed request: {exc}"))

    def _refuse(self, refusal: _Refused) -> None:
        """Stop reading; answer the refused request after those parsed before it, then close.

        A request whose handler already runs learns it from its body, and its answer says so.
        """
        self._reading = Reading.CLOSED
        request, self._request = self._request, None
        if request is not None and request is not self._queue_tail():
            if request.body is not None:
                error = RequestError(refusal.status, refusal.code, str(refusal))
                request.body.set_exception(error)
                return
        elif request is not None:
            self._queue.pop()  # parsed but never started: the refusal answers it
        self._refusal = error_response(refusal.status, refusal.code, str(refusal))

    def _queue_tail(self) -> Request | None:
        return self._queue[-1] if self._queue else None

    def _stop_reading(self) -> None:
        self._reading = Reading.CLOSED

    def _answering_last(self) -> bool:
        """No request will be answered after the current one: its answer says close."""
        return self._reading is Reading.CLOSED and not self._queue and self._refusal is None

    # Serving

    def _dispatch(self) -> None:
        """Start the next request, or write the refusal, whenever nothing is being answered."""
        if self._dispatching:
            return  # a fast answer finished inside _start: the loop below goes on
        self._dispatching = True
        try:
            while self._writing is Writing.IDLE and self._transport is not None:
                if self._queue:
                    self._start(self._queue.popleft())
                elif self._refusal is not None:
                    self._transport.write(wire.closing(self._refusal))
                    self._close()
                elif self._reading is Reading.CLOSED:
                    self._close()
                else:
                    self._since = self._loop.time()
                    break
            self._hold_reading(bool(self._queue))
        finally:
            self._dispatching = False

    def _hold_reading(self, hold: bool) -> None:
        """Pause reading while parsed requests wait (one queued is enough), resume after."""
        transport = self._transport
        if hold == self._held or transport is None or transport.is_closing():
            return
        self._held = hold
        if hold:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def _start(self, request: Request) -> None:
        assert self._transport is not None
        self._writing = Writing.ANSWERING
        self._current = request
        if request.expect_continue and request.body is not None and not request.body.complete:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        fast = self._server.fast
        if fast is not None and request.body is None and fast(request, self):
            return  # answered through deliver() or serve() later
        self.serve(request, self._server.handler(request))

    def _close(self) -> None:
        self._reading = Reading.CLOSED
        self._writing = Writing.CLOSED
        if self._transport is not None:
            self._transport.close()

    def shutdown(self) -> None:
        """Finish the request in flight (answered with ``Connection: close``), then close."""
        self._reading = Reading.CLOSED
        self._queue.clear()
        if self._writing is Writing.IDLE:
            self._close()

    def abort(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._transport is not None:
            self._transport.abort()

    # Responder: how a fast handler answers

    def deliver(self, request: Request, response: Response) -> None:
        """Write an answer: at once when it is complete, from a task while it streams."""
        body = response.body
        if isinstance(body, BodyStream) and not body.complete:
            self._task = self._loop.create_task(self._answer(request, response), name="answer")
            return
        try:
            head, data, keep_alive, _ = wire.frame(request, response, self._answering_last())
            assert self._transport is not None and isinstance(data, bytes)
            self._transport.write(head + data if data else head)
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
        except RequestError as exc:
            response = error_response(exc.status, exc.code, str(exc))
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
        self._current = None
        if self._writing is Writing.CLOSED:
            return
        self._writing = Writing.IDLE
        transport = self._transport
        if not keep_alive or transport is None or transport.is_closing():
            self._close()
        else:
            self._dispatch()

    async def _write(self, request: Request, response: Response) -> bool:
        """Write the answer; True when the connection can carry another request.

        A streamed body's first bytes are awaited before the head goes out, so an upstream
        that fails before sending any gets the app a JSON error, not a truncated answer.
        """
        body = response.body
        first = b""
        if isinstance(body, BodyStream) and not body.complete:
            try:
                first = await body.read()
            except RequestError as exc:
                return self._write_error(request, exc.status, exc.code, str(exc))
            except Exception as exc:
                log.warning("upstream_failed", extra={"error": str(exc)})
                message = "the upstream broke off its answer"
                return self._write_error(request, 502, "upstream_unavailable", message)
        head, data, keep_alive, chunked = wire.frame(request, response, self._answering_last())
        assert self._transport is not None
        if isinstance(data, bytes):
            self._transport.write(head + data if data else head)
        else:
            await self._stream(head, first, data, chunked)
        return keep_alive

    def _write_error(self, request: Request, status: int, code: str, message: str) -> bool:
        assert self._transport is not None
        self._transport.write(wire.closing(error_response(status, code, message)))
        return False

    async def _stream(self, head: bytes, data: bytes, body: BodyStream, chunked: bool) -> None:
        transport = self._transport
        assert transport is not None
        transport.write(head + (wire.chunk(data) if chunked and data else data))
        while data and not transport.is_closing():
            if self._write_paused:
                await self._wait_drained()
            data = await body.read()
            if data:
                transport.write(wire.chunk(data) if chunked else data)
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

    # Timeouts: one timer per connection, re-armed from the state it finds

    def _arm(self, delay: float) -> None:
        self._timer = self._loop.call_later(delay, self._check_timeouts)

    def _check_timeouts(self) -> None:
        limit, on_expiry = self._deadline()
        waited = self._loop.time() - self._since
        if limit is not None and waited >= limit:
            on_expiry()
            self._dispatch()
            limit, waited = None, 0.0
        if self._writing is not Writing.CLOSED:
            self._arm(max((limit or self._limits.keepalive) - waited, 0.05))

    def _deadline(self) -> tuple[float | None, Callable[[], None]]:
        """How long the app may stay silent in this state, and what happens after."""
        if self._reading is Reading.HEAD:
            late = _Refused(408, "request_timeout", "the request head took too long")
            return self._limits.header_timeout, lambda: self._refuse(late)
        if self._reading is Reading.BODY and self._request is self._current:
            body = self._request.body if self._request is not None else None
            if body is not None and not body.paused:  # else we are the slow side
                late = _Refused(408, "request_timeout", "the request body stopped arriving")
                return self._limits.body_timeout, lambda: self._refuse(late)
        if self._writing is Writing.IDLE and self._reading is Reading.IDLE:
            return self._limits.keepalive, self._close
        return None, self._close


class Server:
    """The listening socket and its connections; closes them gracefully on ``close``."""

    def __init__(
        self,
        handler: Handler,
        loop: asyncio.AbstractEventLoop,
        fast: FastHandler | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.handler = handler
        self.fast = fast
        self.loop = loop
        self.limits = limits or Limits()
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
