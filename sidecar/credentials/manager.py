"""The current token of every account, refreshed single-flight.

``current()`` is the hot path: a dict lookup and a freshness check. A STALE or INVALID token is
refreshed before it is handed out; ``refresh(failed=...)`` is called when the upstream rejected
a token. One refresh per account runs at a time ("a flight", see ``flights``): every caller
that needs the same account meanwhile awaits that flight instead of starting its own.

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
from collections.abc import Callable, Mapping

from aiolimiter import AsyncLimiter

from sidecar.config import CLIENT_CREDENTIALS_ACCOUNT, ProviderConfig
from sidecar.credentials.backoff import Backoffs
from sidecar.credentials.codec import seal, unseal
from sidecar.credentials.flights import Flights, store_unavailable
from sidecar.credentials.lost import LostAnswers
from sidecar.credentials.notifier import Notifier
from sidecar.crypto import TokenCipher
from sidecar.errors import (
    DecryptError,
    FatalGrantError,
    ReauthorizationRequired,
    SidecarError,
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
RESAVE_SECONDS = 1.0  # how often a pair the store refused is written again
STORE_RETRY_AFTER_SECONDS = 2  # Retry-After when an account cannot be read: outages are short


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
        self._flights = Flights(tasks, metrics)
        self._backoffs = Backoffs(providers, clock, self._rng)
        self._unsaved: dict[Key, Credential] = {}  # new pairs whose write failed: never lose them
        self._resaving: set[Key] = set()
        self._lost = LostAnswers(providers, metrics, clock)
        self.recovered: Callable[[str], None] = lambda provider: None  # after a tripped
        # provider answers again (the background refresher then rescans at once)
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
        if self._flights.waiting(key):
            return await self._join(key, due)
        retry_at = self.retry_at(provider, account)
        if retry_at is not None and self._clock() < retry_at:  # no store lock, no reload
            raise TransientGrantError("backing off after an earlier failure")
        return await self._flights.try_join(key, lambda: self._try_fly(key, due))

    def forget(self, provider: str, account: str) -> None:
        """Drop what this process holds for an account after an operator imported,
        re-authorized or deleted it, so the next request reads the store again."""
        key = (provider, account)
        for held in (self._cache, self._unsaved):
            held.pop(key, None)
        self._backoffs.forget(provider, account)
        self._lost.forget(provider, account)

    def retry_at(self, provider: str, account: str) -> float | None:
        """When a refresh of this account may next call the provider, if it is backing off."""
        return self._backoffs.retry_at(provider, account)

    async def _join(self, key: Key, decide: Decide) -> Credential:
        return await self._flights.join(key, lambda after: self._fly(key, decide, after))

    def _fallback(self, key: Key, failed: Token | None, exc: TransientGrantError) -> Token:
        """After a transient failure: keep using an unexpired token the upstream did not reject.
        A pair the provider gave that the store has not taken yet is the newest: its access
        token is good (only its refresh token must wait for the write)."""
        cred = self._unsaved.get(key) or self._cache.get(key)
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
        # A refresh sent and never concluded (a crash or a lost store, here or in another
        # replica): the provider may have rotated. See LostAnswers.check.
        self._lost.seen(provider, account, row.refresh_attempt_at)
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
        with store_unavailable():
            async with self._store.hold(*key):
                self._metrics.lock_wait.labels(key[0]).observe(time.perf_counter() - waited)
                return await self._fly_locked(key, decide)

    async def _try_fly(self, key: Key, decide: Decide) -> Credential | None:
        """Refresh if the account's lock is free now and ``decide`` still says so; None when
        another process holds the lock. Nothing is recorded for a skip: no backoff, no lost
        outcome, since this process neither read the row under the lock nor called anyone."""
        with store_unavailable():
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
        self._lost.check(provider, account)
        async with self._limits[provider]:
            # Checked after the wait for a slot: the provider may have tripped meanwhile.
            probe = await self._backoffs.admit(provider, account)
            try:
                async with self._rates[provider]:
                    with self._flights.sending(key):
                        return await self._send(cred)
            finally:
                self._backoffs.settle(provider, probe)

    async def _send(self, cred: Credential) -> Credential:
        """Call the provider and store the new pair: what a shutdown waits for."""
        sent_at = self._clock()
        await self._store.record_refresh_attempt(cred.provider, cred.account, sent_at)
        self._lost.sent(cred.provider, cred.account, sent_at)
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
        """At shutdown: start no more token requests, and store the answers of those sent
        (bounded by the providers' ``timeout_seconds`` plus a write); see ``Flights.drain``."""
        timeout = max((p.timeout_seconds for p in self._providers.values()), default=0.0)
        return await self._flights.drain(timeout)

    async def _call_provider(self, cred: Credential) -> Token:
        metrics = self._metrics
        start = self._clock()
        try:
            with metrics.refresh_latency.labels(cred.provider).time():
                token = await self._grants[cred.provider].fetch(cred.token)
        except FatalGrantError as exc:
            metrics.refreshes.labels(cred.provider, "fatal_error").inc()
            self._answered(cred.provider, cred.account)  # a definite "no": the provider is up
            # After a lost answer, invalid_grant most likely means the provider did rotate:
            # the new pair is gone, and the operator should know why.
            lost = self._lost.answered(cred.provider, cred.account)
            reason = "refresh_outcome_lost" if lost else exc.error
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
        self._lost.answered(cred.provider, cred.account)
        self._answered(cred.provider, cred.account)
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
            self._resave_soon(key)
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

    def _resave_soon(self, key: Key) -> None:
        if key not in self._resaving:
            self._resaving.add(key)
            self._tasks.spawn(self._resave(key), name=f"resave {key[0]}")

    async def _resave(self, key: Key) -> None:
        """Write a pair the store refused as soon as it is back, under the account's lock: until
        then another process could present the refresh token that pair replaced."""
        try:
            while key in self._unsaved:
                await asyncio.sleep(RESAVE_SECONDS)
                with contextlib.suppress(SidecarError):
                    await self._join(key, lambda cred: key in self._unsaved)
        finally:
            self._resaving.discard(key)

    async def _after_transient(self, cred: Credential, exc: TransientGrantError) -> None:
        """Back off this account (and the provider when it keeps failing). A lost answer is
        retried later with the same refresh token; see ``LostAnswers``."""
        self._backoffs.failed(cred.provider, cred.account, exc)
        if exc.outcome_unknown and self._lost.lost(cred, exc.lost_cause):
            await self._mark_reauthorization(cred, "refresh_outcome_lost")

    def _answered(self, provider: str, account: str) -> None:
        if self._backoffs.answered(provider, account):  # it was tripped: all may go again
            self.recovered(provider)

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
