"""Requests from one app connection's bytes: llhttp (httptools) plus the rules it leaves to us.

The reading side of a connection has one state: IDLE (between requests) -> HEAD -> BODY ->
IDLE, or CLOSED once the connection will read no further request. llhttp rejects most
ambiguous framing itself (CL with TE, differing lengths, bad chunks, bare CR or LF, obs-fold);
this layer adds RFC 9112's other rules: Transfer-Encoding in an HTTP/1.0 request (§6.1) and a
missing or repeated Host (§3.2) are refused. Trailer fields are read and dropped, so they can
never change the request's head. The head limit holds for every byte read, not only for
complete fields: llhttp hands over a field only once it ends.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable

import httptools

from sidecar.http.body import BodyStream
from sidecar.http.messages import Headers, Request

MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 128
# The fields read here: content-length, transfer-encoding, expect, host.
_READ_FIELD_LENGTHS = frozenset({14, 17, 6, 4})


class Refused(Exception):
    """A request refused before any handler sees it: answered with ``status`` and ``code``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def too_large(what: str) -> Refused:
    return Refused(431, "headers_too_large", f"{what} is too large")


def _check_codings(values: list[bytes], http11: bool) -> None:
    """Transfer-Encoding must be exactly ``chunked``, in an HTTP/1.1 request.

    RFC 9112 §6.1: in HTTP/1.0 it is a smuggling vector. Another coding before chunked would
    reach the target decoded of its chunks but still coded, without saying so (nginx: 501).
    """
    if not http11:
        raise Refused(400, "bad_request", "Transfer-Encoding in an HTTP/1.0 request")
    codings = [c.strip(b" \t").lower() for value in values for c in value.split(b",")]
    if [c for c in codings if c] != [b"chunked"]:  # empty list elements are allowed
        raise Refused(400, "bad_request", "only Transfer-Encoding: chunked is supported")


class Reading(enum.Enum):
    IDLE = "idle"  # between requests: the next byte begins one
    HEAD = "head"  # a request head is arriving
    BODY = "body"  # its body is arriving
    CLOSED = "closed"  # no further request is read from this connection (set by its owner)


class RequestReader:
    """Feeds bytes to llhttp; each request whose head is complete goes to ``parsed``."""

    def __init__(
        self,
        transport: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
        parsed: Callable[[Request], None],
    ) -> None:
        self._transport = transport
        self._loop = loop
        self._parsed = parsed
        self._parser = httptools.HttpRequestParser(self)
        self.state = Reading.IDLE
        self.request: Request | None = None  # the one whose body is being read
        self.since = loop.time()  # the head began, or the body last moved
        self._url = b""
        self._headers: Headers = []
        self._field_bytes = 0  # of complete fields (and the target) in this head
        self._head_bytes = 0  # read while this head was incomplete
        self._stuck_bytes = 0  # read in BODY with no progress (a trailer field growing)
        self._progress = False  # the current feed moved the body along
        self._begun = 0  # requests begun in the current feed
        self._length: int | None = None
        self._framed = False  # Content-Length or Transfer-Encoding seen
        self._codings: list[bytes] = []  # Transfer-Encoding values
        self._hosts = 0
        self._expect_continue = False

    def feed(self, data: bytes) -> None:
        """Parse bytes. Raises Refused, or httptools.HttpParserUpgrade after an Upgrade or
        CONNECT request (the bytes after it are not HTTP)."""
        before = self.state
        self._begun, self._progress = 0, False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, Refused):
                raise cause from None
            raise Refused(400, "bad_request", f"malformed request: {exc}") from None
        if self.state is not Reading.IDLE:  # a whole request (the usual case) needs no count
            self._check_growth(before, len(data))

    def _check_growth(self, before: Reading, size: int) -> None:
        """Bytes read into an incomplete head or trailer field count as they arrive."""
        if self.state is Reading.HEAD and self._begun == (0 if before is Reading.HEAD else 1):
            # The feed held this head's bytes only (a head begun after another message's end
            # in the same feed is counted from the next feed on: a bounded undercount).
            self._head_bytes += size
            if self._head_bytes > MAX_HEAD_BYTES:
                raise too_large("the request head")
        elif self.state is Reading.BODY and before is Reading.BODY and not self._begun:
            self._stuck_bytes = 0 if self._progress else self._stuck_bytes + size
            if self._stuck_bytes > MAX_HEAD_BYTES:
                raise too_large("a trailer field")

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.state = Reading.HEAD
        self._begun += 1
        self.since = self._loop.time()
        self._url, self._headers, self._field_bytes, self._head_bytes = b"", [], 0, 0
        self._length, self._framed, self._codings = None, False, []
        self._hosts, self._expect_continue = 0, False

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._field_bytes += len(url)
        if self._field_bytes > MAX_HEAD_BYTES:
            raise too_large("the request head")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._field_bytes += len(name) + len(value)
        if self._field_bytes > MAX_HEAD_BYTES or len(self._headers) >= MAX_HEADERS:
            raise too_large("the request head")
        if self.state is not Reading.HEAD:
            self._progress = True
            return  # a trailer field: read and dropped, it never joins the head
        if len(name) in _READ_FIELD_LENGTHS:  # skips lower() for most fields
            self._read_field(name.lower(), value)
        self._headers.append((name, value))

    def _read_field(self, lower: bytes, value: bytes) -> None:
        if lower == b"content-length":
            self._length, self._framed = int(value), True
        elif lower == b"transfer-encoding":
            self._framed = True
            self._codings.append(value)
        elif lower == b"expect":
            self._expect_continue = value.lower() == b"100-continue"
        elif lower == b"host":
            self._hosts += 1

    def on_headers_complete(self) -> None:
        version = self._parser.get_http_version()
        if version not in ("1.0", "1.1"):
            raise Refused(400, "bad_request", f"HTTP/{version} is not spoken here")
        http11 = version == "1.1"
        if self._codings:
            _check_codings(self._codings, http11)
        if self._hosts > 1 or (http11 and not self._hosts):  # RFC 9112 §3.2
            raise Refused(400, "bad_request", "an HTTP/1.1 request needs exactly one Host")
        body = BodyStream(self._transport) if self._framed else None
        self.request = request = Request(
            self._parser.get_method().decode("ascii"),
            self._url,
            self._headers,
            body,
            self._length,
            self._parser.should_keep_alive(),
            http11,
            self._expect_continue,
        )
        self.state = Reading.BODY
        self._progress = True
        self._parsed(request)

    def on_chunk_header(self) -> None:
        self._progress = True

    def on_body(self, data: bytes) -> None:
        self._progress = True
        self.since = self._loop.time()
        if self.request is not None and self.request.body is not None:
            self.request.body.feed(data)

    def on_message_complete(self) -> None:
        if self.request is not None and self.request.body is not None:
            self.request.body.feed_eof()
        self.request = None
        self.state = Reading.IDLE
