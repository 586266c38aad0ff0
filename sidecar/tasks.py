"""Background tasks with an owner: named, kept referenced, cancelled on shutdown.

A bare ``asyncio.create_task`` result that nobody holds can be garbage-collected mid-flight,
and nobody cancels it at shutdown; ``TaskGroup``-less code needs this small owner instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from sidecar.errors import SidecarError

log = logging.getLogger(__name__)
T = TypeVar("T")


class Tasks:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        # A SidecarError is an answer for whoever awaits the task, not a crash.
        if not task.cancelled() and not isinstance(task.exception(), SidecarError | None):
            log.error("task_failed", extra={"task": task.get_name()}, exc_info=task.exception())

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
