"""Accounts as an operator manages them: list, import a pair, authorize, refresh, revoke.

The admin API and the ``sidecar accounts`` commands both go through this service, so they
validate input the same way (every problem at once, each with its field) and neither ever shows
a token: an account is described by its state and times only.

Writes go to the store first; ``changed(provider, account)`` then tells the running process
(the credential cache, the background refresher) to look at the store again.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from sidecar.config import CLIENT_CREDENTIALS_ACCOUNT, ProviderConfig
from sidecar.credentials.codec import seal, unseal
from sidecar.credentials.manager import CredentialManager
from sidecar.crypto import TokenCipher
from sidecar.errors import (
    DecryptError,
    GrantError,
    SidecarError,
    TransientGrantError,
    UnknownAccount,
)
from sidecar.grants.authorization_code import AuthorizationCodeGrant
from sidecar.grants.base import TokenEndpoint
from sidecar.grants.discovery import Endpoints, endpoints_for
from sidecar.grants.revocation import Revocation
from sidecar.http.client import HttpClient
from sidecar.model import AccountState, Clock, Credential, Token, TokenState, fingerprint
from sidecar.store import StoredRow, TokenStore

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000
MAX_ACCOUNT_CHARS = 256
PAIR_GRANTS = frozenset({"refresh_token"})  # grants whose accounts hold operator-given pairs
PAIR_FIELDS = frozenset({"access_token", "refresh_token", "expires_in", "scope"})
AUTHORIZE_FIELDS = frozenset({"code", "redirect_uri", "code_verifier"})
LIST_PARAMETERS = frozenset({"state", "limit", "cursor"})
CODE_VERIFIER = re.compile(r"[A-Za-z0-9._~-]{43,128}")  # RFC 7636 §4.1
Revoked = Literal["revoked", "not_configured", "failed"]


class UnknownProvider(SidecarError):
    """No provider by that name is configured."""


class InvalidInput(SidecarError):
    """Bad input; ``problems`` holds every problem as ``"field: message"``."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class GrantNotSupported(SidecarError):
    """The provider's grant does not take token pairs from an operator."""


class RevocationFailed(SidecarError):
    """The provider did not confirm the revocation; the account is kept."""

    def __init__(self, cause: GrantError) -> None:
        super().__init__(f"revocation failed ({cause}); the account is kept")
        self.cause = cause


@dataclass(frozen=True, slots=True)
class AccountSummary:
    """What may be shown about an account: never a token."""

    provider: str
    account: str
    state: str
    reason: str | None  # why it needs re-authorization (the last fatal error)
    state_changed_at: float | None
    access_expires_at: float | None
    refresh_expires_at: float | None  # known when the provider's refresh lifetime is configured
    refreshed_at: float | None
    retry_at: float | None  # backing off after transient failures until then

    def to_json(self) -> dict[str, object]:
        fields = dataclasses.asdict(self)
        del fields["provider"]  # the URL or the page names it
        return fields


@dataclass(frozen=True, slots=True)
class ListQuery:
    state: AccountState | None = None
    limit: int | None = None  # None: every account
    after: str | None = None  # the last account of the previous page

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> ListQuery:
        """From query parameters (``state``, ``limit``, ``cursor``), reporting every problem."""
        problems = [f"{name}: unknown parameter" for name in sorted(set(params) - LIST_PARAMETERS)]
        state = params.get("state") or None
        if state is not None and state not in {s.value for s in AccountState}:
            problems.append(f"state: must be one of {', '.join(AccountState)}, got {state!r}")
        limit = params.get("limit", str(DEFAULT_PAGE_SIZE))
        if not limit.isdigit() or not 1 <= int(limit) <= MAX_PAGE_SIZE:
            problems.append(f"limit: must be an integer from 1 to {MAX_PAGE_SIZE}, got {limit!r}")
        after = _decode_cursor(params["cursor"]) if params.get("cursor") else None
        if after == "":
            problems.append("cursor: not a cursor this API returned")
        if problems:
            raise InvalidInput(problems)
        return cls(AccountState(state) if state else None, int(limit), after)


