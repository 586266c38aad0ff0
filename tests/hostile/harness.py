"""The hostile-input harness: every assertion is about bytes that crossed a socket.

- ``RecordingUpstream`` (target.py): the target, a raw asyncio server that records every byte
  of every connection and answers with a script the test gives (raw bytes per request, then
  keep the connection, close it, or hold it without answering). Its requests are split with llhttp
  only to know when to answer and what to compare; the checks also look at the raw bytes.
- A second ``RecordingUpstream`` plays a host the app names (absolute-form, Host, CONNECT):
  it must never receive a connection, let alone a byte.
- ``AppConnection`` (app.py): the app's side, a raw socket; ``frame_responses`` splits what the
  sidecar sent back into responses by the HTTP/1.1 framing rules, strictly, so a malformed
  answer from the sidecar is caught too.
- ``Rig`` (here) ties them to one sidecar (started with the shared ``make_sidecar`` fixture, two
  seeded accounts) and checks the invariants every case shares.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.hostile.app import AppConnection, AppResult, Frame, Malformed, dechunk
from tests.hostile.target import RecordingUpstream, answer_body

SILENT = b"{silent}"  # replaced by the silent target's host:port in case bytes
SMUGGLED = b"SMUGGLED"  # marks a request that must never reach the target
FORGED = b"trailer-forged-token"  # an Authorization value an app sends in a chunked trailer
PROBE_TRAILER = b"trailer-probe-value"  # a trailer value that must never be in a head

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
        got = dechunk(data, pos)
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
