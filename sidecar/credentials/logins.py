"""Logins in progress: from an authorization URL to a stored token pair.

``start`` builds the authorization request (PKCE S256 and ``state``) and remembers what its
callback needs; ``complete`` takes the query the provider redirected the browser with. A
``state`` is used at most once and expires after ``LOGIN_TTL_SECONDS``: a callback whose
``state`` is unknown, used or expired is refused before any token request, so a replayed or
forged redirect can never make the sidecar exchange a code (RFC 6749 §10.12, RFC 9700 §4.7).
The verifier never leaves this process, so a code that leaks is useless (RFC 7636 §1).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from sidecar.credentials.accounts import AccountService, InvalidInput, Stored, account_problems
from sidecar.errors import SidecarError
from sidecar.grants.authorization_code import authorization_request
from sidecar.grants.discovery import Endpoints
from sidecar.model import Clock

log = logging.getLogger(__name__)

LOGIN_TTL_SECONDS = 600.0  # long enough to sign in, short enough that a stale link is dead
MAX_PENDING = 1000  # per process; the oldest is dropped beyond this


class LoginRefused(SidecarError):
    """The callback cannot complete a login; ``title`` heads the page the browser gets."""

    title = "Sign-in failed"


class UnknownLogin(LoginRefused):
    """No login waits for this ``state``: never started, already used, or expired."""

    title = "Unknown or used sign-in link"


class LoginDenied(LoginRefused):
    """The provider answered with an error (RFC 6749 §4.1.2.1), e.g. ``access_denied``."""

    title = "Sign-in was not completed"


class NotConnectable(SidecarError):
    """The provider has no authorization endpoint, configured or discovered."""


@dataclass(frozen=True, slots=True)
class Started:
    url: str = field(repr=False)  # carries the state
    redirect_uri: str
    expires_at: float

    def to_json(self) -> dict[str, object]:
        return {
            "authorization_url": self.url,
            "redirect_uri": self.redirect_uri,
            "expires_at": self.expires_at,
        }


@dataclass(frozen=True, slots=True)
class _Pending:
    provider: str
    account: str
    redirect_uri: str
    code_verifier: str = field(repr=False)
    expires_at: float


class Logins:
    def __init__(
        self,
        accounts: AccountService,
        endpoints: Mapping[str, Endpoints],
        clock: Clock,
        ttl: float = LOGIN_TTL_SECONDS,
    ) -> None:
        self._accounts, self._endpoints, self._clock, self._ttl = accounts, endpoints, clock, ttl
        self._pending: dict[str, _Pending] = {}

    async def start(self, provider: str, account: str, redirect_uri: str) -> Started:
        """A new authorization request for ``account``; its callback must come within the TTL."""
        cfg = self._accounts.pair_provider(provider)
        problems = account_problems(account)
        if problems:
            raise InvalidInput(problems)
        authorization_url = await self._endpoints[provider].authorization_url()
        if authorization_url is None:
            raise NotConnectable(
                f"provider {provider!r} has no authorization_url (set it, or an issuer whose "
                "metadata names an authorization_endpoint)"
            )
        request = authorization_request(cfg, authorization_url, redirect_uri)
        now = self._clock()
        self._forget_expired(now)
        if len(self._pending) >= MAX_PENDING:
            self._pending.pop(next(iter(self._pending)))
        expires_at = now + self._ttl
        self._pending[request.state] = _Pending(
            provider, account, redirect_uri, request.code_verifier, expires_at
        )
        log.info("login_started", extra={"provider": provider, "account": account})
        return Started(request.url, redirect_uri, expires_at)

    async def complete(self, query: Mapping[str, str]) -> tuple[str, str, Stored]:
        """Finish the login the callback's ``state`` names: (provider, account, stored)."""
        pending = self._take(query.get("state", ""))
        if "error" in query:
            description = query.get("error_description", "")
            raise LoginDenied(f"the provider answered {query['error']!r} {description}".strip())
        expected_issuer = self._endpoints[pending.provider].provider.issuer
        issuer = query.get("iss")
        if issuer is not None and expected_issuer is not None and issuer != expected_issuer:
            # RFC 9207 §2.4: a response from another authorization server (mix-up attack).
            raise LoginRefused(f"the response came from issuer {issuer!r}")
        code = query.get("code", "")
        if not code:
            raise LoginRefused("the provider's redirect carries no code")
        body = {
            "code": code,
            "redirect_uri": pending.redirect_uri,
            "code_verifier": pending.code_verifier,
        }
        stored = await self._accounts.authorize(pending.provider, pending.account, body)
        return pending.provider, pending.account, stored

    def _take(self, state: str) -> _Pending:
        """The login for ``state``, removed whatever happens next: a state works once."""
        now = self._clock()
        self._forget_expired(now)
        # Compare in constant time: the state is the callback's only credential.
        presented = state.encode()
        found = next((s for s in self._pending if hmac.compare_digest(s.encode(), presented)), None)
        if found is None or not state:
            log.warning("login_state_refused", extra={"reason": "unknown, used or expired"})
            raise UnknownLogin(
                "this sign-in link is unknown, already used or expired; nothing was exchanged. "
                "Start again (sidecar accounts connect)."
            )
        return self._pending.pop(found)

    def _forget_expired(self, now: float) -> None:
        for state in [s for s, p in self._pending.items() if p.expires_at <= now]:
            del self._pending[state]
