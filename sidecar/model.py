"""Tokens and their freshness: pure values and functions, no I/O.

Expiry is stored as an absolute time computed when the token is received (an ``expires_in``
relative to some forgotten moment is useless after a restart). Freshness is a pure function of
the token, the time and the refresh skew, as in google-auth's ``TokenState``.

The skew is bounded by a share of the token's own lifetime (``effective_skew``): a skew longer
than the lifetime would make a token STALE when it is issued, and every request would then wait
for a refresh. So a token knows when it was received (``issued_at``) as well as when it expires.
"""

from __future__ import annotations

import enum
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

SKEW_SHARE = 0.1
"""The most of a token's lifetime the refresh skew may take. A token refreshed on demand is
replaced once it is inside its skew, so a skew of share ``s`` costs ``1 / (1 - s)`` refreshes
per lifetime: 1.11 for a tenth, 2 for a half (a 4-s token would be refreshed every 2 s).
A tenth still leaves room for what the skew is for, a request in transit and clocks that
disagree: 0.4 s of a 4-s token, the whole 60-s default from 10-minute tokens on."""

Clock = Callable[[], float]
"""Returns the current time in seconds since the epoch. Injected everywhere time matters."""

system_clock: Clock = time.time


class TokenState(enum.Enum):
    FRESH = "fresh"  # use it
    STALE = "stale"  # still valid, but inside the refresh skew: refresh before use
    INVALID = "invalid"  # expired: never inject it


class AccountState(enum.StrEnum):
    ACTIVE = "active"
    REAUTHORIZATION_REQUIRED = "reauthorization_required"


@dataclass(frozen=True, slots=True)
class Token:
    access_token: str
    refresh_token: str | None = None
    expires_at: float | None = None  # absolute epoch seconds; None: the provider did not say
    token_type: str = "Bearer"
    scope: str | None = None
    # When the token was received (epoch seconds); None: not known (rows from older releases).
    # Kept in the row (refreshed_at), not in the sealed JSON, which older releases read too.
    issued_at: float | None = None

    @property
    def lifetime(self) -> float | None:
        """Seconds from receipt to expiry, when both are known."""
        if self.expires_at is None or self.issued_at is None:
            return None
        return max(self.expires_at - self.issued_at, 0.0)

    def state(self, now: float, skew: float) -> TokenState:
        """FRESH, STALE or INVALID at ``now`` with the configured ``skew``, bounded by
        ``effective_skew`` for this token's lifetime."""
        if self.expires_at is None:
            return TokenState.FRESH
        if now >= self.expires_at:
            return TokenState.INVALID
        if now >= self.expires_at - effective_skew(skew, self.lifetime):
            return TokenState.STALE
        return TokenState.FRESH

    def rotated(self, newer: Token) -> Token:
        """The pair after a refresh: a response without refresh_token keeps the old one."""
        if newer.refresh_token is None:
            return replace(newer, refresh_token=self.refresh_token)
        return newer

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "access_token": self.access_token,
                "refresh_token": self.refresh_token,
                "expires_at": self.expires_at,
                "token_type": self.token_type,
                "scope": self.scope,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Token:
        """The sealed JSON; keys this release does not know (from a newer one) are ignored."""
        raw: dict[str, Any] = json.loads(data)
        return cls(**{k: v for k, v in raw.items() if k in _SEALED})

    def __repr__(self) -> str:  # never show secrets, even in a traceback
        return (
            f"Token(access={fingerprint(self.access_token)}, "
            f"refresh={fingerprint(self.refresh_token)}, expires_at={self.expires_at})"
        )


_SEALED = frozenset(("access_token", "refresh_token", "expires_at", "token_type", "scope"))


def effective_skew(skew: float, lifetime: float | None) -> float:
    """The configured refresh skew, but at most ``SKEW_SHARE`` of the token's lifetime, so no
    token is STALE when it is issued. An unknown lifetime leaves the skew as configured."""
    if lifetime is None:
        return skew
    return min(skew, SKEW_SHARE * lifetime)


def fingerprint(secret: str | None) -> str:
    """A short, non-reversible name for a secret, safe to log."""
    if secret is None:
        return "-"
    return hashlib.sha256(secret.encode()).hexdigest()[:10]


@dataclass(frozen=True, slots=True)
class Credential:
    """An account's token pair with its bookkeeping, as the credentials layer sees it."""

    provider: str
    account: str
    token: Token
    version: int
    state: AccountState = AccountState.ACTIVE
    state_reason: str | None = None
    state_changed_at: float | None = None
    refreshed_at: float | None = None
