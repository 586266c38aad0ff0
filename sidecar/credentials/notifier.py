"""Tells someone when an account needs re-authorization: a JSON POST to ``[notify] url``.

The body names provider, account, reason and time, never a token. Delivery is retried with
backoff in the background, so a slow receiver never holds up a refresh.
"""

from __future__ import annotations

import asyncio
import json
import logging

from sidecar.config import NotifyConfig
from sidecar.http.client import HttpClient, UpstreamError
from sidecar.tasks import Tasks

log = logging.getLogger(__name__)
JSON_HEADERS = {"Content-Type": "application/json"}


class Notifier:
    def __init__(self, http: HttpClient, cfg: NotifyConfig, tasks: Tasks) -> None:
        self._http, self._cfg, self._tasks = http, cfg, tasks

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
        body = json.dumps(event).encode()
        for attempt in range(1, self._cfg.attempts + 1):
            try:
                reply = await self._http.post(
                    self._cfg.url, body, JSON_HEADERS, self._cfg.timeout_seconds
                )
                if reply.status < 300:
                    return
                problem = f"HTTP {reply.status}"
            except (UpstreamError, TimeoutError) as exc:
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
