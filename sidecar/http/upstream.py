"""One connection to an upstream, as an explicit state machine (h11's ``_state.py`` is the model).

Ours: IDLE (in the pool) -> SENDING -> SENT. Theirs: IDLE -> WAITING (for the head) -> BODY ->
DONE, or CLOSED from anywhere. Every byte the upstream sends moves its state along the
answer's framing or is a protocol error (bytes while IDLE, a second message after DONE, a body
on a 204, 304 or HEAD answer, an unasked ``101``) that closes the connection. It goes back to
the pool only when both sides are done and the answer ended exactly where its framing said, so
no byte of one answer can reach the next request. (llhttp skips blank lines between messages
unseen; they cannot form an answer.)
"""

from __future__ import annotations

import asyncio
import enum
import re
from collections.abc import Callable
from typing import cast

import httptools

from sidecar.http.body import BodyStream, WriteGate
from sidecar.http.errors import StaleConnection, UpstreamError
from sidecar.http.messages import RequestError, UpstreamResponse
from sidecar.http.wire import NO_BODY_STATUSES

RequestBody = bytes | BodyStream | None
Answered = Callable[["UpstreamResponse | None", "BaseException | None"], None]
GiveBack = Callable[["UpstreamConnection", bool], None]

MAX_HEAD_BYTES = 64 * 1024  # an answer's head, and its trailer section
_FRAMING_NAME_LENGTHS = frozenset({len(b"content-length"), len(b"transfer-encoding")})
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class _StrayBytes(Exception):
    """The upstream sent bytes its answer's framing does not account for."""


class _TooLarge(Exception):
    """The answer's head or trailer section passed MAX_HEAD_BYTES."""


class Ours(enum.Enum):
    IDLE = "idle"  # in the pool, lent to no request
    SENDING = "sending"  # lent out; the request (its body) is still being written
    SENT = "sent"  # lent out; the whole request is written


class Theirs(enum.Enum):
    IDLE = "idle"  # no request in flight: any byte is a protocol error
    WAITING = "waiting"  # for the answer's head (1xx interim answers are skipped)
    BODY = "body"  # the head arrived; the body is arriving
    DONE = "done"  # the answer ended exactly where its framing said
    CLOSED = "closed"  # closed, or must be: never carries another request


