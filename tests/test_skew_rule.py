"""The skew rule as pure functions: the refresh skew and the background lead are bounded by a
share of each token's own lifetime, so no token is STALE when it is issued."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.config import ProviderConfig
from sidecar.credentials.codec import seal, unseal
from sidecar.credentials.maintenance import clamped_settings, import_credentials
from sidecar.credentials.refresher import access_lead, account_jitter, next_refresh_at
from sidecar.crypto import TokenCipher
from sidecar.model import SKEW_SHARE, Credential, Token, TokenState, effective_skew
from sidecar.store import open_store

T0 = 1_700_000_000.0


def provider(**kw: object) -> ProviderConfig:
    base = ProviderConfig(name="p", token_url="http://x/t", grant="refresh_token", client_id="c")
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_effective_skew_is_at_most_a_tenth_of_the_lifetime() -> None:
    assert SKEW_SHARE == 0.1
    assert effective_skew(60, 4) == pytest.approx(0.4)
    assert effective_skew(60, 600) == 60  # from 10-minute tokens on, the skew as configured
    assert effective_skew(60, 3600) == 60
    assert effective_skew(1, 4) == 0.4
    assert effective_skew(60, 0) == 0
    assert effective_skew(60, None) == 60  # lifetime unknown: as configured, as before


def test_a_4_second_token_is_fresh_until_its_last_tenth() -> None:
    token = Token("a", "r", expires_at=T0 + 4, issued_at=T0)
    assert token.lifetime == 4
    assert token.state(T0, skew=60) is TokenState.FRESH  # was STALE at birth with skew 60
    assert token.state(T0 + 3.59, skew=60) is TokenState.FRESH
    assert token.state(T0 + 3.6, skew=60) is TokenState.STALE
    assert token.state(T0 + 4, skew=60) is TokenState.INVALID


def test_a_token_of_unknown_lifetime_keeps_the_configured_skew() -> None:
    token = Token("a", "r", expires_at=T0 + 4)  # a row written before receipt times were kept
    assert token.lifetime is None
    assert token.state(T0, skew=60) is TokenState.STALE


@given(
    lifetime=st.floats(min_value=0.001, max_value=1e8),
    skew=st.floats(min_value=0, max_value=1e8),
    issued=st.floats(min_value=0, max_value=4e9),
)
def test_no_token_is_stale_when_it_is_issued(lifetime: float, skew: float, issued: float) -> None:
    token = Token("a", expires_at=issued + lifetime, issued_at=issued)
    if token.expires_at is not None and token.expires_at > issued:  # not lost to rounding
        assert token.state(issued, skew) is TokenState.FRESH


@given(
    lifetime=st.floats(min_value=0.01, max_value=1e7),
    skew=st.floats(min_value=0.01, max_value=1e5),
    lead_fraction=st.floats(min_value=0, max_value=0.99),
    lead_seconds=st.floats(min_value=0, max_value=1e6),
)
def test_background_lead_is_at_most_half_and_never_shorter_than_the_skew(
    lifetime: float, skew: float, lead_fraction: float, lead_seconds: float
) -> None:
    p = provider(
        refresh_skew_seconds=skew,
        refresh_lead_fraction=lead_fraction,
        refresh_lead_seconds=lead_seconds,
    )
    lead = access_lead(p, lifetime)
    assert effective_skew(skew, lifetime) <= lead <= lifetime / 2


def test_a_short_lead_is_raised_to_the_skew_so_requests_never_wait() -> None:
    p = provider(refresh_lead_fraction=0.02, refresh_jitter_fraction=0)
    assert access_lead(p, 4) == pytest.approx(0.4)  # the skew, not 2 % (0.08 s)
    assert next_refresh_at(p, "a", expires_at=T0 + 4, refreshed_at=T0) == pytest.approx(T0 + 3.6)


def test_default_background_schedule_refreshes_at_most_1_25_times_per_lifetime() -> None:
    """10-20 % of the lifetime is left at the background refresh, whatever the lifetime."""
    p = provider()
    for lifetime in (4, 8, 20, 300, 3600, 86400):
        for i in range(100):
            at = next_refresh_at(p, f"u{i}", expires_at=T0 + lifetime, refreshed_at=T0)
            assert at is not None
            used = (at - T0) / lifetime
            assert 0.8 < used <= 0.9
            assert 1 / used < 1.25
    jitter = account_jitter("p", "u0")
    at = next_refresh_at(p, "u0", expires_at=T0 + 4, refreshed_at=T0)
    assert at == pytest.approx(T0 + 4 - 0.4 - jitter * 0.4)


def test_the_receipt_time_travels_in_the_row_not_in_the_sealed_json() -> None:
    """Older releases read the sealed JSON with exactly its five keys, so it stays as it was;
    the row's refreshed_at, written with every pair, is when the pair was received."""
    cipher = TokenCipher([b"k" * 32])
    token = Token("a", "r", expires_at=T0 + 4, issued_at=T0)
    row = seal(cipher, Credential("p", "acct", token, 1, refreshed_at=T0))
    plain = cipher.decrypt(row.key_id, row.ciphertext, "p", "acct")
    assert set(json.loads(plain)) == {
        "access_token",
        "refresh_token",
        "expires_at",
        "token_type",
        "scope",
    }
    assert unseal(cipher, row).token == token
    legacy = dataclasses.replace(row, refreshed_at=None)
    assert unseal(cipher, legacy).token.issued_at is None


def test_sealed_json_from_a_newer_release_still_opens() -> None:
    data = json.dumps({"access_token": "a", "expires_at": T0, "added_later": 1}).encode()
    assert Token.from_json(data) == Token("a", expires_at=T0)


async def test_check_config_warns_only_where_stored_lifetimes_cut_a_setting() -> None:
    store = await open_store("memory://")
    cipher = TokenCipher([b"k" * 32])
    short = provider(name="short", refresh_lead_seconds=30, refresh_lead_fraction=0.6)
    long = provider(name="long", refresh_lead_seconds=30)
    unused = provider(name="unused", refresh_skew_seconds=600)
    creds = [
        Credential("short", "a", Token("x", "r", expires_at=T0 + 20), 0, refreshed_at=T0),
        Credential("short", "b", Token("x", "r", expires_at=T0 + 8), 0, refreshed_at=T0),
        Credential("short", "c", Token("x", "r", expires_at=T0 + 8), 0),  # lifetime unknown
        Credential("long", "a", Token("x", "r", expires_at=T0 + 3600), 0, refreshed_at=T0),
    ]
    await import_credentials(store, cipher, creds)
    whose = "for provider 'short''s 8-s tokens (the shortest lifetime of 2 stored)"
    assert await clamped_settings(store, [short, long, unused]) == [
        f"provider[0].refresh_skew_seconds: 60 s is cut to 0.8 s {whose}: the skew is at most "
        "0.1 of a token's lifetime",
        f"provider[0].refresh_lead_seconds: 30 s is cut to 4 s {whose}: the background lead is "
        "at most half the lifetime",
        f"provider[0].refresh_lead_fraction: 0.6 is cut to 0.5 {whose}: the background lead is "
        "at most half the lifetime",
    ]
    await store.close()
