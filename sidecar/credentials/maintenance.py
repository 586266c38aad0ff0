"""Operator tasks on stored credentials: importing first token pairs, rotating keys, and
checking the configuration against what the store holds."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterable
from typing import Any

from sidecar.config import CLIENT_CREDENTIALS_ACCOUNT, ProviderConfig
from sidecar.credentials.codec import seal, unseal
from sidecar.crypto import TokenCipher
from sidecar.errors import ConfigError, SidecarError
from sidecar.model import SKEW_SHARE, AccountState, Credential, Token, effective_skew
from sidecar.store import TokenStore


class BadImport(SidecarError):
    """Some lines of an import are bad; ``problems`` names each by line number."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"{len(problems)} bad line(s)")
        self.problems = problems


def parse_import(
    lines: Iterable[str], provider: str, now: float, need_refresh_token: bool
) -> list[Credential]:
    """Validate every line first, so a bad line means nothing is imported."""
    creds: dict[str, Credential] = {}
    problems: list[str] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            cred = _parse_line(line, provider, now, need_refresh_token)
        except ValueError as exc:
            problems.append(f"line {n}: {exc}")
            continue
        if cred.account in creds:
            problems.append(f"line {n}: account {cred.account!r} appears twice")
        creds[cred.account] = cred
    if problems:
        raise BadImport(problems)
    return list(creds.values())


def _parse_line(line: str, provider: str, now: float, need_refresh_token: bool) -> Credential:
    try:
        data: Any = json.loads(line)
    except ValueError:
        raise ValueError("not a JSON object") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    unknown = set(data) - {"account", "access_token", "refresh_token", "expires_in", "scope"}
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
    for field in ("account", "access_token"):
        if not isinstance(data.get(field), str) or not data[field]:
            raise ValueError(f"{field} must be a non-empty string")
    refresh = data.get("refresh_token")
    if refresh is not None and (not isinstance(refresh, str) or not refresh):
        raise ValueError("refresh_token must be a non-empty string")
    if refresh is None and need_refresh_token:
        raise ValueError("refresh_token is required for a refresh_token provider")
    expires_in = data.get("expires_in")
    if expires_in is not None and (
        isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in < 0
    ):
        raise ValueError("expires_in must be a number of seconds, 0 or more")
    token = Token(
        access_token=data["access_token"],
        refresh_token=refresh,
        expires_at=None if expires_in is None else now + expires_in,
        scope=data.get("scope") if isinstance(data.get("scope"), str) else None,
        issued_at=now,
    )
    return Credential(provider, data["account"], token, version=0, refreshed_at=now)


async def import_credentials(
    store: TokenStore, cipher: TokenCipher, creds: list[Credential]
) -> None:
    """Write every pair in one transaction; an account that existed is replaced and reactivated."""
    await store.upsert_many([seal(cipher, c) for c in creds])


async def rotate_keys(store: TokenStore, cipher: TokenCipher) -> int:
    """Re-encrypt every row not already under the first key; returns how many changed.

    Each row is written with compare-and-swap, so a refresh that lands meanwhile wins and
    its row (already encrypted with the first key) is left alone.
    """
    changed = 0
    for row in await store.rows():
        if row.key_id == cipher.current_key_id:
            continue
        resealed = dataclasses.replace(
            seal(cipher, unseal(cipher, row)), refresh_attempt_at=row.refresh_attempt_at
        )
        if await store.compare_and_swap(resealed, row.version):
            changed += 1
    return changed


async def check_keys(store: TokenStore, cipher: TokenCipher) -> int:
    """Refuse a key file that cannot decrypt what the store holds; return the rows checked.

    Each row names the key that sealed it, and a key id is derived from the key itself, so
    comparing ids finds a wrong or incomplete key file before any request fails on it.
    """
    in_use = Counter(row.key_id for row in await store.rows())
    missing = sorted(set(in_use) - cipher.key_ids)
    if missing:
        found = ", ".join(
            f"{kid} ({in_use[kid]} row{'s' if in_use[kid] > 1 else ''})" for kid in sorted(in_use)
        )
        raise ConfigError(
            [
                f"store.key_file: the store holds rows no configured key can decrypt "
                f"(key id(s) in use: {found}; configured: {', '.join(sorted(cipher.key_ids))}; "
                f"missing: {', '.join(missing)}): add the missing key(s) to the key file"
            ]
        )
    return sum(in_use.values())


async def clamped_settings(store: TokenStore, providers: Iterable[ProviderConfig]) -> list[str]:
    """Configured durations that the lifetime bounds shorten for the tokens a provider issues.

    The lifetimes are those of the stored tokens (receipt to expiry), the only record of what
    a provider actually issues that is at hand without calling it; a provider with no stored
    token yet is not judged. The shortest lifetime is the one a warning names.
    """
    lifetimes: dict[str, list[float]] = {}
    for row in await store.rows():
        if row.expires_at is not None and row.refreshed_at is not None:
            lifetime = max(row.expires_at - row.refreshed_at, 0.0)
            lifetimes.setdefault(row.provider, []).append(lifetime)
    warnings = []
    for i, provider in enumerate(providers):
        if provider.name in lifetimes:
            seen = lifetimes[provider.name]
            warnings += _clamped(f"provider[{i}]", provider, min(seen), len(seen))
    return warnings


def _clamped(path: str, provider: ProviderConfig, lifetime: float, tokens: int) -> list[str]:
    whose = (
        f"for provider {provider.name!r}'s {lifetime:g}-s tokens "
        f"(the shortest lifetime of {tokens} stored)"
    )
    warnings = []
    skew = effective_skew(provider.refresh_skew_seconds, lifetime)
    if skew < provider.refresh_skew_seconds:
        warnings.append(
            f"{path}.refresh_skew_seconds: {provider.refresh_skew_seconds:g} s is cut to "
            f"{skew:g} s {whose}: the skew is at most {SKEW_SHARE:g} of a token's lifetime"
        )
    if provider.refresh_lead_seconds > lifetime / 2:
        warnings.append(
            f"{path}.refresh_lead_seconds: {provider.refresh_lead_seconds:g} s is cut to "
            f"{lifetime / 2:g} s {whose}: the background lead is at most half the lifetime"
        )
    if provider.refresh_lead_fraction > 0.5:
        warnings.append(
            f"{path}.refresh_lead_fraction: {provider.refresh_lead_fraction:g} is cut to 0.5 "
            f"{whose}: the background lead is at most half the lifetime"
        )
    return warnings


async def reset_client_credentials(
    store: TokenStore, providers: Iterable[ProviderConfig], now: float
) -> None:
    """A single-token provider's failure is fixed in config, so a restart clears its mark."""
    for provider in providers:
        if provider.single_token:
            await store.set_state(
                provider.name, CLIENT_CREDENTIALS_ACCOUNT, AccountState.ACTIVE.value, None, now
            )