class UpstreamConnection(asyncio.Protocol):
    """One upstream connection, carrying one request at a time."""

    def __init__(
        self, give_back: GiveBack, read_timeout: float, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._give_back = give_back
        self._read_timeout = read_timeout
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._ours = Ours.IDLE
        self._theirs = Theirs.IDLE
        self._reused = False  # has carried a request before this one
        self._head_only = False  # the request was HEAD: the answer has no body
        self._keep_alive = False  # the answer allows another request on the connection
        self._ended_early = False  # DONE at the head (HEAD, 204, 304): llhttp may end it too
        self._waiter: asyncio.Future[UpstreamResponse] | None = None
        self._callback: Answered | None = None  # instead of the waiter, for start()
        self._answered: UpstreamResponse | None = None  # head arrived, callback not yet run
        self._response: UpstreamResponse | None = None
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._length: int | None = None
        self._until_close = False  # neither Content-Length nor chunked: the close ends it
        self._head_bytes = 0  # bytes read while the head was incomplete
        self._field_bytes = 0  # bytes of complete fields, trailers included
        self._stuck_bytes = 0  # read in BODY with no parser progress (a trailer growing)
        self._progress = False  # the current feed moved the body along
        self._got_bytes = False
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._pump: asyncio.Task[None] | None = None
        self._gate = WriteGate(loop)

    @property
    def usable(self) -> bool:
        transport = self._transport
        return self._theirs is Theirs.IDLE and transport is not None and not transport.is_closing()

    # Lending: one request at a time

    async def exchange(
        self, method: str, head: bytes, body: RequestBody, chunked: bool
    ) -> UpstreamResponse:
        """Send a request; return once the answer's head has arrived."""
        assert self._transport is not None
        reused = self._begin(method)
        self._waiter = self._loop.create_future()
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
        self._begin(method)
        self._callback = answered
        self._transport.write(head)
        self._sent()

    def abandon(self) -> None:
        """The borrower is done: reuse the connection if both messages ended, else close."""
        if self._ours is Ours.IDLE:
            return
        if not (self._ours is Ours.SENT and self._theirs is Theirs.DONE):
            self.close()
            if self._pump is not None:
                self._pump.cancel()
        self._settle()

    def close(self) -> None:
        if self._theirs is not Theirs.CLOSED:
            self._theirs = Theirs.CLOSED
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._transport is not None:
                self._transport.close()

    def _begin(self, method: str) -> bool:
        """Lend the connection to one request; True when it carried one before."""
        reused, self._reused = self._reused, True
        if self._head_only:
            self._parser = httptools.HttpResponseParser(self)  # llhttp would wait for a body
        self._ours, self._theirs = Ours.SENDING, Theirs.WAITING
        self._head_only = method == "HEAD"
        self._ended_early = False
        self._got_bytes = False
        self._head_bytes = self._field_bytes = 0
        self._last_read = self._loop.time()
        return reused

    def _settle(self) -> None:
        """Hand the connection back to the pool once both sides ended (once per request)."""
        if self._ours is Ours.IDLE:
            return
        closed = self._theirs is Theirs.CLOSED
        if not closed and not (self._ours is Ours.SENT and self._theirs is Theirs.DONE):
            return
        self._ours = Ours.IDLE
        if self._pump is not None and closed:
            self._pump.cancel()  # the rest of the request body has nowhere to go
        self._pump = None
        reusable = not closed and self._keep_alive
        if reusable:
            self._theirs = Theirs.IDLE
        else:
            self.close()
        if self._response is not None:
            self._response._connection = None  # its release() must not touch the next request
        self._response = None
        self._give_back(self, reusable)

    # Sending

    async def _send_body(self, body: BodyStream, chunked: bool) -> None:
        transport = self._transport
        assert transport is not None
        try:
            while data := await body.read():
                transport.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                await self._gate.wait()
            if chunked:
                transport.write(b"0\r\n\r\n")
        except RequestError as exc:  # the app's body was bad or late: its own answer says so
            self._fail(exc)
            return
        except Exception:
            self._fail(UpstreamError("the request body could not be sent"))
            return
        self._sent()

    def _sent(self) -> None:
        self._ours = Ours.SENT
        self._last_read = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_later(self._read_timeout, self._check_read_timeout)
        if self._theirs is not Theirs.WAITING:  # the answer came (or failed) first
            self._settle()

    def _check_read_timeout(self) -> None:
        """The read timeout: one timer per connection, outliving the requests that armed it.
        It re-arms itself while bytes keep coming (or while we stopped reading), and lapses on
        an idle connection until the next request arms it; a request costs no timer of its own.
        """
        self._timer = None
        if self._theirs not in (Theirs.WAITING, Theirs.BODY):
            return
        waited = self._loop.time() - self._last_read
        response = self._response
        holding = self._ours is Ours.SENDING or (response is not None and response.body.paused)
        if holding or waited < self._read_timeout:
            delay = self._read_timeout if holding else self._read_timeout - waited
            self._timer = self._loop.call_later(delay, self._check_read_timeout)
            return
        self._fail(TimeoutError("the upstream did not answer in time"))

    def _fail(self, exc: BaseException) -> None:
        """The exchange cannot go on: the answer (or whoever waits for it) gets ``exc``."""
        answer_done = self._theirs is Theirs.DONE
        self.close()
        if self._transport is not None:
            self._transport.abort()
        if answer_done:
            self._settle()  # the answer stands; only the connection is lost
        elif self._response is not None:
            self._response.body.set_exception(exc)
        else:
            self._head_failed(exc)

    def _head_failed(self, exc: BaseException) -> None:
        """No answer will come: tell whoever waits for its head."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)  # exchange() abandons the connection
        elif self._callback is not None:
            answered, self._callback = self._callback, None
            self.abandon()
            answered(None, exc)

    def _protocol_error(self, message: str) -> None:
        """Bytes the framing cannot account for: after a complete answer only the connection
        is lost; before, the answer is too."""
        if self._theirs is Theirs.DONE:
            self.close()
        else:
            self._fail(UpstreamError(message))

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        theirs = self._theirs
        if theirs is Theirs.IDLE or theirs is Theirs.CLOSED:
            self.close()  # nobody asked: the connection is no longer trustworthy
            return
        self._got_bytes, self._progress = True, False
        self._last_read = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._protocol_error("the upstream switched protocols unasked")
        except httptools.HttpParserError as exc:
            too_large = isinstance(exc.__context__, _TooLarge)
            message = "the answer's head is too large" if too_large else f"malformed answer: {exc}"
            self._protocol_error(message)
        else:
            self._check_limits(theirs, len(data))
        if self._answered is not None and self._callback is not None:
            response, self._answered = self._answered, None
            answered, self._callback = self._callback, None
            answered(response, None)
        if self._theirs is Theirs.DONE or self._theirs is Theirs.CLOSED:
            self._settle()

    def _check_limits(self, before: Theirs, size: int) -> None:
        """A head (or trailer section) may not grow past MAX_HEAD_BYTES, counted as it is
        read, not only when a field completes: llhttp hands over a field only once it ends."""
        if before is Theirs.WAITING and self._theirs is Theirs.WAITING:
            self._head_bytes += size
            if self._head_bytes > MAX_HEAD_BYTES:
                self._fail(UpstreamError("the answer's head is too large"))
        elif before is Theirs.BODY and self._theirs is Theirs.BODY:
            self._stuck_bytes = 0 if self._progress else self._stuck_bytes + size
            if self._stuck_bytes > MAX_HEAD_BYTES:
                self._fail(UpstreamError("the answer's trailer section is too large"))

    def connection_lost(self, exc: Exception | None) -> None:
        theirs = self._theirs
        self.close()
        self._gate.resume()
        if theirs is Theirs.WAITING:
            stale = StaleConnection if not self._got_bytes else UpstreamError
            self._head_failed(stale("the upstream closed the connection"))
        elif theirs is Theirs.BODY and self._response is not None:
            if self._until_close:
                self._response.body.feed_eof()  # the close is the end of this body
            else:
                self._response.body.set_exception(UpstreamError("the answer was cut short"))
        self._settle()

    def pause_writing(self) -> None:
        self._gate.pause()

    def resume_writing(self) -> None:
        self._gate.resume()

    # httptools callbacks: each checks that the byte fits the state, or raises _StrayBytes

    def on_message_begin(self) -> None:
        if self._theirs is not Theirs.WAITING:
            raise _StrayBytes  # a second answer to one request
        self._headers, self._length, self._until_close = [], None, True
        self._reason = b""

    def on_status(self, reason: bytes) -> None:
        self._field_bytes += len(reason)  # (llhttp may hand the phrase over in pieces)
        if self._field_bytes > MAX_HEAD_BYTES:
            raise _TooLarge
        if _CONTROL.search(reason):
            raise _StrayBytes  # RFC 9112 §4: HTAB, SP, VCHAR and obs-text only
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._field_bytes += len(name) + len(value)
        if self._field_bytes > MAX_HEAD_BYTES:
            raise _TooLarge
        if self._theirs is not Theirs.WAITING:
            self._progress = True
            return  # a trailer field: dropped (the app's answer is framed anew)
        if len(name) in _FRAMING_NAME_LENGTHS:  # skips lower() for most fields
            lower = name.lower()
            if lower == b"content-length":
                self._length, self._until_close = int(value), False
            elif lower == b"transfer-encoding":
                # RFC 9112 §6.3: chunked only when it is the final coding; else the close ends it
                self._until_close = not value.rstrip().lower().endswith(b"chunked")
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._theirs is not Theirs.WAITING:
            raise _StrayBytes
        status = self._parser.get_status_code()
        if status < 200:
            return  # an interim answer (1xx) is dropped; the final one follows
        assert self._transport is not None
        self._response = response = UpstreamResponse(
            status, self._reason, self._headers, BodyStream(self._transport), self._length, self
        )
        self._theirs = Theirs.BODY
        self._progress = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(response)
        elif self._callback is not None:
            self._answered = response
        self._waiter = None
        if status in NO_BODY_STATUSES or self._head_only:
            self._ended_early = True
            self._complete()  # whatever the fields say; any byte after the head is stray

    def on_chunk_header(self) -> None:
        if self._theirs is not Theirs.BODY:
            raise _StrayBytes  # chunks on an answer that has no body
        self._progress = True

    def on_body(self, data: bytes) -> None:
        if self._theirs is not Theirs.BODY:
            raise _StrayBytes  # a body on an answer that has none, or past its end
        assert self._response is not None
        self._progress = True
        self._response.body.feed(data)

    def on_message_complete(self) -> None:
        if self._theirs is Theirs.BODY:
            self._complete()
        elif self._theirs is Theirs.DONE and self._ended_early:
            self._ended_early = False  # llhttp agrees that a bodiless answer ended
        elif self._theirs is not Theirs.WAITING:  # (WAITING: the end of a 1xx interim answer)
            raise _StrayBytes

    def _complete(self) -> None:
        assert self._response is not None
        self._theirs = Theirs.DONE
        self._keep_alive = self._parser.should_keep_alive()  # llhttp forgets it past the end
        self._response.body.feed_eof()
