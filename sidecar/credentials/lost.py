"""Token answers that were lost: the request reached the provider, its answer never came back.

The provider may have rotated the refresh token already. The only safe move is to present the
same refresh token again, never an invented one: a provider with a reuse grace period (or
leeway) answers it again with a pair, one without treats it as reuse, revokes the family, and
the account needs re-authorization. Every loss is logged (``token_answer_lost``, naming the
account and the cause) and counted (``sidecar_token_answers_lost_total``), so an operator can
tell a lost answer from any other reason an account died.

A refresh recorded as sent by another process (``refresh_attempt_at`` on the row, not ours)
may have a new pair waiting to be written: its holder lost the store, not the answer. Its
refresh token is left alone for ``unconcluded_refresh_wait_seconds`` after it was sent, so the
holder can write the pair when the store is back; only then is it presented again, as a lost
answer. (A provider with a reuse grace period forgives presenting it sooner: set the wait
below the grace.)

Causes: ``timeout`` (no answer within ``timeout_seconds``), ``connection_lost`` (the
connection broke after the request was sent), ``unconcluded_refresh`` (a refresh was recorded
as sent and never concluded: a process died during it, here or in another replica).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from sidecar.config import ProviderConfig
from sidecar.errors import TransientGrantError
from sidecar.metrics import Metrics
from sidecar.model import Clock, Credential, TokenState

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (provider, account)
UNCONCLUDED = "unconcluded_refresh"


class LostAnswers:
    """Losses in a row, per account, until the provider answers it again."""

    def __init__(
        self, providers: Mapping[str, ProviderConfig], metrics: Metrics, clock: Clock
    ) -> None:
        self._providers, self._metrics, self._clock = providers, metrics, clock
        self._lost: dict[Key, int] = {}
        self._pending: dict[Key, float] = {}  # the stored row's unconcluded refresh: sent at
        self._own: dict[Key, float] = {}  # refreshes this process recorded as sent

    def lost(self, cred: Credential, cause: str) -> bool:
        """Record a lost answer; True when the account is to be given up: after
        ``lost_refresh_max_attempts`` losses in a row with its access token expired."""
        key = (cred.provider, cred.account)
        self._lost[key] = self._lost.get(key, 0) + 1
        self._record(key, cause)
        expired = cred.token.state(self._clock(), 0) is TokenState.INVALID
        if self._lost[key] >= self._providers[cred.provider].lost_refresh_max_attempts and expired:
            del self._lost[key]
            return True
        return False

    def seen(self, provider: str, account: str, sent_at: float | None) -> None:
        """What the stored row says: when a refresh was sent and not concluded (None: none)."""
        if sent_at is None:
            self._pending.pop((provider, account), None)
        else:
            self._pending[(provider, account)] = sent_at

    def sent(self, provider: str, account: str, at: float) -> None:
        self._own[(provider, account)] = at

    def check(self, provider: str, account: str) -> None:
        """Before presenting the refresh token: raise TransientGrantError while another
        process's unconcluded refresh may still be written by its holder."""
        key = (provider, account)
        sent_at = self._pending.get(key)
        if sent_at is None or self._own.get(key) == sent_at:
            return
        wait = sent_at + self._providers[provider].unconcluded_refresh_wait_seconds - self._clock()
        if wait > 0:
            raise TransientGrantError(
                "another process's refresh of this account is unconcluded: waiting for its "
                "pair to be stored",
                retry_after=wait,
            )
        if key not in self._lost:  # its holder is gone: the answer is lost
            self._lost[key] = 1
            self._record(key, UNCONCLUDED, sent_at=sent_at)

    def answered(self, provider: str, account: str) -> bool:
        """The provider answered this account; True when answers had been lost before it."""
        return bool(self._lost.pop((provider, account), 0))

    def forget(self, provider: str, account: str) -> None:
        for held in (self._lost, self._pending, self._own):
            held.pop((provider, account), None)

    def _record(self, key: Key, cause: str, **extra: float) -> None:
        self._metrics.answers_lost.labels(key[0], cause).inc()
        log.warning(
            "token_answer_lost",
            extra={
                "provider": key[0],
                "account": key[1],
                "cause": cause,
                "in_a_row": self._lost[key],
                "next": "the same refresh token is presented again",
                **extra,
            },
        )
