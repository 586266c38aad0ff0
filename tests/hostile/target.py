"""The target side of the hostile-input harness: a raw asyncio server that records every byte
of every connection and answers with a script the test gives."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import httptools

DEADLINE = 5.0  # seconds: the bound on every read; a correct sidecar answers in milliseconds


@dataclass
class UpRequest:
    """One request as the target received it."""

    conn: int  # index of the target connection it arrived on
    index: int  # its position among all requests the target received
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    account: str  # whose token it carried ("none", or "several" when more than one)
    raw: bytes  # every byte of its connection up to the end of this request

    def header_values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


@dataclass
class Reply:
    """What the target writes for one request, then what it does with the connection."""

    data: bytes
    then: str = "keep"  # keep | close | hold (answer nothing more, keep recording)


Script = Callable[[UpRequest], Reply]


def answer_body(req: UpRequest) -> bytes:
    """The body of the target's normal answer: names the account and request, never a token."""
    return b"answer:%s:%s %s" % (req.account.encode(), req.method, req.target)


def answer(req: UpRequest) -> Reply:
    """A normal 200 with a Content-Length, unique to the request (HEAD: the head only)."""
    body = answer_body(req)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(body)
    return Reply(head if req.method == b"HEAD" else head + body)


def reflect(req: UpRequest) -> Reply:
    """A TRACE-style answer (RFC 9110 §9.3.8): the request as received, token included."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: message/http\r\nContent-Length: %d\r\n\r\n"
    return Reply(head % len(req.raw) + req.raw)


def by_path(replies: dict[bytes, Reply | Callable[[UpRequest], Reply]]) -> Script:
    """Scripted answers for some paths; the normal answer for the rest."""

    def script(req: UpRequest) -> Reply:
        chosen = replies.get(req.target)
        if chosen is None:
            return answer(req)
        return chosen(req) if callable(chosen) else chosen

    return script


class _Collector:
    """httptools callbacks: completed requests of one connection, in order."""

    def __init__(self) -> None:
        self.done: list[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]] = []
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body = bytearray()
        self.method = b""
        self.parser: httptools.HttpRequestParser | None = None

    def on_message_begin(self) -> None:
        self._url, self._headers, self._body = b"", [], bytearray()

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self.method = self.parser.get_method()

    def on_body(self, data: bytes) -> None:
        self._body += data

    def on_message_complete(self) -> None:
        self.done.append((self.method, self._url, self._headers, bytes(self._body)))


@dataclass
class UpConnection:
    index: int
    writer: asyncio.StreamWriter
    data: bytearray = field(default_factory=bytearray)
    requests: list[UpRequest] = field(default_factory=list)
    closed: bool = False  # the sidecar closed it (or the script did)
    held: bool = False

    def push(self, data: bytes) -> None:
        """Bytes the sidecar did not ask for, on a connection it may hold in its pool."""
        self.writer.write(data)


class RecordingUpstream:
    """A raw HTTP/1.1 server on 127.0.0.1:0 that records everything and follows a script."""

    def __init__(self, script: Script = answer) -> None:
        self.script = script
        self.conns: list[UpConnection] = []
        self.requests: list[UpRequest] = []
        self.protocol_errors: list[str] = []  # the sidecar sent bytes that are not HTTP/1.1
        self.accounts: dict[bytes, str] = {}  # token -> account, to label requests
        self._changed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._stopped = False
        self.port = 0

    async def start(self, port: int = 0) -> RecordingUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def authority(self) -> bytes:
        return b"127.0.0.1:%d" % self.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def forwarded(self) -> int:
        """Requests that reached this target, counting one it could not parse."""
        return len(self.requests) + (1 if self.protocol_errors else 0)

    @property
    def received(self) -> bytes:
        return b"".join(bytes(c.data) for c in self.conns)

    async def stop(self) -> None:
        self._stopped = True
        if self._server is not None:
            self._server.close()
        for _ in range(5):  # yields, no waiting: a connection accepted just before close
            await asyncio.sleep(0)  # gets its transport and handler, sees _stopped, closes
        # (Python 3.11's Server does not track its connections itself)
        for conn in self.conns:
            conn.writer.close()
        for conn in self.conns:
            with contextlib.suppress(Exception):
                await conn.writer.wait_closed()
        if self._server is not None:
            await self._server.wait_closed()

    async def wait(self, predicate: Callable[[], bool], timeout: float = DEADLINE) -> bool:
        """Wait until ``predicate()`` holds (re-checked on every change), at most ``timeout``."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not predicate():
            self._changed.clear()
            remaining = end - loop.time()
            if remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        return True

    def _notify(self) -> None:
        self._changed.set()

    def _account(self, headers: list[tuple[bytes, bytes]]) -> str:
        found = [
            self.accounts.get(v.removeprefix(b"Bearer "), "unknown")
            for n, v in headers
            if n.lower() == b"authorization"
        ]
        if not found:
            return "none"
        return found[0] if len(found) == 1 else "several"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._stopped:
            writer.close()
            return
        conn = UpConnection(len(self.conns), writer)
        self.conns.append(conn)
        self._notify()
        collector = _Collector()
        parser = httptools.HttpRequestParser(collector)
        collector.parser = parser
        broken = False
        try:
            while data := await reader.read(65536):
                conn.data += data
                self._notify()
                try:
                    parser.feed_data(data)
                except httptools.HttpParserUpgrade:
                    self.protocol_errors.append(f"conn {conn.index}: an Upgrade/CONNECT request")
                    broken = True
                except httptools.HttpParserError as exc:
                    self.protocol_errors.append(f"conn {conn.index}: {exc!r}")
                    broken = True
                if broken:  # answer at once, so that a proxy in front does not wait
                    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    return
                if self._answer(conn, collector) == "close":
                    return
        except (ConnectionError, OSError):
            pass
        finally:
            conn.closed = True
            self._notify()
            writer.close()

    def _answer(self, conn: UpConnection, collector: _Collector) -> str:
        while collector.done:
            method, target, headers, body = collector.done.pop(0)
            req = UpRequest(
                conn.index,
                len(self.requests),
                method,
                target,
                headers,
                body,
                self._account(headers),
                bytes(conn.data),
            )
            conn.requests.append(req)
            self.requests.append(req)
            self._notify()
            if conn.held:
                continue
            reply = self.script(req)
            conn.writer.write(reply.data)
            if reply.then == "close":
                return "close"
            conn.held = reply.then == "hold"
        return "keep"
