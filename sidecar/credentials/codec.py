"""Sealing credentials into store rows and opening them again: the store sees only ciphertext."""

from __future__ import annotations

import dataclasses

from sidecar.crypto import TokenCipher
from sidecar.model import AccountState, Credential, Token
from sidecar.store.base import StoredRow


def seal(cipher: TokenCipher, cred: Credential) -> StoredRow:
    kid, blob = cipher.encrypt(cred.token.to_json(), cred.provider, cred.account)
    return StoredRow(
        provider=cred.provider,
        account=cred.account,
        key_id=kid,
        ciphertext=blob,
        expires_at=cred.token.expires_at,
        version=cred.version,
        state=cred.state.value,
        state_reason=cred.state_reason,
        state_changed_at=cred.state_changed_at,
        refreshed_at=cred.refreshed_at,
    )


def unseal(cipher: TokenCipher, row: StoredRow) -> Credential:
    plain = cipher.decrypt(row.key_id, row.ciphertext, row.provider, row.account)
    return Credential(
        provider=row.provider,
        account=row.account,
        # The row's refresh time is when this pair was received: every write of a pair sets it.
        token=dataclasses.replace(Token.from_json(plain), issued_at=row.refreshed_at),
        version=row.version,
        state=AccountState(row.state),
        state_reason=row.state_reason,
        state_changed_at=row.state_changed_at,
        refreshed_at=row.refreshed_at,
    )
