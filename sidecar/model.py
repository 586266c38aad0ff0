"""Tokens and their freshness: pure values and functions, no I/O.

Expiry is stored as an absolute time computed when the token is received (an ``expires_in``
relative to some forgotten moment is useless after a restart). Freshness is a pure function of
the token, the time and the refresh skew, as in google-auth's ``TokenState``.
"""

from __future__ import annotations

import enum
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

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

    def state(self, now: float, skew: float) -> TokenState:
        if self.expires_at is None:
            return TokenState.FRESH
        if now >= self.expires_at:
            return TokenState.INVALID
        if now >= self.expires_at - skew:
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
        raw: dict[str, Any] = json.loads(data)
        return cls(**raw)

    def __repr__(self) -> str:  # never show secrets, even in a traceback
        return (
            f"Token(access={fingerprint(self.access_token)}, "
            f"refresh={fingerprint(self.refresh_token)}, expires_at={self.expires_at})"
        )


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
