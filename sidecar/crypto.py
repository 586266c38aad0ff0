"""Encryption of token pairs at rest (AES-256-GCM with key ids and rotation), and JWT signing.

The store only ever sees ciphertext. Each ciphertext records which key made it, so several keys
can be configured at once: the first encrypts, all decrypt, and ``sidecar keys rotate``
re-encrypts every row with the first. The associated data binds a ciphertext to its provider and
account, so a row copied onto another account does not decrypt.

JWTs (RFC 7519) are signed by PyJWT, a well-kept library, never by hand; this module is the
only one that imports it. What the claims say is the grants' business (grants/assertion.py).
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sidecar.config import SigningKey
from sidecar.errors import DecryptError

NONCE_BYTES = 12  # NIST SP 800-38D §8.2: 96-bit random nonces


def key_id(key: bytes) -> str:
    """A short public name for a key, derived from it, so no id has to be configured."""
    return hashlib.sha256(b"oauth-sidecar key id\x00" + key).hexdigest()[:12]


def generate_key() -> str:
    """A new key, as one line of a key file."""
    return base64.urlsafe_b64encode(AESGCM.generate_key(bit_length=256)).decode()


def associated_data(provider: str, account: str) -> bytes:
    # Length-prefixed, so ("a\x00b", "c") and ("a", "b\x00c") cannot collide.
    p, a = provider.encode(), account.encode()
    return len(p).to_bytes(4, "big") + p + len(a).to_bytes(4, "big") + a


class TokenCipher:
    def __init__(self, keys: tuple[bytes, ...] | list[bytes]) -> None:
        if not keys:
            raise ValueError("at least one key is required")
        self._keys = {key_id(k): AESGCM(k) for k in keys}
        self.current_key_id = key_id(keys[0])

    @property
    def key_ids(self) -> frozenset[str]:
        """The ids of every configured key: rows sealed with any other id cannot be read."""
        return frozenset(self._keys)

    def encrypt(self, plaintext: bytes, provider: str, account: str) -> tuple[str, bytes]:
        nonce = os.urandom(NONCE_BYTES)
        aead = self._keys[self.current_key_id]
        sealed = aead.encrypt(nonce, plaintext, associated_data(provider, account))
        return self.current_key_id, nonce + sealed

    def decrypt(self, kid: str, blob: bytes, provider: str, account: str) -> bytes:
        aead = self._keys.get(kid)
        if aead is None:
            raise DecryptError(f"no configured key has id {kid}")
        try:
            return aead.decrypt(
                blob[:NONCE_BYTES], blob[NONCE_BYTES:], associated_data(provider, account)
            )
        except InvalidTag:
            raise DecryptError(
                f"ciphertext for {provider}/{account} does not authenticate "
                f"(tampered, or copied from another account)"
            ) from None


def sign_jwt(
    claims: Mapping[str, object], key: SigningKey, algorithm: str, key_id: str | None
) -> str:
    """A compact JWS (RFC 7515 §7.1) over ``claims``; ``key_id`` becomes the ``kid`` header."""
    headers = {"kid": key_id} if key_id else None
    import jwt  # on demand: only JWT-using providers pay for PyJWT's imports

    return jwt.encode(dict(claims), key, algorithm=algorithm, headers=headers)
