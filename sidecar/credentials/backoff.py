"""Backing off after transient token endpoint failures: per account, and per provider.

An account whose refresh failed waits before its next call: exponential, with jitter, and the
provider's ``Retry-After`` as a floor. A provider that fails ``PROVIDER_TRIP_FAILURES`` times
in a row is *tripped*: then one call at a time goes to it, at most once per
``recovery_probe_seconds`` (whichever account's refresh comes first is the probe), and other
refreshes that arrive while a probe is out wait for its answer instead of failing at once.
When the provider answers (a token, or a definite refusal such as ``invalid_grant``), every
account's backoff is released. So an outage costs the provider one call per interval however
many accounts wait, and once it answers again, waiting traffic recovers within one interval,
not after the longest backoff any account has grown (up to ``backoff_max_seconds``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass

from sidecar.config import ProviderConfig
from sidecar.errors import TransientGrantError
from sidecar.model import Clock

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (provider, account)
PROVIDER_TRIP_FAILURES = 3  # failures in a row before the provider is probed, not called


@dataclass(slots=True)
class Backoff:
    failures: int
    retry_at: float


class Backoffs:
    def __init__(
        self, providers: Mapping[str, ProviderConfig], clock: Clock, rng: random.Random
    ) -> None:
        self._cfg, self._clock, self._rng = providers, clock, rng
        self._accounts: dict[Key, Backoff] = {}
        self._providers: dict[str, Backoff] = {}  # failures in a row; tripped: next probe time
        self._probes: dict[str, asyncio.Future[None]] = {}  # the probe out to a provider

    def retry_at(self, provider: str, account: str) -> float | None:
        """When a refresh of this account may next call the provider (None: it may now)."""
        trip = self._tripped(provider)
        if trip is not None:  # the next probe may be anyone's, and its success frees all
            return trip.retry_at
        own = self._accounts.get((provider, account))
        return own.retry_at if own else None

    def tripped(self, provider: str) -> bool:
        return self._tripped(provider) is not None

    async def admit(self, provider: str, account: str) -> asyncio.Future[None] | None:
        """Raise TransientGrantError unless this refresh may call the provider now.

        Waits first for a probe that is out (bounded by the provider's timeout): its answer
        decides. A call admitted to a tripped provider is the next probe: it is returned, and
        must be passed to ``settle`` however the call ends.
        """
        probe = self._probes.get(provider)
        if probe is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(probe), self._cfg[provider].timeout_seconds)
        now = self._clock()
        retry_at = self.retry_at(provider, account)
        if (retry_at is not None and now < retry_at) or provider in self._probes:
            raise TransientGrantError("backing off after an earlier failure")
        trip = self._tripped(provider)
        if trip is None:
            return None
        trip.retry_at = now + self._cfg[provider].recovery_probe_seconds
        probe = self._probes[provider] = asyncio.get_running_loop().create_future()
        return probe

    def settle(self, provider: str, probe: asyncio.Future[None] | None) -> None:
        """The probe's call is over (answered, failed or abandoned): wake who waits on it."""
        if probe is None:
            return
        if self._probes.get(provider) is probe:
            del self._probes[provider]
        if not probe.done():
            probe.set_result(None)

    def failed(self, provider: str, account: str, exc: TransientGrantError) -> None:
        """Back off the account, and trip the provider when it keeps failing."""
        cfg = self._cfg[provider]
        now = self._clock()
        own = self._accounts.get((provider, account))
        failures = own.failures + 1 if own else 1
        delay = self._delay(cfg, failures, exc.retry_after)
        self._accounts[(provider, account)] = Backoff(failures, now + delay)
        log.warning(
            "token_refresh_failed",
            extra={
                "provider": provider,
                "account": account,
                "reason": exc.reason,
                "outcome_unknown": exc.outcome_unknown,
                "retry_in_seconds": round(delay, 3),
            },
        )
        self._trip(cfg, exc.retry_after)

    def _trip(self, cfg: ProviderConfig, retry_after: float | None) -> None:
        """Count a failure in a row; from PROVIDER_TRIP_FAILURES on, the next call is a probe."""
        provider, now = cfg.name, self._clock()
        trip = self._providers.get(provider)
        failures = trip.failures + 1 if trip else 1
        probe_at = 0.0
        if failures >= PROVIDER_TRIP_FAILURES:
            # The same exponential as an account's, capped: a probe goes at least this often.
            wait = min(self._delay(cfg, failures, None), cfg.recovery_probe_seconds)
            probe_at = now + max(wait, retry_after or 0.0)  # the provider's word comes first
        self._providers[provider] = Backoff(failures, probe_at)

    def answered(self, provider: str, account: str) -> bool:
        """The provider answered: it is up. When it had been tripped, every account's backoff
        is released (True)."""
        self._accounts.pop((provider, account), None)
        was_tripped = self._tripped(provider) is not None
        self._providers.pop(provider, None)
        if not was_tripped:
            return False
        waiting = [key for key in self._accounts if key[0] == provider]
        for key in waiting:
            del self._accounts[key]
        log.info("provider_recovered", extra={"provider": provider, "released": len(waiting)})
        return True

    def forget(self, provider: str, account: str) -> None:
        self._accounts.pop((provider, account), None)

    def _tripped(self, provider: str) -> Backoff | None:
        trip = self._providers.get(provider)
        return trip if trip is not None and trip.failures >= PROVIDER_TRIP_FAILURES else None

    def _delay(self, provider: ProviderConfig, failures: int, floor: float | None) -> float:
        """Exponential backoff with jitter; a provider's Retry-After is a floor."""
        ceiling = min(
            provider.backoff_max_seconds, provider.backoff_initial_seconds * 2 ** (failures - 1)
        )
        return max(self._rng.uniform(ceiling / 2, ceiling), floor or 0.0)
