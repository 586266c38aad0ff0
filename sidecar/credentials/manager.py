"""The current token of every account, refreshed single-flight.

``current()`` is the hot path: a dict lookup and a freshness check. A STALE or INVALID token is
refreshed before it is handed out; ``refresh(failed=...)`` is called when the upstream rejected
a token. One refresh per account runs at a time ("a flight"): every caller that needs the same
account meanwhile awaits that flight instead of starting its own. A flight runs as its own
task, so a request that goes away cannot cancel a refresh halfway through a rotation.

Inside a flight: reload the row (another process may have refreshed it), decide again by the
token that failed, call the token endpoint, persist the new pair (compare-and-swap on the row's
version), and only then hand the new token out. A rotated-away refresh token is never sent
again, because the next flight reads the pair from the store.

A flight for a request waits for the account's store lock: the request needs the outcome. A
background flight only tries it (``try_hold``): when another replica holds it, that replica is
refreshing the account, so the background refresher skips it and sees the new pair on its next
pass instead of queueing behind every other replica's lock. A request that arrives during a
background flight waits for it and, if it skipped, takes the lock itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from aiolimiter import AsyncLimiter

from sidecar.config import CLIENT_CREDENTIALS_ACCOUNT, ProviderConfig
from sidecar.credentials.codec import seal, unseal
from sidecar.credentials.notifier import Notifier
from sidecar.crypto import TokenCipher
from sidecar.errors import (
    DecryptError,
    FatalGrantError,
    ReauthorizationRequired,
    StoreError,
    TokenUnavailable,
    TokenUndecryptable,
    TransientGrantError,
    UnknownAccount,
)
from sidecar.grants import Grant
from sidecar.metrics import Metrics
from sidecar.model import AccountState, Clock, Credential, Token, TokenState, fingerprint
from sidecar.store import TokenStore
from sidecar.tasks import Tasks

log = logging.getLogger(__name__)
Key = tuple[str, str]  # (provider, account)
Decide = Callable[[Credential], bool]  # does this freshly reloaded pair need refreshing?
PROVIDER_TRIP_FAILURES = 3  # failures in a row before every refresh to a provider slows down
DRAIN_WRITE_SECONDS = 5.0  # at shutdown, time allowed to store a pair after its answer
STORE_RETRY_AFTER_SECONDS = 2  # Retry-After when an account cannot be read: outages are short


@dataclass(slots=True)
class Backoff:
    failures: int
    retry_at: float


class CredentialManager:
    def __init__(
        self,
        store: TokenStore,
        cipher: TokenCipher,
        grants: Mapping[str, Grant],
        providers: Mapping[str, ProviderConfig],
        metrics: Metrics,
        clock: Clock,
        tasks: Tasks,
        rng: random.Random | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self._notifier = notifier
        self._store, self._cipher, self._grants = store, cipher, grants
        self._providers, self._metrics, self._clock = providers, metrics, clock
        self._tasks, self._rng = tasks, rng or random.Random()
        self._cache: dict[Key, Credential] = {}
        self._flights: dict[Key, asyncio.Future[Credential]] = {}  # wait for the store lock
        self._tries: dict[Key, asyncio.Future[Credential | None]] = {}  # background: try it
        self._backoff: dict[Key, Backoff] = {}
        self._unsaved: dict[Key, Credential] = {}  # new pairs whose write failed: never lose them
        self._lost: dict[Key, int] = {}  # refreshes whose answer was lost, in a row
        self._provider_backoff: dict[str, Backoff] = {}
        self._sending: set[Key] = set()  # provider called, new pair not yet stored
        self._stopping = False
        # Shared by on-demand and background refreshes: thousands of refreshes fired at once
        # would time out, and a timed-out rotation loses the new pair.
        self._limits = {
            name: asyncio.Semaphore(p.max_concurrent_refreshes) for name, p in providers.items()
        }
        self._rates = {
            name: AsyncLimiter(p.max_refreshes_per_second, 1.0) for name, p in providers.items()
        }

    def account_for(self, provider: str, requested: str | None) -> str | None:
        """The account a request means. A provider that issues the client its own token
        (client_credentials, jwt_bearer) has just one, whatever account a request names."""
        if self._providers[provider].single_token:
            return CLIENT_CREDENTIALS_ACCOUNT
        return requested

    def fresh(self, provider: str, account: str) -> Token | None:
        """The cached token when it is FRESH: the hot path, with no coroutine to run."""
        cred = self._cache.get((provider, account))
        if cred is None or cred.state is AccountState.REAUTHORIZATION_REQUIRED:
            return None
        skew = self._providers[provider].refresh_skew_seconds
        return cred.token if cred.token.state(self._clock(), skew) is TokenState.FRESH else None

    async def current(self, provider: str, account: str) -> Token:
        """A token that is safe to inject now; refreshes first when it is STALE or INVALID."""
        cred = self._cache.get((provider, account)) or await self._read(provider, account)
        if cred.state is AccountState.REAUTHORIZATION_REQUIRED:
            raise ReauthorizationRequired(cred.state_reason or "unknown", cred.state_changed_at)
        skew = self._providers[provider].refresh_skew_seconds
        if cred.token.state(self._clock(), skew) is TokenState.FRESH:
            return cred.token
        return await self.refresh(provider, account, failed=None)

    async def refresh(self, provider: str, account: str, failed: Token | None) -> Token:
        """Join or start the account's refresh flight and return the token to use.

        ``failed`` is the token the upstream just rejected: refresh only if it is still the
        current one; otherwise a newer token exists already and is returned as is.
        """
        if failed is None:
            decide = self._is_not_fresh
        else:
            decide = lambda cred: cred.token.access_token == failed.access_token  # noqa: E731
        try:
            return (await self._join((provider, account), decide)).token
        except TransientGrantError as exc:
            return self._fallback((provider, account), failed, exc)

    async def refresh_if(self, provider: str, account: str, due: Decide) -> Credential | None:
        """Refresh when ``due`` still holds for the freshly reloaded pair (background refresh).

        None, at once, when another process holds the account's lock: it is refreshing the
        account. A flight of this process for the account is joined instead (it may wait).
        """
        key = (provider, account)
        if key in self._flights:
            return await self._join(key, due)
        flight = self._tries.get(key)
        if flight is not None:
            self._metrics.coalesced.labels(provider).inc()
        else:
            flight = self._tasks.spawn(self._try_fly(key, due), name=f"refresh {provider}")
            self._tries[key] = flight
            flight.add_done_callback(lambda _: self._tries.pop(key, None))
        return await asyncio.shield(flight)

    def forget(self, provider: str, account: str) -> None:
        """Drop what this process holds for an account after an operator imported,
        re-authorized or deleted it, so the next request reads the store again."""
        key = (provider, account)
        for held in (self._cache, self._backoff, self._unsaved, self._lost):
            held.pop(key, None)

    def retry_at(self, provider: str, account: str) -> float | None:
        """When a refresh of this account may next call the provider, if it is backing off."""
        times = [
            b.retry_at
            for b in (self._backoff.get((provider, account)), self._provider_backoff.get(provider))
            if b
        ]
        return max(times) if times else None

    async def _join(self, key: Key, decide: Decide) -> Credential:
        flight = self._flights.get(key)
        if flight is not None:
            self._metrics.coalesced.labels(key[0]).inc()
        else:
            after = self._tries.get(key)  # at most one flight of this process takes the lock
            flight = self._tasks.spawn(self._fly(key, decide, after), name=f"refresh {key[0]}")
            self._flights[key] = flight
            flight.add_done_callback(lambda _: self._flights.pop(key, None))
        # Shielded: a caller that goes away must not cancel a rotation halfway.
        return await asyncio.shield(flight)

    def _fallback(self, key: Key, failed: Token | None, exc: TransientGrantError) -> Token:
        """After a transient failure: keep using an unexpired token the upstream did not reject."""
        cred = self._cache.get(key)
        now = self._clock()
        usable = cred is not None and cred.token.state(now, 0) is not TokenState.INVALID
        if failed is None and cred is not None and usable:
            return cred.token
        retry_at = self.retry_at(*key)
        wait = retry_at - now if retry_at else 1.0
        raise TokenUnavailable(retry_after=max(1, math.ceil(wait))) from exc

    async def _read(self, provider: str, account: str) -> Credential:
        """``_load`` for a request: a store that is away is "try again soon" for the app,
        as a failing token endpoint is, not an internal error."""
        try:
            return await self._load(provider, account)
        except StoreError as exc:
            log.warning(
                "token_store_unavailable",
                extra={"provider": provider, "account": account, "error": str(exc)},
            )
            raise TokenUnavailable(
                STORE_RETRY_AFTER_SECONDS, "the token store is unavailable; try again shortly"
            ) from exc

    async def _load(self, provider: str, account: str) -> Credential:
        row = await self._store.get(provider, account)
        if row is None:
            if account == CLIENT_CREDENTIALS_ACCOUNT and self._providers[provider].single_token:
                return Credential(provider, account, Token("", expires_at=0.0), version=0)
            raise UnknownAccount(f"no account {account!r} for provider {provider!r}")
        try:
            cred = unseal(self._cipher, row)
        except DecryptError as exc:
            # A key file that does not match the store: the app gets a clear error naming the
            # key id, and start-up checks (sidecar check-config, run) catch it before traffic.
            raise TokenUndecryptable(
                f"the stored token pair does not decrypt with the configured keys ({exc}); "
                "check [store] key_file"
            ) from exc
        self._cache[(provider, account)] = cred
        if row.refresh_attempt_at is not None and (provider, account) not in self._lost:
            # A refresh was sent and never concluded (a crash, here or in another replica):
            # the provider may have rotated. Retry with the same token; remember why.
            self._lost[(provider, account)] = 1
            log.warning(
                "refresh_outcome_unknown",
                extra={"provider": provider, "account": account, "sent_at": row.refresh_attempt_at},
            )
        return cred

    def _is_not_fresh(self, cred: Credential) -> bool:
        skew = self._providers[cred.provider].refresh_skew_seconds
        return cred.token.state(self._clock(), skew) is not TokenState.FRESH

    async def _fly(
        self, key: Key, decide: Decide, after: asyncio.Future[Credential | None] | None
    ) -> Credential:
        """Wait for the account's lock, then refresh if ``decide`` still says so.

        ``after`` is a background flight already under way: its outcome comes first, and is
        enough unless it skipped the account or left it still needing a refresh.
        """
        if after is not None:
            tried = await asyncio.shield(after)
            if tried is not None and not decide(tried):
                return tried
        waited = time.perf_counter()
        with _store_unavailable():
            async with self._store.hold(*key):
                self._metrics.lock_wait.labels(key[0]).observe(time.perf_counter() - waited)
                return await self._fly_locked(key, decide)

    async def _try_fly(self, key: Key, decide: Decide) -> Credential | None:
        """Refresh if the account's lock is free now and ``decide`` still says so; None when
        another process holds the lock. Nothing is recorded for a skip: no backoff, no lost
        outcome, since this process neither read the row under the lock nor called anyone."""
        with _store_unavailable():
            async with self._store.try_hold(*key) as held:
                if not held:
                    self._metrics.background_skipped.labels(key[0]).inc()
                    return None
                return await self._fly_locked(key, decide)

    async def _fly_locked(self, key: Key, decide: Decide) -> Credential:
        provider, account = key
        cred = await self._load(provider, account)  # another process may have refreshed it
        if cred.state is AccountState.REAUTHORIZATION_REQUIRED:
            raise ReauthorizationRequired(cred.state_reason or "unknown", cred.state_changed_at)
        if not decide(cred):
            return cred
        if key in self._unsaved:
            return await self._save(cred, self._unsaved[key])
        async with self._limits[provider]:
            # Checked after the wait for a slot: the provider may have tripped meanwhile.
            retry_at = self.retry_at(provider, account)
            if retry_at is not None and self._clock() < retry_at:
                raise TransientGrantError("backing off after an earlier failure")
            async with self._rates[provider]:
                if self._stopping:  # nothing sent yet: leave it to the next process
                    raise TransientGrantError("the sidecar is stopping")
                self._sending.add(key)
                try:
                    return await self._send(cred)
                finally:
                    self._sending.discard(key)

    async def _send(self, cred: Credential) -> Credential:
        """Call the provider and store the new pair: what a shutdown waits for."""
        await self._store.record_refresh_attempt(cred.provider, cred.account, self._clock())
        new_token = await self._call_provider(cred)
        fresh = dataclasses.replace(
            cred,
            token=cred.token.rotated(new_token),
            state=AccountState.ACTIVE,
            state_reason=None,
            state_changed_at=None,
            refreshed_at=self._clock(),
        )
        self._unsaved[(cred.provider, cred.account)] = fresh
        return await self._save(cred, fresh)

    async def drain(self) -> int:
        """At shutdown: start no more provider calls, and wait for those already sent until
        their pairs are stored. Cancelling one instead would lose a rotated refresh token: the
        provider has rotated, and the next process would present the old one (reuse, and the
        account is dead). Bounded by the providers' ``timeout_seconds`` plus a store write;
        returns how many were still unfinished then."""
        self._stopping = True
        flights: list[tuple[Key, asyncio.Future[Any]]] = [
            *self._flights.items(),
            *self._tries.items(),
        ]
        sending = {flight for key, flight in flights if key in self._sending}
        if not sending:
            return 0
        bound = max(p.timeout_seconds for p in self._providers.values()) + DRAIN_WRITE_SECONDS
        log.info("refreshes_draining", extra={"in_flight": len(sending), "bound_seconds": bound})
        _, pending = await asyncio.wait(sending, timeout=bound)
        log.log(
            logging.WARNING if pending else logging.INFO,
            "refreshes_drained",
            extra={"stored": len(sending) - len(pending), "unfinished": len(pending)},
        )
        return len(pending)

    async def _call_provider(self, cred: Credential) -> Token:
        key = (cred.provider, cred.account)
        metrics = self._metrics
        start = self._clock()
        try:
            with metrics.refresh_latency.labels(cred.provider).time():
                token = await self._grants[cred.provider].fetch(cred.token)
        except FatalGrantError as exc:
            metrics.refreshes.labels(cred.provider, "fatal_error").inc()
            # After a lost answer, invalid_grant most likely means the provider did rotate:
            # the new pair is gone, and the operator should know why.
            reason = "refresh_outcome_lost" if self._lost.pop(key, 0) else exc.error
            await self._store.record_refresh_attempt(cred.provider, cred.account, None)
            await self._mark_reauthorization(cred, reason)
            raise ReauthorizationRequired(reason, start) from exc
        except TransientGrantError as exc:
            metrics.refreshes.labels(cred.provider, "transient_error").inc()
            if not exc.outcome_unknown:  # it never reached the provider, or it said no
                await self._store.record_refresh_attempt(cred.provider, cred.account, None)
            await self._after_transient(cred, exc)
            raise
        metrics.refreshes.labels(cred.provider, "success").inc()
        for pending in (self._backoff, self._lost):
            pending.pop(key, None)
        self._provider_backoff.pop(cred.provider, None)
        log.info(
            "token_refreshed",
            extra={
                "provider": cred.provider,
                "account": cred.account,
                "access_fp": fingerprint(token.access_token),
                "rotated": token.refresh_token is not None,
            },
        )
        return token

    async def _save(self, old: Credential, new: Credential) -> Credential:
        """Persist a new pair before anyone uses it (compare-and-swap on the version)."""
        key = (new.provider, new.account)
        try:
            if old.version == 0:
                await self._store.upsert_many([seal(self._cipher, new)])
                saved = True
            else:
                saved = await self._store.compare_and_swap(seal(self._cipher, new), old.version)
        except StoreError as exc:
            log.error(
                "token_save_failed",
                extra={"provider": new.provider, "account": new.account, "error": str(exc)},
            )
            raise TransientGrantError("cannot persist the new token pair") from exc
        del self._unsaved[key]
        if not saved:
            # Someone else (an import, another process) wrote a newer pair: theirs wins.
            log.warning(
                "token_save_conflict", extra={"provider": new.provider, "account": new.account}
            )
            return await self._load(new.provider, new.account)
        stored = dataclasses.replace(new, version=old.version + 1)
        self._cache[key] = stored
        return stored

    async def _after_transient(self, cred: Credential, exc: TransientGrantError) -> None:
        """Back off this account, and the whole provider when it keeps failing.

        A lost answer (``outcome_unknown``) is retried later with the same refresh token,
        never an invented one; after ``lost_refresh_max_attempts`` such losses in a row with
        the access token expired, the account is given up as ``refresh_outcome_lost``.
        """
        key = (cred.provider, cred.account)
        provider = self._providers[cred.provider]
        self._back_off(key, exc)
        trip = self._provider_backoff.get(cred.provider)
        failures = trip.failures + 1 if trip else 1
        if failures >= PROVIDER_TRIP_FAILURES:
            delay = self._delay(provider, failures - PROVIDER_TRIP_FAILURES + 1, None)
            self._provider_backoff[cred.provider] = Backoff(failures, self._clock() + delay)
        else:
            self._provider_backoff[cred.provider] = Backoff(failures, 0.0)
        if not exc.outcome_unknown:
            return
        self._lost[key] = self._lost.get(key, 0) + 1
        expired = cred.token.state(self._clock(), 0) is TokenState.INVALID
        if self._lost[key] >= provider.lost_refresh_max_attempts and expired:
            del self._lost[key]
            await self._mark_reauthorization(cred, "refresh_outcome_lost")

    def _delay(self, provider: ProviderConfig, failures: int, floor: float | None) -> float:
        """Exponential backoff with jitter; a provider's Retry-After is a floor."""
        ceiling = min(
            provider.backoff_max_seconds, provider.backoff_initial_seconds * 2 ** (failures - 1)
        )
        return max(self._rng.uniform(ceiling / 2, ceiling), floor or 0.0)

    def _back_off(self, key: Key, exc: TransientGrantError) -> None:
        failures = self._backoff[key].failures + 1 if key in self._backoff else 1
        delay = self._delay(self._providers[key[0]], failures, exc.retry_after)
        self._backoff[key] = Backoff(failures, self._clock() + delay)
        log.warning(
            "token_refresh_failed",
            extra={
                "provider": key[0],
                "account": key[1],
                "reason": exc.reason,
                "outcome_unknown": exc.outcome_unknown,
                "retry_in_seconds": round(delay, 3),
            },
        )

    async def _mark_reauthorization(self, cred: Credential, reason: str) -> None:
        now = self._clock()
        await self._store.set_state(
            cred.provider, cred.account, AccountState.REAUTHORIZATION_REQUIRED.value, reason, now
        )
        self._cache[(cred.provider, cred.account)] = dataclasses.replace(
            cred,
            state=AccountState.REAUTHORIZATION_REQUIRED,
            state_reason=reason,
            state_changed_at=now,
        )
        log.warning(
            "account_needs_reauthorization",
            extra={"provider": cred.provider, "account": cred.account, "reason": reason},
        )
        self._metrics.reauthorizations.labels(cred.provider, reason).inc()
        if self._notifier is not None:
            self._notifier.reauthorization_required(cred.provider, cred.account, reason, now)

    async def reset_client_credentials(self) -> None:
        """A single-token provider's failure is fixed in config, so a restart clears its mark."""
        for name, provider in self._providers.items():
            if provider.single_token:
                await self._store.set_state(
                    name, CLIENT_CREDENTIALS_ACCOUNT, AccountState.ACTIVE.value, None, self._clock()
                )


@contextlib.contextmanager
def _store_unavailable() -> Iterator[None]:
    """Store down: the refresh fails as transient, and a still-valid cached token keeps being
    served. A pair that cannot be decrypted is no outage and passes through."""
    try:
        yield
    except DecryptError:
        raise
    except StoreError as exc:
        raise TransientGrantError(f"token store unavailable: {exc}") from exc
