"""Tokens at rest: AES-GCM with key ids, bound to provider and account, rotatable."""

from __future__ import annotations

import base64
import dataclasses
import sqlite3
from pathlib import Path

import pytest

from sidecar.credentials.codec import seal, unseal
from sidecar.credentials.maintenance import rotate_keys
from sidecar.crypto import TokenCipher, generate_key, key_id
from sidecar.errors import DecryptError
from sidecar.model import Credential, Token
from sidecar.store.sqlite import SCHEMA_VERSION, SQLiteStore

ACCESS, REFRESH = "AT-very-secret-access-4a1f", "RT-very-secret-refresh-9c2e"


def key() -> bytes:
    return base64.urlsafe_b64decode(generate_key())


def cred(account: str = "alice") -> Credential:
    return Credential("example", account, Token(ACCESS, REFRESH, 1234.5), version=0)


async def test_raw_database_file_holds_no_token(tmp_path: Path) -> None:
    path = tmp_path / "tokens.db"
    store = await SQLiteStore.open(str(path))
    cipher = TokenCipher([key()])
    await store.upsert_many([seal(cipher, cred())])
    assert unseal(cipher, (await store.get("example", "alice"))).token.access_token == ACCESS
    await store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert ACCESS.encode() not in raw and REFRESH.encode() not in raw
    assert b"alice" in raw  # the file really holds the row
    assert oct(path.stat().st_mode & 0o777) == "0o600"


async def test_wal_mode_and_schema_version(tmp_path: Path) -> None:
    store = await SQLiteStore.open(str(tmp_path / "t.db"))
    await store.close()
    with sqlite3.connect(tmp_path / "t.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 1


def test_row_copied_to_another_account_does_not_decrypt() -> None:
    cipher = TokenCipher([key()])
    row = seal(cipher, cred("alice"))
    copied = dataclasses.replace(row, account="mallory")
    with pytest.raises(DecryptError, match="copied from another account"):
        unseal(cipher, copied)
    with pytest.raises(DecryptError):
        unseal(cipher, dataclasses.replace(row, provider="other"))
    tampered = dataclasses.replace(row, ciphertext=row.ciphertext[:-1] + b"\x00")
    with pytest.raises(DecryptError):
        unseal(cipher, tampered)


def test_first_key_encrypts_all_keys_decrypt() -> None:
    old, new = key(), key()
    row = seal(TokenCipher([old]), cred())
    both = TokenCipher([new, old])
    assert row.key_id == key_id(old)
    assert unseal(both, row).token.refresh_token == REFRESH
    assert seal(both, cred()).key_id == key_id(new)
    with pytest.raises(DecryptError, match="no configured key"):
        unseal(TokenCipher([new]), row)


async def test_rotate_reencrypts_every_row_with_first_key(tmp_path: Path) -> None:
    old, new = key(), key()
    store = await SQLiteStore.open(str(tmp_path / "t.db"))
    await store.upsert_many([seal(TokenCipher([old]), cred(a)) for a in ("a", "b", "c")])
    await store.set_state("example", "b", "reauthorization_required", "invalid_grant", 5.0)
    cipher = TokenCipher([new, old])
    assert await rotate_keys(store, cipher) == 3
    assert await rotate_keys(store, cipher) == 0
    only_new = TokenCipher([new])
    rows = await store.rows()
    assert {r.key_id for r in rows} == {key_id(new)}
    assert [unseal(only_new, r).token.access_token for r in rows] == [ACCESS] * 3
    assert [r.state for r in rows] == ["active", "reauthorization_required", "active"]
    await store.close()


def test_token_repr_never_shows_secrets() -> None:
    text = repr(cred()) + str(Token(ACCESS, REFRESH))
    assert ACCESS not in text and REFRESH not in text
