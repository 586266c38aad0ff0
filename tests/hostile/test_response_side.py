"""Response side: a broken or hostile target, and the rule that keeps apps apart.

An upstream connection goes back to the pool only when its response ended exactly where the
framing says, with no unread byte; anything else closes it. Each case: app 1 (account main)
sends ``GET /first``, the target answers with the case's bytes; then app 2 (account other)
sends ``GET /second`` on its own connection. App 1 gets its own answer or a 502 (or, where
the answer had started, a cut connection), never app 2's bytes; app 2 gets exactly its own
answer; ``/second`` arrives on the same target connection only when reuse was clean. App 1's
connection, if still open, must then answer a probe request in step.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.hostile.app import AppResult
from tests.hostile.conftest import MakeRig
from tests.hostile.harness import Rig, probe_problem, sidecar_error
from tests.hostile.target import Reply, Script, UpRequest, answer, answer_body, by_path

UNAVAILABLE = (502, "upstream_unavailable")
TIMEOUT = (504, "upstream_timeout")
HOST = b"Host: app.test\r\n"
SECOND = b"GET /second HTTP/1.1\r\n" + HOST + b"X-Sidecar-Account: other\r\n\r\n"
INJECTED = b"INJECTED"  # in bytes the target sends beyond its answer: never reaches an app
# Response cases run with a short read timeout, so that a sidecar waiting for bytes that will
# never come fails in seconds (504 is not an accepted outcome where 502 is expected).
READ_TIMEOUT = 2


@dataclass(frozen=True)
class RespCase:
    id: str
    reply: bytes  # what the target writes for /first
    then: str = "keep"  # then: keep the connection open, or close it
    method: bytes = b"GET"
    own: tuple[int, bytes] | None = None  # the answer app 1 may get relayed (status, body)
    errors: frozenset[tuple[int, str]] = frozenset({UNAVAILABLE})
    partial_ok: bool = False  # the relay had started: a cut connection is a right answer
    reusable: bool | None = False  # True: must be reused; False: must not; None: either
    note: str = ""


def ok(body: bytes, *fields: bytes) -> bytes:
    length = b"Content-Length: %d\r\n\r\n" % len(body)
    return b"HTTP/1.1 200 OK\r\n" + b"".join(fields) + length + body


def chunked(body: bytes, *fields: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\n"
        + b"".join(fields)
        + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    )


REAL = b"the real answer"
FULL_200 = ok(INJECTED + b"-" * 992)  # Content-Length: 1000
EXTRAS = [
    ("full-200", FULL_200),
    ("204-then-200", b"HTTP/1.1 204 No Content\r\n\r\n" + FULL_200),
    ("200-head-only", b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"),
    ("garbage", b"garbage " + INJECTED + b"\r\n"),
    ("chunked-200", chunked(INJECTED)),
    ("304-head", b"HTTP/1.1 304 Not Modified\r\nX-Injected: 1\r\n\r\n"),
    ("interim-100", b"HTTP/1.1 100 Continue\r\n\r\n"),
    ("one-byte", b"X"),
    ("crlf-then-byte", b"\r\nX"),
    ("http10-200", b"HTTP/1.0 200 OK\r\nContent-Length: 8\r\n\r\n" + INJECTED),
]


def extra_cases() -> Iterator[RespCase]:
    """A complete answer followed by more bytes in the same write."""
    for framing, real in (("cl", ok(REAL)), ("chunked", chunked(REAL))):
        for name, extra in EXTRAS:
            yield RespCase(f"response-extra-{framing}-{name}", real + extra, own=(200, REAL))
        # llhttp skips empty lines between messages (CR/LF only), so such trailing bytes
        # leave the connection looking clean: a known limit, reuse is allowed either way.
        for n, extra in enumerate((b"\r\n", b"\r\n\r\n", b"\n"), 1):
            yield RespCase(
                f"response-extra-{framing}-crlf-{n:02d}",
                real + extra,
                own=(200, REAL),
                reusable=None,
                note="known limit: llhttp skips CR/LF between messages",
            )


def no_body_cases() -> Iterator[RespCase]:
    """204 and 304 end at their head (RFC 9112 §6.3): a body after it is unread bytes."""
    for status in (b"204 No Content", b"304 Not Modified"):
        code = int(status[:3])
        bodies = [
            ("cl", b"Content-Length: 5\r\n\r\nhello"),
            ("chunked", b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
            ("raw", b"\r\nhello"),
        ]
        for name, rest in bodies:
            yield RespCase(
                f"response-nobody-{code}-{name}",
                b"HTTP/1.1 " + status + b"\r\n" + rest,
                own=(code, b""),
            )
    yield RespCase(
        "response-nobody-204-clean",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        own=(204, b""),
        reusable=True,
    )
    yield RespCase(
        "response-nobody-304-length",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
        own=(304, b""),
        reusable=True,
        note="a 304's Content-Length describes the representation: no body follows",
    )
    for n, interim in enumerate((b"100 Continue", b"102 Processing", b"103 Early Hints"), 1):
        yield RespCase(
            f"response-interim-{n:02d}",
            b"HTTP/1.1 " + interim + b"\r\n\r\n" + ok(REAL),
            own=(200, REAL),
            reusable=True,
            note="an interim answer before the final one is not an extra response",
        )


def head_cases() -> Iterator[RespCase]:
    """A HEAD answer has no body, whatever its framing fields say (RFC 9110 §9.3.2)."""
    items = [
        ("cl-body", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", False),
        ("chunked-body", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", False),
        ("cl-clean", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", True),
        ("chunked-clean", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", True),
        ("body-and-response", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + FULL_200, False),
    ]
    for name, reply, clean in items:
        yield RespCase(
            f"response-head-{name}", reply, method=b"HEAD", own=(200, b""), reusable=clean
        )


def upgrade_cases() -> Iterator[RespCase]:
    """No request asks for an upgrade (the sidecar drops Upgrade): a 101 is a protocol error."""
    switching = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    items = [
        ("keep", switching + b"\r\n", "keep"),
        ("close", switching + b"\r\n", "close"),
        ("tunnel-bytes", switching + b"\r\n" + INJECTED + b" tunnel bytes", "keep"),
        ("h2c", b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n\x00\x00\x00", "keep"),
    ]
    for name, reply, then in items:
        yield RespCase(f"response-101-{name}", reply, then=then)


def status_line_cases() -> Iterator[RespCase]:
    lines = [
        b"HTTP/1.1 2000 OK",
        b"HTTP/1.1 20 OK",
        b"HTTP/9.9 200 OK",
        b"HTTP/1.1 -200 OK",
        b"FOO",
        b"ICY 200 OK",
        b"HTTP/1.1 200 OK\x00",
        b"HTTP/1.1 abc OK",
        b"http/1.1 200 OK",
        b"HTTP/1.1 099 X",
        b"\x16\x03\x01\x00\xa5",
        b"HTTP/2 200",
        b" HTTP/1.1 200 OK",
    ]
    for n, line in enumerate(lines, 1):
        yield RespCase(
            f"response-status-{n:02d}",
            line + b"\r\nContent-Length: 2\r\n\r\nok",
            note=f"status line {line!r}",
        )
    yield RespCase(
        "response-status-http10",
        b"HTTP/1.0 200 OK\r\nContent-Length: 4\r\n\r\nok10",
        own=(200, b"ok10"),
        note="an HTTP/1.0 answer without keep-alive: the connection is not reused",
    )
    yield RespCase("response-status-empty-close", b"", then="close", note="closed without a byte")


def header_cases() -> Iterator[RespCase]:
    """Malformed header fields: refused (502), or repaired where RFC 9112 lets a proxy."""
    refused = [
        b"Bad Header",
        b"X-A: a\x00b",
        b"X-A: a\rb",
        b": empty-name",
        b"X\x01A: v",
        b"X A: v",
        b"Content-Length: 2\r\nContent-Length: 3",
        b"Content-Length: -1",
        b"Content-Length: abc",
        b"Content-Length: 1e2",
        b"Content-Length: 99999999999999999999999",
    ]
    for n, field in enumerate(refused, 1):
        reply = b"HTTP/1.1 200 OK\r\n" + field + b"\r\nContent-Length: 2\r\n\r\nok"
        if field.startswith(b"Content-Length"):
            reply = b"HTTP/1.1 200 OK\r\n" + field + b"\r\n\r\nok"
        yield RespCase(f"response-header-{n:02d}", reply, note=f"field {field!r}")
    # RFC 9112 §5.1/§5.2: a proxy MUST remove whitespace before the colon, and may replace
    # obs-fold with SP; refusing (502) is also correct. A bare LF may end a line (§2.2).
    repaired = [
        b"X-A : v\r\nContent-Length: 2\r\n\r\nok",
        b"X-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
        b"X-A: v\nContent-Length: 2\r\n\r\nok",
        b"Content-Length: 2\r\nContent-Length: 2\r\n\r\nok",
        b"Content-Length: 2, 2\r\n\r\nok",
    ]
    for n, rest in enumerate(repaired, len(refused) + 1):
        yield RespCase(
            f"response-header-{n:02d}",
            b"HTTP/1.1 200 OK\r\n" + rest,
            own=(200, b"ok"),
            reusable=None,
            note=f"repairable {rest[:30]!r}",
        )
    for n, (rest, body) in enumerate(
        [
            (b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", b"ok"),
            (b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n2\r\nok\r\n0\r\n\r\n", b"ok"),
        ],
        1,
    ):
        yield RespCase(
            f"response-clte-{n:02d}",
            b"HTTP/1.1 200 OK\r\n" + rest,
            own=(200, body),
            note="CL+TE (RFC 9112 §6.3): 502, or chunked with CL removed and no reuse",
        )


def chunk_cases() -> Iterator[RespCase]:
    """Malformed chunked bodies from the target: 502, or a cut app connection."""
    bodies = [
        b"zz\r\nhello\r\n0\r\n\r\n",
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"fffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhelloXX0\r\n\r\n",
        b"5\r\nhellohello\r\n0\r\n\r\n",
        b"3\r\nhello\r\n0\r\n\r\n",
        b"5;a=\x00\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhello\r\n0\r\nbad trailer\r\n\r\n",
        b"5\r\nhello\r\n0\r\nX: \x00\r\n\r\n",
        b"\r\nhello\r\n0\r\n\r\n",
        b"5\rhello\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"5 5\r\nhello\r\n0\r\n\r\n",
    ]
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    for n, body in enumerate(bodies, 1):
        yield RespCase(
            f"response-chunk-{n:02d}", head + body, partial_ok=True, note=f"chunks {body!r}"
        )
    # llhttp skips an empty chunk-extension name (";=x", not allowed by RFC 9112 §7.1.1) like
    # any extension: the framing is unambiguous, so relaying "hello" and reusing is as safe
    # as a 502.
    yield RespCase(
        "response-chunk-empty-ext-name",
        head + b"5;=x\r\nhello\r\n0\r\n\r\n",
        own=(200, b"hello"),
        partial_ok=True,
        reusable=None,
        note="empty chunk-extension name",
    )
    yield RespCase(
        "response-chunk-xchunked",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\nsome bytes",
        then="close",
        own=(200, b"some bytes"),
        partial_ok=True,
        note="chunked not final (RFC 9112 §6.3): read until close, or refuse",
    )


def big_head_cases() -> Iterator[RespCase]:
    """A response head over 64 KiB: 502, whatever carries the size."""
    big = b"a" * 70_000
    heads = [
        b"HTTP/1.1 200 OK\r\nX-Big: " + big + b"\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\n"
        + (b"X-Many: " + b"v" * 400 + b"\r\n") * 200
        + b"Content-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 " + big + b"\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\n" + b"X-" + big + b": v\r\nContent-Length: 2\r\n\r\nok",
    ]
    for n, reply in enumerate(heads, 1):
        yield RespCase(f"response-bighead-{n:02d}", reply)
    yield RespCase(
        "response-bighead-under",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 60_000 + b"\r\nContent-Length: 2\r\n\r\nok",
        own=(200, b"ok"),
        reusable=True,
        note="a 60 KB head is within the limit",
    )


def cut_cases() -> Iterator[RespCase]:
    """The target closes mid-answer: the app's connection ends without a complete frame."""
    replies = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Len",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n",
    ]
    for n, reply in enumerate(replies, 1):
        yield RespCase(
            f"response-cut-{n:02d}", reply, then="close", partial_ok=True, note=f"{reply!r}"
        )


