"""The sidecar's HTTP/1.1 server: llhttp parsing (httptools) on asyncio protocols.

Every request an app makes passes through here, so this layer does only what a forwarding
proxy needs: parse a request, hand it to one handler, write the handler's answer with the
right framing, keep the connection alive. The admin listener runs on it too, with a route table.

A connection's life is two explicit states (h11's ``_state.py`` is the model). Reading (see
``reader.py``): IDLE -> HEAD -> BODY -> IDLE, or CLOSED once no further request may be read (a
refusal, an ``Upgrade`` or ``CONNECT``, ``Connection: close``, shutdown). Writing: IDLE ->
ANSWERING -> IDLE, or CLOSED. Requests parsed while another is answered wait in order
(pipelining), and are dispatched only after a whole read was parsed: a request whose bytes
turn out malformed is refused (a JSON error, then close), never half started. One that was
parsed before the bad bytes still gets its answer first, as with nginx. A head or a body that
stops arriving gets 408 after its timeout.
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
from sidecar.http.messages import FastHandler, Handler, Request, RequestError, Response
from sidecar.http.reader import Reading, Refused, RequestReader
from sidecar.http.responses import error_response

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Limits:
    header_timeout: float = 60.0  # to send a whole request head
    body_timeout: float = 60.0  # between two reads of a request body (nginx's meaning)
    keepalive: float = 75.0  # an idle connection is closed after this


class Writing(enum.Enum):
    IDLE = "idle"
    ANSWERING = "answering"  # a handler (a task, or the fast path) owns the current request
    CLOSED = "closed"


class _Connection(asyncio.Protocol):
    """One client connection: parse requests, answer each in turn, enforce the limits."""

    def __init__(self, server: Server) -> None:
        self._server = server
        self._loop = server.loop
        self._limits = limits = server.limits
        # The timer checks at least this often, so each limit holds within its own length.
        self._tick = min(limits.header_timeout, limits.body_timeout, limits.keepalive)
        self._transport: asyncio.Transport | None = None
        self._reader: RequestReader
        self._writing = Writing.IDLE
        self._held = False  # reading paused while parsed requests wait their turn
        self._queue: deque[Request] = deque()  # parsed, waiting for their turn
        self._current: Request | None = None  # being answered
        self._refusal: Response | None = None  # written once the queue is answered; then close
        self._dispatching = False
        self._task: asyncio.Task[None] | None = None
        self._writer: wire.AnswerWriter
        self._idle_since = self._loop.time()
        self._timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._writer = wire.AnswerWriter(self._transport, self._loop)
        self._reader = RequestReader(self._transport, self._loop, self._queue.append)
        self._server.connections.add(self)
        self._arm(self._tick)

    def data_received(self, data: bytes) -> None:
        if self._reader.state is Reading.CLOSED:
            return
        try:
            self._reader.feed(data)
        except httptools.HttpParserUpgrade:
            self._reader.state = Reading.CLOSED  # CONNECT or Upgrade: answer it, then close
        except Refused as refusal:
            self._refuse(refusal)
        self._dispatch()

    def connection_lost(self, exc: Exception | None) -> None:
        request = self._reader.request
        self._reader.state = Reading.CLOSED
        self._writing = Writing.CLOSED
        self._server.forget(self)
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None:  # nobody waits for the answer: free its upstream connection
            self._task.cancel()
        gone = RequestError(400, "client_closed", "the app closed the connection")
        for waiting in (request, *self._queue):
            if waiting is not None and waiting.body is not None:
                waiting.body.set_exception(gone)
        self._queue.clear()
        self._writer.gate.resume()

    def pause_writing(self) -> None:
        self._writer.gate.pause()

    def resume_writing(self) -> None:
        self._writer.gate.resume()

    # Refusing

    def _refuse(self, refusal: Refused) -> None:
        """Stop reading; answer the refused request after those parsed before it, then close.

        A request whose handler already runs learns it from its body, and its answer says so.
        """
        request = self._reader.request
        self._reader.state = Reading.CLOSED
        self._reader.request = None
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

    def _answering_last(self) -> bool:
        """No request will be answered after the current one: its answer says close."""
        return self._reader.state is Reading.CLOSED and not self._queue and self._refusal is None

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
                elif self._reader.state is Reading.CLOSED:
                    self._close()
                else:
                    self._idle_since = self._loop.time()
                    break
            if self._queue or self._held:
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
        if request.body is None and self._try_fast(request):
            return  # answered through deliver() or serve() later
        self.serve(request, self._server.handler(request))

    def _try_fast(self, request: Request) -> bool:
        """Whatever the fast handler cannot finish falls to the handler, which answers all."""
        fast = self._server.fast
        if fast is None:
            return False
        try:
            return fast(request, self)
        except Exception:
            log.exception("handler_failed")
            return self._current is not request or self._task is not None  # answered already

    def _close(self) -> None:
        self._reader.state = Reading.CLOSED
        self._writing = Writing.CLOSED
        if self._transport is not None:
            self._transport.close()

    def shutdown(self) -> None:
        """Finish the request in flight (answered with ``Connection: close``), then close."""
        self._reader.state = Reading.CLOSED
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
            keep_alive = self._writer.write_complete(request, response, self._answering_last())
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
            keep_alive = await self._writer.write(request, response, self._answering_last())
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

    # Timeouts: one timer per connection, re-armed from the state it finds

    def _arm(self, delay: float) -> None:
        self._timer = self._loop.call_later(delay, self._check_timeouts)

    def _check_timeouts(self) -> None:
        limit, since, on_expiry = self._deadline()
        waited = self._loop.time() - since
        if limit is not None and waited >= limit:
            on_expiry()
            self._dispatch()
            limit, waited = None, 0.0
        if self._writing is not Writing.CLOSED:
            self._arm(max(min(limit - waited, self._tick) if limit else self._tick, 0.05))

    def _deadline(self) -> tuple[float | None, float, Callable[[], None]]:
        """How long the app may stay silent in this state, since when, and what follows."""
        reader = self._reader
        if reader.state is Reading.HEAD:
            late = Refused(408, "request_timeout", "the request head took too long")
            return self._limits.header_timeout, reader.since, lambda: self._refuse(late)
        request = reader.request
        body = request.body if request is not None and request is self._current else None
        if reader.state is Reading.BODY and body is not None and not body.paused:
            late = Refused(408, "request_timeout", "the request body stopped arriving")
            return self._limits.body_timeout, reader.since, lambda: self._refuse(late)
        if self._writing is Writing.IDLE and reader.state is Reading.IDLE:
            return self._limits.keepalive, self._idle_since, self._close
        return None, 0.0, self._close


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
