"""The app side of the hostile-input harness: a raw socket, and a strict HTTP/1.1 framer for
what the sidecar sends back, so a malformed answer from the sidecar is caught too."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterable
from dataclasses import dataclass

from tests.hostile.target import DEADLINE

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


def dechunk(data: bytes, start: int) -> tuple[bytes, int] | None:
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
                got = dechunk(data, body_start)
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