CASES = [
    *extra_cases(),
    *no_body_cases(),
    *head_cases(),
    *upgrade_cases(),
    *status_line_cases(),
    *header_cases(),
    *chunk_cases(),
    *big_head_cases(),
    *cut_cases(),
]


def first_problem(case: RespCase, result: AppResult) -> str | None:
    """Why app 1's answer is wrong: not its own, not an accepted error, not a clean cut."""
    if INJECTED in result.raw or b"answer:other" in result.raw:
        return f"app 1 got bytes that were not its answer: {result.raw[:200]!r}"
    if result.malformed:
        return f"malformed answer: {result.malformed}"
    if not result.frames:
        if case.partial_ok and result.closed and result.rest.startswith(b"HTTP/1.1 "):
            return None
        return f"no complete answer: {result.describe()}"
    frame = result.frames[0]
    error = sidecar_error(frame)
    if error is not None:
        if error not in case.errors:
            return f"got {error}, expected one of {sorted(case.errors)} or its own answer"
    elif case.own is None:
        return f"relayed {frame.describe()} {frame.body[:60]!r}; only a sidecar error is right"
    elif (frame.status, frame.body) != case.own:
        return f"relayed {frame.describe()} {frame.body[:60]!r}, expected {case.own}"
    if len(result.frames) > 1 or result.rest:
        return f"more than one answer: {result.describe()}"
    return None


