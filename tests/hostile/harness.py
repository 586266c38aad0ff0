"""The hostile-input harness: every assertion is about bytes that crossed a socket.

- ``RecordingUpstream``: the target, a raw asyncio server that records every byte of every
  connection and answers with a script the test gives (raw bytes per request, then keep the
  connection, close it, or hold it without answering). Its requests are split with llhttp
  only to know when to answer and what to compare; the checks also look at the raw bytes.
- A second ``RecordingUpstream`` plays a host the app names (absolute-form, Host, CONNECT):
  it must never receive a connection, let alone a byte.
- ``AppConnection``: the app's side, a raw socket; ``frame_responses`` splits what the
  sidecar sent back into responses by the HTTP/1.1 framing rules, strictly, so a malformed
  answer from the sidecar is caught too.
- ``Rig`` ties them to one sidecar (started with the shared ``make_sidecar`` fixture, two
  seeded accounts) and checks the invariants every case shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httptools
import pytest

DEADLINE = 5.0  # seconds: the bound on every read; a correct sidecar answers in milliseconds
SILENT = b"{silent}"  # replaced by the silent target's host:port in case bytes
SMUGGLED = b"SMUGGLED"  # marks a request that must never reach the target
FORGED = b"trailer-forged-token"  # an Authorization value an app sends in a chunked trailer
PROBE_TRAILER = b"trailer-probe-value"  # a trailer value that must never be in a head

# ---------------------------------------------------------------------------------------------
# The target side


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


# ---------------------------------------------------------------------------------------------
# The app side

_STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) [\x20-\x7e]*\Z")
_FIELD = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([\x20-\x7e\x80-\xff\t]*?)[ \t]*\Z")


class Malformed(Exception):
    """The sidecar sent the app something that is not a well-framed HTTP/1.1 response."""


@dataclass
class Frame:
    """One complete response as it arrived: the raw head, and the body after de-chunking."""

    status: int
    head: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    chunked: bool = False

    def values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def header(self, name: bytes) -> bytes | None:
        found = self.values(name)
        return found[0] if found else None

    @property
    def closes(self) -> bool:
        return b"close" in b",".join(self.values(b"connection")).lower()

    def describe(self) -> str:
        code = self.header(b"x-sidecar-error")
        return f"{self.status}" + (f" {code.decode()}" if code else "")


def _dechunk(data: bytes, start: int) -> tuple[bytes, int] | None:
    """The chunked body starting at ``start`` and the offset after it; None if incomplete."""
    body = bytearray()
    pos = start
    while True:
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return None
        line = data[pos:eol]
        if not re.fullmatch(rb"[0-9a-fA-F]{1,16}", line):
            raise Malformed(f"bad chunk size line {line[:40]!r}")
        size = int(line, 16)
        pos = eol + 2
        if size == 0:
            break
        if len(data) < pos + size + 2:
            return None
        body += data[pos : pos + size]
        if data[pos + size : pos + size + 2] != b"\r\n":
            raise Malformed("chunk data not followed by CRLF")
        pos += size + 2
    while True:  # trailer section: fields, then an empty line
        eol = data.find(b"\r\n", pos)
        if eol < 0:
            return None
        if eol == pos:
            return bytes(body), pos + 2
        if not _FIELD.fullmatch(data[pos:eol]):
            raise Malformed(f"bad trailer field {data[pos:eol][:40]!r}")
        pos = eol + 2


def frame_responses(
    data: bytes, methods: list[bytes], closed: bool
) -> tuple[list[Frame], bytes, str | None]:
    """Split the app's received bytes into complete responses (1xx interim ones skipped).

    ``methods[i]`` is the method of the request the i-th final response answers (a HEAD
    answer has no body). Returns the frames, the bytes after the last complete one, and why
    the bytes are not well-framed HTTP/1.1 (None when they are, so far).
    """
    frames: list[Frame] = []
    pos = 0
    try:
        while pos < len(data):
            end = data.find(b"\r\n\r\n", pos)
            if end < 0:
                break
            head = data[pos : end + 4]
            lines = head[:-4].split(b"\r\n")
            match = _STATUS_LINE.fullmatch(lines[0])
            if match is None:
                raise Malformed(f"bad status line {lines[0][:60]!r}")
            headers: list[tuple[bytes, bytes]] = []
            for line in lines[1:]:
                field_match = _FIELD.fullmatch(line)
                if field_match is None:
                    raise Malformed(f"bad header line {line[:60]!r}")
                headers.append((field_match[1], field_match[2]))
            status = int(match[1])
            frame = Frame(status, head, headers, b"")
            lengths = frame.values(b"content-length")
            codings = frame.values(b"transfer-encoding")
            if len(lengths) > 1 or (lengths and codings):
                raise Malformed(f"ambiguous framing in {head[:200]!r}")
            method = methods[len(frames)] if len(frames) < len(methods) else b"GET"
            body_start = end + 4
            if 100 <= status < 200:
                if status == 101:
                    raise Malformed("101 Switching Protocols sent to the app")
                pos = body_start
                continue
            if method == b"HEAD" or status in (204, 304):
                pos = body_start
            elif codings:
                if [c.lower() for c in codings] != [b"chunked"]:
                    raise Malformed(f"transfer-encoding {codings!r}")
                got = _dechunk(data, body_start)
                if got is None:
                    break
                frame.body, pos = got
                frame.chunked = True
            elif lengths:
                if not lengths[0].isdigit():
                    raise Malformed(f"content-length {lengths[0]!r}")
                size = int(lengths[0])
                if len(data) < body_start + size:
                    break
                frame.body, pos = data[body_start : body_start + size], body_start + size
            elif closed:
                frame.body, pos = data[body_start:], len(data)
            else:
                break
            frames.append(frame)
    except Malformed as exc:
        return frames, data[pos:], str(exc)
    return frames, data[pos:], None


@dataclass
class AppResult:
    raw: bytes
    frames: list[Frame]
    rest: bytes  # bytes after the last complete response: an incomplete one, or junk
    closed: bool  # the sidecar closed (or reset) the connection
    timed_out: bool
    malformed: str | None

    def describe(self) -> str:
        parts = [f.describe() for f in self.frames]
        if self.rest:
            parts.append(f"+{len(self.rest)} unframed bytes {self.rest[:80]!r}")
        if self.malformed:
            parts.append(f"MALFORMED: {self.malformed}")
        parts.append("closed" if self.closed else ("timed out" if self.timed_out else "open"))
        return "[" + ", ".join(parts) + "]"


class AppConnection:
    """A raw app connection to the sidecar. Everything it reads is kept."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.raw = bytearray()
        self.closed = False
        self.methods: list[bytes] = []  # of the requests sent, for HEAD framing

    @classmethod
    async def open(cls, port: int) -> AppConnection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    async def send(self, data: bytes, methods: Iterable[bytes] | None = None) -> None:
        self.methods += list(methods) if methods is not None else request_methods(data)
        self.writer.write(data)
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(self.writer.drain(), DEADLINE)

    def result(self, timed_out: bool = False) -> AppResult:
        frames, rest, malformed = frame_responses(bytes(self.raw), self.methods, self.closed)
        return AppResult(bytes(self.raw), frames, rest, self.closed, timed_out, malformed)

    async def read(self, frames: int | None = None, timeout: float = DEADLINE) -> AppResult:
        """Read until the sidecar closes, or ``frames`` complete responses are in, or timeout."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not self.closed:
            now = self.result()
            if now.malformed or (
                frames is not None and len(now.frames) >= frames and not now.frames[-1].closes
            ):
                return now  # (after "Connection: close", read on to see the close itself)
            remaining = end - loop.time()
            if remaining <= 0:
                return self.result(timed_out=True)
            try:
                data = await asyncio.wait_for(self.reader.read(65536), remaining)
            except TimeoutError:
                return self.result(timed_out=True)
            except (ConnectionError, OSError):
                data = b""
            if not data:
                self.closed = True
            self.raw += data
        return self.result()

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        self.writer.transport.abort()


def request_methods(data: bytes) -> list[bytes]:
    """A rough list of request methods in ``data`` (only HEAD matters, for framing)."""
    return [m[1] for m in re.finditer(rb"(?:^|\n)([A-Z]+) [^\r\n]* HTTP/", data)]


async def exchange(port: int, data: bytes, frames: int | None = None) -> AppResult:
    app = await AppConnection.open(port)
    try:
        await app.send(data)
        return await app.read(frames)
    finally:
        app.close()


# ---------------------------------------------------------------------------------------------
# Checks

# The sidecar's own answers (README "Error contract").
CLOSING_ERRORS = frozenset({(400, "bad_request"), (431, "headers_too_large")})


def sidecar_error(frame: Frame) -> tuple[int, str] | None:
    """(status, code) when ``frame`` is a well-formed sidecar error answer, else None."""
    code = frame.header(b"x-sidecar-error")
    if code is None:
        return None
    try:
        body = json.loads(frame.body)
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get("error") != code.decode():
        return None
    if not isinstance(body.get("message"), str):
        return None
    return frame.status, code.decode()


def error_problem(result: AppResult, index: int, allowed: Iterable[tuple[int, str]]) -> str | None:
    """Why ``result.frames[index]`` is not one of the ``allowed`` sidecar errors (None: it is).

    400 ``bad_request`` and 431 also carry ``Connection: close`` and end the connection.
    """
    allowed = set(allowed)
    if index >= len(result.frames):
        return f"no answer at position {index}"
    frame = result.frames[index]
    got = sidecar_error(frame)
    if got not in allowed:
        return f"answer {index} is {frame.describe()}, not one of {sorted(allowed)}"
    if got in CLOSING_ERRORS:
        if b"close" not in [v.lower() for v in frame.values(b"connection")]:
            return f"{got} without Connection: close"
        if not result.closed or result.rest or len(result.frames) != index + 1:
            return f"{got} not followed by the end of the connection"
    if got is not None and got[0] == 503 and not frame.header(b"retry-after"):
        return "503 without Retry-After"
    return None


def handler_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    """``handler_failed`` records, and errors asyncio logged for exceptions out of callbacks."""
    return [
        f"{r.name}: {r.getMessage()} {r.exc_info[1]!r}" if r.exc_info else r.getMessage()
        for r in caplog.records
        if r.getMessage() == "handler_failed"
        or (r.name == "asyncio" and r.levelno >= logging.ERROR)
    ]


def rss_kib(field_name: str = "VmRSS") -> int:
    """This process's resident set (``VmRSS``) or its peak (``VmHWM``), in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field_name} in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+); False where the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# One sidecar between the app and the recording target

