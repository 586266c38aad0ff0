"""What the HTTP layer hands to a handler and takes back from it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from sidecar.http.body import BodyStream

Headers = list[tuple[bytes, bytes]]


class RequestError(Exception):
    """The app's request cannot be completed, through the app's doing (a malformed or late
    body, a connection closed mid-upload). Answered with ``status`` and ``code``, never
    logged as a sidecar failure."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass(slots=True)
class Request:
    method: str
    target: bytes  # the raw request-target, in whatever form the app sent it
    headers: Headers  # as received, in order, original case
    body: BodyStream | None  # None when the request has no body at all
    length: int | None  # Content-Length, when the app sent one
    keep_alive: bool = True  # the connection may carry another request after this one
    http11: bool = True
    expect_continue: bool = False  # the app waits for "100 Continue" before its body


@dataclass(slots=True)
class Response:
    status: int
    headers: Headers  # without framing fields: the server writes Content-Length or chunks
    body: bytes | BodyStream = b""
    length: int | None = None  # Content-Length to announce (for a HEAD answer, without a body)
    reason: bytes = b""
    release: Callable[[], None] | None = field(default=None)  # called once the body is written


Handler = Callable[[Request], Awaitable[Response]]


class Lent(Protocol):
    """A pooled connection lent to one request."""

    def abandon(self) -> None:
        """The borrower is done: reuse the connection if both messages ended, else close."""


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    reason: bytes
    headers: Headers  # as received, nothing removed
    body: BodyStream
    length: int | None  # the announced Content-Length
    _connection: Lent | None = field(default=None, repr=False)

    def release(self) -> None:
        """Done with this answer: an unfinished connection is closed, a finished one reused."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.abandon()


class Responder(Protocol):
    """How a fast handler answers a request it took."""

    def deliver(self, request: Request, response: Response) -> None:
        """Write the answer (at once when complete, from a task while it streams)."""

    def serve(self, request: Request, answer: Awaitable[Response]) -> None:
        """Answer with what the coroutine produces, in a task."""


# Tries to answer a bodiless request without a task; False leaves it to the Handler.
FastHandler = Callable[[Request, Responder], bool]