async def reuse_problem(case: RespCase, rig: Rig) -> str | None:
    first = [r for r in rig.upstream.requests if r.target == b"/first"]
    second = [r for r in rig.upstream.requests if r.target == b"/second"]
    if not first or len(second) != 1:
        return f"the target got /first x{len(first)}, /second x{len(second)}"
    old, new = first[-1].conn, second[0].conn
    if case.reusable is True and new != old:
        return "a clean connection was not reused"
    if case.reusable is False:
        if new == old:
            return "/second was sent on the connection /first left dirty"
        if not await rig.upstream.wait(lambda: rig.upstream.conns[old].closed):
            return "the dirty connection was left open"
    return None


async def run_response_case(rig: Rig, case: RespCase) -> list[str]:
    problems = []
    app1 = await rig.connect()
    await app1.send(b"%s /first HTTP/1.1\r\n%s\r\n" % (case.method, HOST))
    result1 = await app1.read(1)
    if problem := first_problem(case, result1):
        problems.append(f"app 1: {problem}")
    app2 = await rig.connect()
    await app2.send(SECOND)
    result2 = await app2.read(1)
    answers = [f.body for f in result2.frames]
    second = [r for r in rig.upstream.requests if r.target == b"/second"]
    if not second or answers != [answer_body(second[0])] or result2.frames[0].status != 200:
        problems.append(f"app 2 did not get its own answer: {result2.describe()} {answers}")
    elif INJECTED in result2.raw or b"answer:main" in result2.raw:
        problems.append("app 2 got bytes that were not its answer")
    if problem := await reuse_problem(case, rig):
        problems.append(problem)
    if not problems and (problem := await probe_problem(rig, app1, result1)):
        problems.append(f"app 1 after the case: {problem}")
    return problems + rig.problems()


