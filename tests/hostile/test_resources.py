"""Resources: limits enforced while reading, slow apps bounded in time, the pool never starved.

The sidecar runs in this process, so ``/proc/self/status`` measures it: the peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs`` first) while 16 MiB arrive must stay
within ``RSS_BUDGET`` of where it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc

import pytest

from tests.hostile.app import AppConnection, AppResult
from tests.hostile.conftest import MakeRig
from tests.hostile.harness import Rig, error_problem, reset_peak_rss, rss_kib
from tests.hostile.target import DEADLINE, Reply, UpRequest, answer

HOST = b"Host: app.test\r\n"
RSS_BUDGET_KIB = 20 * 1024
SIXTEEN_MIB = 16 * 1024 * 1024
TOO_LARGE = (431, "headers_too_large")
REQUEST_TIMEOUT = (408, "request_timeout")
BUSY = (503, "upstream_busy")


async def stream_until_refused(rig: Rig, prefix: bytes, total: int) -> tuple[AppResult, int]:
    """Send ``prefix`` then up to ``total`` filler bytes (never all in memory), reading
    concurrently; stop writing once the sidecar answers or stops reading."""
    app = await rig.connect()
    reading = asyncio.ensure_future(app.read(None, timeout=3 * DEADLINE))
    piece = b"a" * 65536
    sent = 0
    try:
        app.writer.write(prefix)
        while sent < total and not reading.done() and not app.raw:
            app.writer.write(piece)
            await asyncio.wait_for(app.writer.drain(), DEADLINE)
            sent += len(piece)
    except (ConnectionError, TimeoutError):
        pass
    return await reading, sent


@pytest.mark.parametrize(
    "prefix",
    [
        b"GET /x HTTP/1.1\r\n" + HOST + b"X-Big: ",
        b"GET /x HTTP/1.1\r\n" + HOST + b"X-Big-Name-Without-Colon",
        b"GET /",
    ],
    ids=["resource-16mib-value", "resource-16mib-name", "resource-16mib-target"],
)
async def test_sixteen_mib_without_a_line_end_gets_431_in_bounded_memory(
    make_rig: MakeRig, prefix: bytes
) -> None:
    rig = await make_rig()
    gc.collect()
    before = rss_kib()
    peak_known = reset_peak_rss()
    result, sent = await stream_until_refused(rig, prefix, SIXTEEN_MIB)
    peak = rss_kib("VmHWM") if peak_known else rss_kib()
    print(f"RSS {before // 1024} MiB before, peak {peak // 1024} MiB, after {sent} bytes sent")
    assert error_problem(result, 0, [TOO_LARGE]) is None, (
        f"{error_problem(result, 0, [TOO_LARGE])}: {result.describe()} after {sent} bytes"
    )
    assert peak - before < RSS_BUDGET_KIB, f"RSS grew by {(peak - before) // 1024} MiB"
    assert not rig.upstream.conns
    rig.check()


@pytest.mark.parametrize(
    "data",
    [
        b"GET /x HTTP/1.1\r\n" + HOST + b"X-Big: " + b"a" * 70_000,
        b"GET /x HTTP/1.1\r\n" + HOST + b"X" * 70_000,
        b"GET /" + b"a" * 70_000,
        b"GET /x HTTP/1.1\r\n" + HOST + b"X-A: b\r\n" * 9000,
    ],
    ids=[
        "resource-70k-value-stalled",
        "resource-70k-name-stalled",
        "resource-70k-target-stalled",
        "resource-70k-of-fields-stalled",
    ],
)
async def test_head_limit_holds_for_every_byte_read(make_rig: MakeRig, data: bytes) -> None:
    """Past 64 KiB the answer is 431 at once, without waiting for the line (or head) to end."""
    rig = await make_rig()
    result = await rig.exchange(data)
    assert error_problem(result, 0, [TOO_LARGE]) is None, result.describe()
    assert not rig.upstream.conns
    rig.check()


@pytest.mark.parametrize("count", [129, 200, 1000], ids=lambda n: f"resource-fields-{n}")
async def test_too_many_fields_get_431(make_rig: MakeRig, count: int) -> None:
    rig = await make_rig()
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(count))
    result = await rig.exchange(b"GET /x HTTP/1.1\r\n" + HOST + fields + b"\r\n")
    assert error_problem(result, 0, [TOO_LARGE]) is None, result.describe()
    assert not rig.upstream.conns
    rig.check()


async def test_fields_under_the_limit_are_forwarded(make_rig: MakeRig) -> None:
    rig = await make_rig()
    fields = b"".join(b"X-F%d: v\r\n" % i for i in range(100))
    result = await rig.exchange(b"GET /x HTTP/1.1\r\n" + HOST + fields + b"\r\n", 1)
    assert [(f.status, f.body) for f in result.frames] == [(200, b"answer:main:GET /x")]
    rig.check()


# ---------------------------------------------------------------------------------------------
# Slow apps

SLOW = {"client_body_timeout_seconds": 1, "client_header_timeout_seconds": 1}


def _hold_uploads(req: UpRequest) -> Reply:
    return answer(req)  # the target answers only complete requests; a stalled body never is


async def _released(rig: Rig) -> None:
    """The pool's only slot is free again: a plain GET is answered."""
    result = await rig.exchange(b"GET /after HTTP/1.1\r\n" + HOST + b"\r\n", 1)
    assert [(f.status, f.body) for f in result.frames] == [(200, b"answer:main:GET /after")], (
        f"after the slow app: {result.describe()}"
    )


