"""Background refresh: every account is refreshed before any request needs it.

The schedule is a pure function of what is stored (expiry, last refresh), so a restart picks up
where the last process left off and causes no storm. Each account's refresh time carries a
stable per-account jitter, so accounts imported together do not expire together. Calls go
through the credential manager, which bounds concurrency and rate per provider and keeps the
single-flight guarantee (a request that needs the same account joins the same refresh).

Replicas share the work without queueing for it: a refresher only tries an account's store lock
and skips the account while another replica holds it (that replica is refreshing it). A skipped
account is still due, so the next pass (within a second) looks at it again; by then the holder
has usually stored the new pair and the reloaded row is no longer due.

Refresh-token keepalive: when a provider's refresh tokens lapse after a configured lifetime,
an account nobody has used for weeks is still refreshed before its refresh token would lapse.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Iterator, Mapping

from sidecar.config import ProviderConfig
from sidecar.credentials.manager import CredentialManager
from sidecar.errors import SidecarError, StoreError
from sidecar.model import AccountState, Clock, Credential, effective_skew
from sidecar.store import StoredRow, TokenStore

log = logging.getLogger(__name__)

MAX_SLEEP_SECONDS = 30.0  # rescan at least this often: imports and other replicas change rows
SKIPPED_RECHECK_SECONDS = 1.0  # look again this soon at accounts another replica was refreshing


def account_jitter(provider: str, account: str) -> float:
    """A stable number in [0, 1) per account: the same after every restart."""
    digest = hashlib.sha256(f"{provider}\x00{account}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def access_lead(provider: ProviderConfig, lifetime: float) -> float:
    """How long before expiry a token of this lifetime is refreshed in the background, before
    jitter: ``refresh_lead_fraction`` of the lifetime or ``refresh_lead_seconds``, whichever is
    longer, but at most half the lifetime (a longer lead would refresh more than twice per
    lifetime). Never shorter than the token's effective skew: requests must not find it STALE
    and wait for a refresh that the background would have done anyway."""
    lead = max(provider.refresh_lead_fraction * lifetime, provider.refresh_lead_seconds)
    return max(min(lead, lifetime / 2), effective_skew(provider.refresh_skew_seconds, lifetime))


def next_refresh_at(
    provider: ProviderConfig, account: str, expires_at: float | None, refreshed_at: float | None
) -> float | None:
    """When the background refresher should refresh this account (None: never needed)."""
    jitter = account_jitter(provider.name, account)
    times = []
    if expires_at is not None and refreshed_at is None:  # lifetime unknown
        lead = max(provider.refresh_lead_seconds, provider.refresh_skew_seconds)
        times.append(expires_at - lead)
    elif expires_at is not None and refreshed_at is not None:
        lifetime = max(expires_at - refreshed_at, 0.0)
        spread = jitter * provider.refresh_jitter_fraction * lifetime
        times.append(expires_at - access_lead(provider, lifetime) - spread)
    if provider.refresh_token_lifetime_seconds and refreshed_at is not None:
        lifetime = provider.refresh_token_lifetime_seconds
        keep_alive = lifetime * (1 - provider.refresh_lead_fraction)
        times.append(
            refreshed_at + keep_alive - jitter * provider.refresh_jitter_fraction * lifetime
        )
    return min(times) if times else None


class Refresher:
    def __init__(
        self,
        store: TokenStore,
        credentials: CredentialManager,
        providers: Mapping[str, ProviderConfig],
        clock: Clock,
    ) -> None:
        self._store, self._credentials = store, credentials
        self._providers, self._clock = providers, clock
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Rescan now (e.g. after an import)."""
        self._wake.set()

    async def run(self) -> None:
        """Refresh what is due, sleep until the next account is due, repeat; until cancelled."""
        while True:
            try:
                next_due = await self.run_once()
            except StoreError as exc:
                log.warning("refresher_store_unavailable", extra={"error": str(exc)})
                next_due = None
            delay = MAX_SLEEP_SECONDS if next_due is None else next_due - self._clock()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(max(delay, 0.0), MAX_SLEEP_SECONDS))
            self._wake.clear()

    async def run_once(self) -> float | None:
        """Refresh every account due now; return when the next one will be due."""
        results = await asyncio.gather(*(self._provider_once(p) for p in self._providers.values()))
        upcoming = [t for t in results if t is not None]
        return min(upcoming) if upcoming else None

    async def _provider_once(self, provider: ProviderConfig) -> float | None:
        now = self._clock()
        due: list[StoredRow] = []
        upcoming: list[float] = []
        for row in await self._store.rows(provider.name):
            if row.state != AccountState.ACTIVE.value:
                continue
            at = next_refresh_at(provider, row.account, row.expires_at, row.refreshed_at)
            retry_at = self._credentials.retry_at(provider.name, row.account)
            if at is not None and retry_at is not None:
                at = max(at, retry_at)
            if at is None:
                continue
            if at <= now:
                due.append(row)
            else:
                upcoming.append(at)
        # A bounded crowd of workers: the manager limits calls, this limits waiting tasks.
        queue = iter(due)
        workers = max(1, provider.max_concurrent_refreshes * 2)
        skipped = sum(await asyncio.gather(*(self._work(provider, queue) for _ in range(workers))))
        log.debug(
            "background_refresh_pass",
            extra={"provider": provider.name, "due": len(due), "skipped": skipped},
        )
        if skipped:  # their holders are refreshing them now: soon they are stored, not due
            upcoming.append(self._clock() + SKIPPED_RECHECK_SECONDS)
        return min(upcoming) if upcoming else (now + 1.0 if due else None)

    async def _work(self, provider: ProviderConfig, queue: Iterator[StoredRow]) -> int:
        """Refresh accounts from the shared queue; return how many were skipped."""
        skipped = 0
        for row in queue:
            skipped += await self._refresh(provider, row.account)
        return skipped

    async def _refresh(self, provider: ProviderConfig, account: str) -> bool:
        """Refresh one account if it is still due; True when another replica held its lock."""

        def due(cred: Credential) -> bool:  # decided again on the reloaded pair
            at = next_refresh_at(provider, account, cred.token.expires_at, cred.refreshed_at)
            return at is not None and at <= self._clock()

        try:
            return await self._credentials.refresh_if(provider.name, account, due) is None
        except SidecarError as exc:  # already logged, counted and backed off where it arose
            log.debug(
                "background_refresh_failed",
                extra={"provider": provider.name, "account": account, "error": type(exc).__name__},
            )
            return False