PROBE = b"GET /probe HTTP/1.1\r\nHost: app.test\r\n\r\n"


@dataclass
class Rig:
    sidecar: Any
    upstream: RecordingUpstream
    silent: RecordingUpstream
    tokens: dict[str, bytes]  # account -> access token
    caplog: pytest.LogCaptureFixture
    apps: list[AppConnection] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.sidecar.addresses["api"][1])

    def fill(self, data: bytes) -> bytes:
        return data.replace(SILENT, self.silent.authority)

    async def connect(self) -> AppConnection:
        app = await AppConnection.open(self.port)
        self.apps.append(app)
        return app

    async def exchange(self, data: bytes, frames: int | None = None) -> AppResult:
        app = await self.connect()
        await app.send(self.fill(data))
        return await app.read(frames)

    def problems(self) -> list[str]:
        """The invariants every case shares; an empty list when they all hold."""
        found: list[str] = []
        if self.silent.conns:
            found.append(f"the second target got {len(self.silent.conns)} connection(s)")
        for app in self.apps:
            for account, token in self.tokens.items():
                if token in app.raw:
                    found.append(f"the app received {account}'s token")
        received = self.upstream.received
        if SMUGGLED in received:
            found.append(
                "a request marked SMUGGLED reached the target (smuggled, or pipelined after a "
                "request that should have been refused)"
            )
        if b"x-sidecar-account" in received.lower():
            found.append("X-Sidecar-Account reached the target")
        found += [f"target could not parse: {e}" for e in self.upstream.protocol_errors]
        if FORGED in received:
            found.append("a credential the app sent in a trailer reached the target")
        for req in self.upstream.requests:
            if req.account not in self.tokens:
                found.append(f"request {req.index} to the target carried account {req.account}")
            if req.header_values(b"host") != [self.upstream.authority]:
                found.append(f"request {req.index} has Host {req.header_values(b'host')}")
        heads = [head for conn in self.upstream.conns for head in _heads(bytes(conn.data))]
        for account, token in self.tokens.items():
            # Each token only in the Authorization field of request heads (including heads of
            # requests whose body never finished), once per head, nowhere else.
            field_line = rb"(?im)^authorization: bearer %s\r$" % re.escape(token)
            carried = sum(bool(re.search(field_line, head)) for head in heads)
            if received.count(token) != carried:
                found.append(
                    f"{account}'s token appears {received.count(token)} times in the target's "
                    f"bytes, {carried} of them as a request's Authorization"
                )
        for head in heads:
            if len(re.findall(rb"(?im)^authorization:", head)) != 1:
                found.append(f"a head sent upstream without exactly one Authorization: {head!r}")
            if PROBE_TRAILER in head:
                found.append(f"a trailer field became a header: {head!r}")
            if re.search(rb"\r(?!\n)|(?<!\r)\n|\r\n[ \t]|\x00", head):
                found.append(f"bare CR/LF, obs-fold or NUL in a head sent upstream: {head!r}")
        found += [f"logged: {line}" for line in handler_failures(self.caplog)]
        return found

    def check(self) -> None:
        problems = self.problems()
        assert not problems, "\n".join(problems)

    async def close(self) -> None:
        for app in self.apps:
            app.close()