@pytest.mark.parametrize(
    ("replay_limit", "partial"),
    [
        (
            1024,
            b"POST /upload HTTP/1.1\r\n" + HOST + b"Content-Length: 100000\r\n\r\n" + b"u" * 5000,
        ),
        (
            1024,
            b"POST /upload HTTP/1.1\r\n"
            + HOST
            + b"Transfer-Encoding: chunked\r\n\r\n2000\r\n"
            + b"u" * 4096,
        ),
        (
            1024 * 1024,
            b"POST /upload HTTP/1.1\r\n" + HOST + b"Content-Length: 100\r\n\r\n" + b"u" * 10,
        ),
    ],
    ids=[
        "resource-slow-body-streamed",
        "resource-slow-chunk-streamed",
        "resource-slow-body-buffered",
    ],
)
async def test_a_stalled_upload_gets_408_and_releases_the_upstream(
    make_rig: MakeRig, replay_limit: int, partial: bytes
) -> None:
    rig = await make_rig(
        _hold_uploads,
        replay_limit_bytes=replay_limit,
        max_connections=1,
        pool_wait_seconds=1,
        **SLOW,
    )
    app = await rig.connect()
    await app.send(partial)
    result = await app.read(None)  # until the sidecar closes: 408 first, unless it had answered
    if result.frames:
        assert error_problem(result, 0, [REQUEST_TIMEOUT]) is None, result.describe()
    assert result.closed, f"the stalled app's connection stayed open: {result.describe()}"
    assert await rig.upstream.wait(lambda: all(c.closed for c in rig.upstream.conns))
    assert not rig.upstream.requests  # no complete request ever reached the target
    await _released(rig)
    rig.check()


async def test_a_stalled_head_gets_408_or_a_close(make_rig: MakeRig) -> None:
    rig = await make_rig(**SLOW)
    result = await rig.exchange(b"GET /x HTTP/1.1\r\n" + HOST + b"X-Half: ")
    assert result.closed and not result.timed_out, result.describe()
    if result.raw:
        assert error_problem(result, 0, [REQUEST_TIMEOUT]) is None, result.describe()
    assert not rig.upstream.conns
    rig.check()


# ---------------------------------------------------------------------------------------------
# Pool exhaustion


async def test_an_exhausted_pool_answers_503_with_retry_after(make_rig: MakeRig) -> None:
    """Two stalled streaming uploads hold both connections; a third request waits at most
    ``pool_wait_seconds`` and gets 503 ``upstream_busy``, never hangs."""
    rig = await make_rig(max_connections=2, pool_wait_seconds=1, replay_limit_bytes=1024)
    uploads: list[AppConnection] = []
    for n in range(2):
        app = await rig.connect()
        head = b"POST /upload-%d HTTP/1.1\r\n%sContent-Length: 1000000\r\n\r\n" % (n, HOST)
        await app.send(head + b"u" * 8192)
        uploads.append(app)
    assert await rig.upstream.wait(
        lambda: len(rig.upstream.conns) == 2 and all(len(c.data) > 4096 for c in rig.upstream.conns)
    ), "the two uploads did not both reach the target"
    loop = asyncio.get_running_loop()
    start = loop.time()
    result = await rig.exchange(b"GET /third HTTP/1.1\r\n" + HOST + b"\r\n", 1)
    waited = loop.time() - start
    assert error_problem(result, 0, [BUSY]) is None, result.describe()
    assert 0.5 < waited < 4, f"answered after {waited:.2f}s with pool_wait_seconds = 1"
    assert len(rig.upstream.conns) == 2
    for app in uploads:
        app.abort()
    assert await rig.upstream.wait(lambda: all(c.closed for c in rig.upstream.conns))
    await _released(rig)
    rig.check()


def _hold_slow(req: UpRequest) -> Reply:
    return Reply(b"", "hold") if req.target == b"/slow" else answer(req)


@pytest.mark.parametrize(
    ("replay_limit", "data"),
    [
        (1024, b"POST /slow HTTP/1.1\r\n" + HOST + b"Content-Length: 100000\r\n\r\n" + b"u" * 5000),
        (1024 * 1024, b"POST /slow HTTP/1.1\r\n" + HOST + b"Content-Length: 100\r\n\r\nuuu"),
        (1024 * 1024, b"POST /slow HTTP/1.1\r\n" + HOST + b"Content-Length: 3\r\n\r\nuuu"),
        (
            1024,
            b"POST /slow HTTP/1.1\r\n"
            + HOST
            + b"Transfer-Encoding: chunked\r\n\r\n800\r\n"
            + b"u" * 2048
            + b"\r\n",
        ),
    ],
    ids=[
        "resource-app-leaves-mid-upload-streamed",
        "resource-app-leaves-mid-upload-buffered",
        "resource-app-leaves-awaiting-answer",
        "resource-app-leaves-mid-chunks",
    ],
)
async def test_an_app_that_leaves_releases_everything_quietly(
    make_rig: MakeRig, replay_limit: int, data: bytes
) -> None:
    """No ``handler_failed``; the target connection it held is closed (as nginx does without
    ``proxy_ignore_client_abort``), so its pool slot is free for the next request."""
    rig = await make_rig(
        _hold_slow, replay_limit_bytes=replay_limit, max_connections=1, pool_wait_seconds=1
    )
    app = await rig.connect()
    await app.send(data)
    if b"Content-Length: 3\r\n" in data:
        assert await rig.upstream.wait(lambda: bool(rig.upstream.requests))
    elif replay_limit == 1024:
        assert await rig.upstream.wait(lambda: bool(rig.upstream.conns))
    app.abort()
    assert await rig.upstream.wait(lambda: all(c.closed for c in rig.upstream.conns)), (
        "the target connection of an app that left stayed open"
    )
    await _released(rig)
    with contextlib.suppress(Exception):
        app.close()
    rig.check()
