"""A message body on its way from one connection to another, with backpressure.

The producing protocol's ``data_received`` calls :meth:`BodyStream.feed`; past ``high_water``
buffered bytes it pauses that transport, and reading below it resumes the transport. So a
1 GiB upload or download holds a few hundred KiB in memory, whatever the speeds at each end.
"""

from __future__ import annotations

import asyncio
from collections import deque

HIGH_WATER = 256 * 1024


class BodyStream:
    __slots__ = ("_chunks", "_eof", "_exc", "_high", "_paused", "_size", "_transport", "_waiter")

    def __init__(self, transport: asyncio.Transport | None, high_water: int = HIGH_WATER) -> None:
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._transport = transport  # the producer, paused when too much is buffered
        self._paused = False
        self._high = high_water

    # The producer's side.

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._size += len(data)
        if self._size > self._high and self._transport is not None and not self._paused:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def feed_eof(self) -> None:
        """The whole body arrived; the producer's transport is no longer ours to pause."""
        self._eof = True
        self._detach()
        self._wake()

    def set_exception(self, exc: BaseException) -> None:
        if not self._eof:
            self._exc = exc
            self._detach()
            self._wake()

    # The consumer's side.

    @property
    def paused(self) -> bool:
        """True while the producer is paused because the consumer is behind."""
        return self._paused

    @property
    def complete(self) -> bool:
        """True once every byte has arrived (it may still be buffered here)."""
        return self._eof

    async def read(self) -> bytes:
        """Everything buffered (waiting for at least one byte); ``b""`` at the end."""
        while not self._chunks:
            if self._exc is not None:
                raise self._exc
            if self._eof:
                return b""
            await self._wait()
        return self.take()

    def take(self) -> bytes:
        """Everything buffered now, without waiting."""
        if self._exc is not None and not self._chunks:
            raise self._exc
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._size = 0
        self._resume()
        return data

    async def read_all(self, limit: int) -> bytes | None:
        """The whole body if it is at most ``limit`` bytes, else None (nothing consumed).

        Buffering is allowed up to the limit while deciding, so a body just under it does not
        stall on backpressure.
        """
        self._high = max(self._high, limit + 1)
        try:
            while not self._eof and self._size <= limit:
                if self._exc is not None:
                    raise self._exc
                await self._wait()
        finally:
            self._high = HIGH_WATER
        if self._size > limit:
            return None
        return await self.read()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        self._resume()  # never wait on a paused producer
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _resume(self) -> None:
        if self._paused and self._size <= self._high:
            self._paused = False
            if self._transport is not None:
                self._transport.resume_reading()

    def _detach(self) -> None:
        if self._paused and self._transport is not None:
            self._transport.resume_reading()
        self._paused = False
        self._transport = None


class WriteGate:
    """A transport's write side, paused and resumed by its protocol's flow control callbacks:
    writers wait at the gate while the peer reads slower than they write."""

    __slots__ = ("_drain", "_loop", "_paused")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._paused = False
        self._drain: asyncio.Future[None] | None = None

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        """Also called when the connection is lost, so no writer waits forever."""
        self._paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    async def wait(self) -> None:
        if self._paused:
            if self._drain is None:
                self._drain = self._loop.create_future()
            await self._drain