@dataclass(frozen=True, slots=True)
class Page:
    provider: str
    accounts: list[AccountSummary]
    next_cursor: str | None

    def to_json(self) -> dict[str, object]:
        return {
            "provider": self.provider,
            "accounts": [a.to_json() for a in self.accounts],
            "next_cursor": self.next_cursor,
        }


@dataclass(frozen=True, slots=True)
class Stored:
    """The result of writing a pair: the account, whether it is new, and what to look at."""

    summary: AccountSummary
    created: bool
    warnings: tuple[str, ...] = ()


class AccountService:
    def __init__(
        self,
        store: TokenStore,
        cipher: TokenCipher,
        providers: Mapping[str, ProviderConfig],
        credentials: CredentialManager,
        clock: Clock,
        *,
        authorizers: Mapping[str, AuthorizationCodeGrant],
        revokers: Mapping[str, Revocation],
        changed: Callable[[str, str], None] = lambda provider, account: None,
    ) -> None:
        self._store, self._cipher, self._providers = store, cipher, providers
        self._credentials, self._clock = credentials, clock
        self._authorizers, self._revokers, self._changed = authorizers, revokers, changed

    def provider(self, name: str) -> ProviderConfig:
        try:
            return self._providers[name]
        except KeyError:
            configured = ", ".join(self._providers) or "none"
            raise UnknownProvider(
                f"no provider named {name!r} (configured: {configured})"
            ) from None

    async def providers(self) -> list[dict[str, object]]:
        counts = await self._store.count_by_state()
        return [
            {
                "name": p.name,
                "grant": p.grant,
                "revocation": p.revocation_url is not None,
                "accounts": {s.value: counts.get((p.name, s.value), 0) for s in AccountState},
            }
            for p in self._providers.values()
        ]

    async def list(self, provider: str, query: ListQuery) -> Page:
        """Accounts in account-name order (sorted here: database collations differ)."""
        self.provider(provider)
        rows = sorted(await self._store.rows(provider), key=lambda r: r.account)
        wanted = [
            r
            for r in rows
            if (query.state is None or r.state == query.state.value)
            and (query.after is None or r.account > query.after)
        ]
        page = wanted if query.limit is None else wanted[: query.limit]
        more = len(page) < len(wanted)
        cursor = _encode_cursor(page[-1].account) if more else None
        return Page(provider, [self._summary(r) for r in page], cursor)

    async def get(self, provider: str, account: str) -> AccountSummary:
        self.provider(provider)
        return self._summary(await self._row(provider, account))

    async def put(self, provider: str, account: str, body: object) -> Stored:
        """Import or replace an account's token pair; the account becomes active again."""
        cfg = self.pair_provider(provider)
        problems = account_problems(account)
        token = _parse_pair(body, self._clock(), cfg.grant == "refresh_token", problems)
        if problems or token is None:
            raise InvalidInput(problems)
        return await self._store_pair(provider, account, token, "account_imported")

    async def authorize(self, provider: str, account: str, body: object) -> Stored:
        """Exchange an authorization code for the account's pair (RFC 6749 §4.1.3)."""
        self.pair_provider(provider)
        problems = account_problems(account)
        code, redirect_uri, verifier = _parse_authorization(body, problems)
        if problems:
            raise InvalidInput(problems)
        try:
            token = await self._authorizers[provider].exchange(code, redirect_uri, verifier)
        except TransientGrantError as exc:
            if not exc.outcome_unknown:
                raise
            # The provider may have used up the code: a retry will likely get invalid_grant.
            raise TransientGrantError(
                f"{exc.reason}; the code may be used up: authorize again if a retry fails",
                outcome_unknown=True,
                retry_after=exc.retry_after,
            ) from exc
        warnings: tuple[str, ...] = ()
        if token.refresh_token is None:
            warnings = (
                "the provider issued no refresh_token: the account stops working when the "
                "access token expires (some providers need offline access requested)",
            )
        stored = await self._store_pair(provider, account, token, "account_authorized")
        return Stored(stored.summary, stored.created, warnings)

    async def refresh(self, provider: str, account: str) -> AccountSummary:
        """Refresh now, unless someone else replaced the pair meanwhile (then theirs is new)."""
        cfg = self.provider(provider)
        row = await self._store.get(provider, account)
        if row is not None:
            failed: Token | None = unseal(self._cipher, row).token
        elif cfg.grant not in PAIR_GRANTS and account == CLIENT_CREDENTIALS_ACCOUNT:
            failed = None  # the provider's own token, never fetched yet: fetch the first one
        else:
            raise _unknown(provider, account)
        await self._credentials.refresh(provider, account, failed=failed)
        return await self.get(provider, account)

    async def revoke(self, provider: str, account: str, *, force: bool = False) -> Revoked:
        """Revoke the pair at the provider when it has a revocation endpoint, then delete.

        When the provider does not confirm, the account is kept (so the operator can retry)
        unless ``force``: then it is deleted anyway and the result says ``failed``.
        """
        self.provider(provider)
        row = await self._row(provider, account)
        try:
            token = unseal(self._cipher, row).token
        except DecryptError:
            if not force:
                raise
            outcome: Revoked = "failed"  # nothing to revoke with: the key is gone
        else:
            outcome = await self._revoke_tokens(provider, account, token, force)
        if not await self._store.delete(provider, account):
            raise _unknown(provider, account)  # deleted by someone else meanwhile
        self._changed(provider, account)
        log.info(
            "account_deleted", extra={"provider": provider, "account": account, "revoked": outcome}
        )
        return outcome

    async def _revoke_tokens(
        self, provider: str, account: str, token: Token, force: bool
    ) -> Revoked:
        revoker = self._revokers.get(provider)
        if revoker is None:
            return "not_configured"
        # The refresh token first: revoking it ends the grant (RFC 7009 §2.1); then the access
        # token, for providers that do not revoke a grant's access tokens with it.
        todo: list[tuple[str, Literal["access_token", "refresh_token"]]] = []
        if token.refresh_token:
            todo.append((token.refresh_token, "refresh_token"))
        if token.access_token and token.state(self._clock(), 0) is not TokenState.INVALID:
            todo.append((token.access_token, "access_token"))
        try:
            if await revoker.url() is None:  # discovered: the provider has no endpoint
                return "not_configured"
            for secret, hint in todo:
                await revoker.revoke(secret, hint)
        except GrantError as exc:
            log.warning(
                "account_revocation_failed",
                extra={"provider": provider, "account": account, "error": str(exc)},
            )
            if not force:
                raise RevocationFailed(exc) from exc
            return "failed"
        return "revoked"

    async def _store_pair(self, provider: str, account: str, token: Token, event: str) -> Stored:
        created = await self._store.get(provider, account) is None
        cred = Credential(provider, account, token, version=0, refreshed_at=self._clock())
        await self._store.upsert_many([seal(self._cipher, cred)])
        self._changed(provider, account)
        log.info(
            event,
            extra={
                "provider": provider,
                "account": account,
                "new_account": created,
                "access_fp": fingerprint(token.access_token),
            },
        )
        return Stored(await self.get(provider, account), created)

    def pair_provider(self, name: str) -> ProviderConfig:
        """The provider, when its accounts hold pairs an operator brings (else an error)."""
        cfg = self.provider(name)
        if cfg.grant not in PAIR_GRANTS:
            raise GrantNotSupported(
                f"provider {name!r} uses the {cfg.grant} grant: the sidecar gets its tokens "
                "itself, so there is no pair to import or authorize"
            )
        return cfg

    async def _row(self, provider: str, account: str) -> StoredRow:
        row = await self._store.get(provider, account)
        if row is None:
            raise _unknown(provider, account)
        return row

    def _summary(self, row: StoredRow) -> AccountSummary:
        lifetime = self._providers[row.provider].refresh_token_lifetime_seconds
        return AccountSummary(
            provider=row.provider,
            account=row.account,
            state=row.state,
            reason=row.state_reason,
            state_changed_at=row.state_changed_at,
            access_expires_at=row.expires_at,
            refresh_expires_at=(
                row.refreshed_at + lifetime if lifetime and row.refreshed_at is not None else None
            ),
            refreshed_at=row.refreshed_at,
            retry_at=self._credentials.retry_at(row.provider, row.account),
        )


