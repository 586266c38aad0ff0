"""Refresh flights: at most one per account in this process, each its own task.

A flight runs as a task of its own and callers await it shielded, so a request that goes away
cannot cancel a refresh halfway through a rotation. Two kinds per account: a *waiting* flight
(for a request: it waits for the account's store lock) and a *trying* flight (background: it
only tries the lock). At shutdown the flights that have sent a token request are waited for
until their pairs are stored (``drain``); the rest start nothing new.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

from sidecar.errors import DecryptError, StoreError, TransientGrantError
from sidecar.metrics import Metrics
from sidecar.model import Credential
from sidecar.tasks import Tasks

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (provider, account)
DRAIN_WRITE_SECONDS = 5.0  # at shutdown, time allowed to store a pair after its answer
Tried = asyncio.Future[Credential | None]
StartWaiting = Callable[[Tried | None], Coroutine[Any, Any, Credential]]


class Flights:
    def __init__(self, tasks: Tasks, metrics: Metrics) -> None:
        self._tasks, self._metrics = tasks, metrics
        self._waiting: dict[Key, asyncio.Future[Credential]] = {}
        self._trying: dict[Key, Tried] = {}
        self._sending: set[Key] = set()  # token request sent, new pair not yet stored
        self._stopping = False

    def waiting(self, key: Key) -> bool:
        return key in self._waiting

    async def join(self, key: Key, start: StartWaiting) -> Credential:
        """Await the account's waiting flight, starting it (after any trying flight) if none."""
        flight = self._waiting.get(key)
        if flight is not None:
            self._metrics.coalesced.labels(key[0]).inc()
        else:
            after = self._trying.get(key)  # at most one flight of this process takes the lock
            flight = self._tasks.spawn(start(after), name=f"refresh {key[0]}")
            self._waiting[key] = flight
            flight.add_done_callback(lambda _: self._waiting.pop(key, None))
        return await asyncio.shield(flight)

    async def try_join(
        self, key: Key, start: Callable[[], Coroutine[Any, Any, Credential | None]]
    ) -> Credential | None:
        """Await the account's trying flight, starting it if none."""
        flight = self._trying.get(key)
        if flight is not None:
            self._metrics.coalesced.labels(key[0]).inc()
        else:
            flight = self._tasks.spawn(start(), name=f"refresh {key[0]}")
            self._trying[key] = flight
            flight.add_done_callback(lambda _: self._trying.pop(key, None))
        return await asyncio.shield(flight)

    @contextlib.contextmanager
    def sending(self, key: Key) -> Iterator[None]:
        """Around a token request and the write of its answer: what a shutdown waits for."""
        if self._stopping:  # nothing sent yet: leave it to the next process
            raise TransientGrantError("the sidecar is stopping")
        self._sending.add(key)
        try:
            yield
        finally:
            self._sending.discard(key)

    async def drain(self, call_timeout: float) -> int:
        """Start no more token requests; wait for those sent until their pairs are stored, at
        most ``call_timeout`` plus a write. Returns how many were still unfinished.

        Cancelling one instead would lose a rotation: the provider has rotated the refresh
        token, and the next process would present the old one (reuse: the account is dead).
        """
        self._stopping = True
        flights: list[tuple[Key, asyncio.Future[Any]]] = [
            *self._waiting.items(),
            *self._trying.items(),
        ]
        sent = {flight for key, flight in flights if key in self._sending}
        if not sent:
            return 0
        bound = call_timeout + DRAIN_WRITE_SECONDS
        log.info("refreshes_draining", extra={"in_flight": len(sent), "bound_seconds": bound})
        _, pending = await asyncio.wait(sent, timeout=bound)
        log.log(
            logging.WARNING if pending else logging.INFO,
            "refreshes_drained",
            extra={"stored": len(sent) - len(pending), "unfinished": len(pending)},
        )
        return len(pending)


@contextlib.contextmanager
def store_unavailable() -> Iterator[None]:
    """Store down: the refresh fails as transient, and a still-valid cached token keeps being
    served. A pair that cannot be decrypted is no outage and passes through."""
    try:
        yield
    except DecryptError:
        raise
    except StoreError as exc:
        raise TransientGrantError(f"token store unavailable: {exc}") from exc