def _heads(data: bytes) -> list[bytes]:
    """The heads of the requests in one connection's bytes (as the target's parser saw them)."""
    heads = []
    pos = 0
    while (end := data.find(b"\r\n\r\n", pos)) >= 0:
        heads.append(data[pos : end + 4])
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", data[pos:end])
        if length:
            pos = end + 4 + int(length[1])
        elif re.search(rb"(?i)\r\ntransfer-encoding: *chunked", data[pos:end]):
            chunked = _skip_chunked(data, end + 4)
            if chunked is None:
                break
            pos = chunked
        else:
            pos = end + 4
    return heads


def _skip_chunked(data: bytes, pos: int) -> int | None:
    try:
        got = _dechunk(data, pos)
    except Malformed:
        return None
    return None if got is None else got[1]


async def probe_problem(rig: Rig, app: AppConnection, result: AppResult) -> str | None:
    """A connection left open must be in step: the next request gets its own answer next
    (closing quietly is fine too). Leftover bytes of the case must not become a request."""
    if result.closed or result.timed_out or result.malformed:
        return None
    if result.frames and result.frames[-1].closes:
        return None
    before = len(rig.upstream.requests)
    await app.send(PROBE, [b"GET"])
    after = await app.read(len(result.frames) + 1)
    new = rig.upstream.requests[before:]
    if len(after.frames) == len(result.frames) and after.closed and not after.rest and not new:
        return None
    if after.malformed or len(after.frames) <= len(result.frames):
        return f"after the case, a probe request got {after.describe()}"
    frame = after.frames[len(result.frames)]
    if [r.target for r in new] != [b"/probe"] or frame.body != answer_body(new[0]):
        return (
            f"the connection is out of step: the probe got {frame.describe()} "
            f"{frame.body[:80]!r}; the target got {[r.target for r in new]}"
        )
    return None
