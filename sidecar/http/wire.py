"""How the server frames and writes an answer (RFC 9112 §6): head, length or chunks, close."""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus

from sidecar.http.body import BodyStream, WriteGate
from sidecar.http.messages import Request, RequestError, Response
from sidecar.http.responses import error_response

log = logging.getLogger("sidecar.http.server")

NO_BODY_STATUSES = frozenset({204, 304})


def may_have_body(status: int) -> bool:
    return status >= 200 and status not in NO_BODY_STATUSES


def frame(
    request: Request, response: Response, last: bool
) -> tuple[bytes, bytes | BodyStream, bool, bool]:
    """The head, the body to write (b"" when none may go), keep-alive, and chunking.

    ``last``: the server will read no request after this one.
    """
    body = response.body
    if isinstance(body, BodyStream) and body.complete:
        body = body.take()  # all of it is here already: one write, with its length
    has_body = request.method != "HEAD" and may_have_body(response.status)
    length = response.length
    if length is None and isinstance(body, bytes) and may_have_body(response.status):
        length = len(body)
    chunked = has_body and length is None
    keep_alive = (
        request.keep_alive
        and not last
        and (request.body is None or request.body.complete)
        and (not chunked or request.http11)  # HTTP/1.0: no chunks, the close ends the body
    )
    chunked = chunked and keep_alive
    head = head_bytes(response, length, chunked, connection_field(request, keep_alive))
    return head, body if has_body else b"", keep_alive, chunked


def head_bytes(response: Response, length: int | None, chunked: bool, connection: bytes) -> bytes:
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


def closing(response: Response) -> bytes:
    """A complete answer of the server's own, followed by a close."""
    assert isinstance(response.body, bytes)
    head = head_bytes(response, len(response.body), False, b"Connection: close\r\n")
    return head + response.body


def connection_field(request: Request, keep_alive: bool) -> bytes:
    """A Connection field only where the default of the client's HTTP version does not hold."""
    if keep_alive == (request.keep_alive and request.http11):
        return b""
    return b"Connection: keep-alive\r\n" if keep_alive else b"Connection: close\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode("ascii")
    except ValueError:
        return b"Unknown"


class AnswerWriter:
    """Writes answers on one app connection, waiting while the app reads slowly."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self.gate = WriteGate(loop)

    def write_complete(self, request: Request, response: Response, last: bool) -> bool:
        """Write an answer whose body is all here; True when the connection stays open."""
        head, data, keep_alive, _ = frame(request, response, last)
        assert isinstance(data, bytes)
        self._transport.write(head + data if data else head)
        return keep_alive

    async def write(self, request: Request, response: Response, last: bool) -> bool:
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
                return self._write_error(exc.status, exc.code, str(exc))
            except Exception as exc:
                log.warning("upstream_failed", extra={"error": str(exc)})
                message = "the upstream broke off its answer"
                return self._write_error(502, "upstream_unavailable", message)
        head, data, keep_alive, chunked = frame(request, response, last)
        if isinstance(data, bytes):
            self._transport.write(head + data if data else head)
        else:
            await self._stream(head, first, data, chunked)
        return keep_alive

    def _write_error(self, status: int, code: str, message: str) -> bool:
        self._transport.write(closing(error_response(status, code, message)))
        return False

    async def _stream(self, head: bytes, data: bytes, body: BodyStream, chunked: bool) -> None:
        transport = self._transport
        transport.write(head + (chunk(data) if chunked and data else data))
        while data and not transport.is_closing():
            await self.gate.wait()
            data = await body.read()
            if data:
                transport.write(chunk(data) if chunked else data)
        if chunked:
            transport.write(b"0\r\n\r\n")
