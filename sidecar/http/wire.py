"""How the server frames an answer on the wire (RFC 9112 §6): head, length or chunks, close."""

from __future__ import annotations

from http import HTTPStatus

from sidecar.http.body import BodyStream
from sidecar.http.messages import Request, Response

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