def make_account_service(
    providers: Sequence[ProviderConfig],
    store: TokenStore,
    cipher: TokenCipher,
    http: HttpClient,
    credentials: CredentialManager,
    clock: Clock,
    changed: Callable[[str, str], None] = lambda provider, account: None,
    discovered: Mapping[str, Endpoints] | None = None,
) -> AccountService:
    found = discovered or endpoints_for(providers)
    endpoints = {p.name: TokenEndpoint(http, p, clock, found[p.name]) for p in providers}
    return AccountService(
        store,
        cipher,
        {p.name: p for p in providers},
        credentials,
        clock,
        authorizers={name: AuthorizationCodeGrant(e) for name, e in endpoints.items()},
        revokers={
            p.name: Revocation(http, p, endpoints[p.name])
            for p in providers
            if p.revocation_url or p.issuer
        },
        changed=changed,
    )


def _unknown(provider: str, account: str) -> UnknownAccount:
    return UnknownAccount(f"no account {account!r} for provider {provider!r}")


def _encode_cursor(account: str) -> str:
    return base64.urlsafe_b64encode(account.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> str:
    """The account a cursor names; "" when it is not one of ours."""
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, ValueError):
        return ""


def account_problems(account: str) -> list[str]:
    if not account or len(account) > MAX_ACCOUNT_CHARS or not account.isprintable():
        return [f"account: must be 1 to {MAX_ACCOUNT_CHARS} printable characters"]
    return []


