"""Tells someone when an account needs re-authorization: a JSON POST to ``[notify] url``.

The body names provider, account, reason and time, never a token. Delivery is retried with
backoff in the background, so a slow receiver never holds up a refresh.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from sidecar.config import NotifyConfig
from sidecar.tasks import Tasks

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, session: aiohttp.ClientSession, cfg: NotifyConfig, tasks: Tasks) -> None:
        self._session, self._cfg, self._tasks = session, cfg, tasks

    def reauthorization_required(self, provider: str, account: str, reason: str, at: float) -> None:
        event = {
            "event": "reauthorization_required",
            "provider": provider,
            "account": account,
            "reason": reason,
            "time": at,
        }
        self._tasks.spawn(self._deliver(event), name="notify")

    async def _deliver(self, event: dict[str, object]) -> None:
        delay = self._cfg.retry_initial_seconds
        timeout = aiohttp.ClientTimeout(total=self._cfg.timeout_seconds)
        for attempt in range(1, self._cfg.attempts + 1):
            try:
                async with self._session.post(
                    self._cfg.url, json=event, timeout=timeout, allow_redirects=False
                ) as resp:
                    if resp.status < 300:
                        return
                    problem = f"HTTP {resp.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = type(exc).__name__
            log.warning(
                "notify_failed",
                extra={
                    "attempt": attempt,
                    "error": problem,
                    "provider": event["provider"],
                    "account": event["account"],
                },
            )
            if attempt < self._cfg.attempts:
                await asyncio.sleep(delay)
                delay *= 2
        log.error(
            "notify_gave_up", extra={"provider": event["provider"], "account": event["account"]}
        )