def _script(case: RespCase) -> Script:
    return by_path({b"/first": Reply(case.reply, case.then)})


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
async def test_response_side(make_rig: MakeRig, case: RespCase) -> None:
    rig = await make_rig(_script(case), read_timeout_seconds=READ_TIMEOUT)
    problems = await run_response_case(rig, case)
    assert not problems, f"{case.id} ({case.note}):\n" + "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# Bytes on an idle pooled connection

IDLE_PUSHES = [
    ("full-200", FULL_200, False),
    ("garbage", b"garbage " + INJECTED, False),
    ("408-then-close", b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n\r\n", True),
    ("one-byte", b"X", False),
    ("204-head", b"HTTP/1.1 204 No Content\r\n\r\n", False),
]


@pytest.mark.parametrize(
    ("push", "close"),
    [(p, c) for _, p, c in IDLE_PUSHES],
    ids=[f"response-idle-{n}" for n, *_ in IDLE_PUSHES],
)
async def test_bytes_on_an_idle_pooled_connection_close_it(
    make_rig: MakeRig, push: bytes, close: bool
) -> None:
    """A pooled connection that receives a byte while idle is closed (there is no request
    for that byte to answer); the next request opens a fresh connection."""
    rig = await make_rig()
    first = await rig.exchange(b"GET /first HTTP/1.1\r\n" + HOST + b"\r\n", 1)
    assert [f.status for f in first.frames] == [200]
    conn = rig.upstream.conns[0]
    conn.push(push)
    if close:
        conn.writer.close()
    assert await rig.upstream.wait(lambda: conn.closed), "the idle connection was left open"
    second = await rig.exchange(SECOND, 1)
    assert [f.body for f in second.frames] == [b"answer:other:GET /second"], second.describe()
    assert [r.conn for r in rig.upstream.requests] == [0, 1]
    rig.check()


# ---------------------------------------------------------------------------------------------
# Incidents never stop the listener


def _incident(reply: bytes, then: str = "keep") -> Script:
    def script(req: UpRequest) -> Reply:
        if req.target.startswith(b"/incident"):
            return Reply(reply, then)
        return answer(req)

    return script


INCIDENTS = {
    "extra-response": ok(REAL) + FULL_200,
    "204-with-body": b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello",
    "garbage-after": ok(REAL) + b"garbage",
    "101": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
    "bad-status": b"HTTP/1.1 2000 OK\r\n\r\n",
    "bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "cut-short": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial",
}


@pytest.mark.parametrize(
    "reply", list(INCIDENTS.values()), ids=[f"response-incidents-{k}" for k in INCIDENTS]
)
async def test_repeated_incidents_never_stop_the_listener(make_rig: MakeRig, reply: bytes) -> None:
    """With ``max_connections = 2``, ten broken answers in a row leak no pool slot."""
    then = "close" if reply.endswith(b"partial") else "keep"
    rig = await make_rig(
        _incident(reply, then), max_connections=2, read_timeout_seconds=READ_TIMEOUT
    )
    for n in range(10):
        result = await rig.exchange(b"GET /incident-%d HTTP/1.1\r\n%s\r\n" % (n, HOST), 1)
        assert result.frames or result.closed, f"incident {n}: {result.describe()}"
        assert INJECTED not in result.raw
    final = await rig.exchange(b"GET /final HTTP/1.1\r\n" + HOST + b"\r\n", 1)
    assert [(f.status, f.body) for f in final.frames] == [(200, b"answer:main:GET /final")], (
        final.describe()
    )
    rig.check()