def _object(body: object, allowed: frozenset[str], problems: list[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        problems.append("body: must be a JSON object")
        return {}
    problems.extend(f"{name}: unknown field" for name in sorted(set(body) - allowed))
    return body


def _string(data: dict[str, Any], name: str, problems: list[str], required: bool) -> str | None:
    value = data.get(name)
    if value is None and not required:
        return None
    if value is None:
        problems.append(f"{name}: is required")
    elif not isinstance(value, str) or not value:
        problems.append(f"{name}: must be a non-empty string")
    return value if isinstance(value, str) and value else None
    return value


def _parse_pair(
    body: object, now: float, need_refresh_token: bool, problems: list[str]
) -> Token | None:
    data = _object(body, PAIR_FIELDS, problems)
    access = _string(data, "access_token", problems, required=True)
    refresh = _string(data, "refresh_token", problems, required=need_refresh_token)
    expires_in = data.get("expires_in")
    if expires_in is not None and (
        isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in < 0
    ):
        problems.append("expires_in: must be a number of seconds, 0 or more")
    scope = data.get("scope")
    if scope is not None and not isinstance(scope, str):
        problems.append("scope: must be a string")
    if problems or access is None:
        return None
    return Token(access, refresh, None if expires_in is None else now + expires_in, scope=scope)


def _parse_authorization(body: object, problems: list[str]) -> tuple[str, str, str | None]:
    data = _object(body, AUTHORIZE_FIELDS, problems)
    code = _string(data, "code", problems, required=True)
    redirect_uri = _string(data, "redirect_uri", problems, required=True)
    if redirect_uri is not None:
        parts = urlsplit(redirect_uri)
        if not parts.scheme or parts.fragment:  # RFC 6749 §3.1.2: absolute, no fragment
            problems.append("redirect_uri: must be an absolute URI without a fragment")
    verifier = data.get("code_verifier")
    if verifier is not None and (
        not isinstance(verifier, str) or not CODE_VERIFIER.fullmatch(verifier)
    ):
        problems.append(
            "code_verifier: must be 43 to 128 characters of A-Z, a-z, 0-9, '-', '.', '_', '~' "
            "(RFC 7636 §4.1)"
        )
    return code or "", redirect_uri or "", verifier
