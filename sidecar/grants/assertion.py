"""JWT assertions, RFC 7523: as an authorization grant (§2.1) and as client authentication (§2.2).

Claims (§3): ``iss``, ``sub``, ``aud``, ``exp``, ``iat`` and a unique ``jti``. For client
authentication ``iss`` and ``sub`` are both the client_id (§3 items 1-2, OIDC Core §9
``private_key_jwt``); for the grant they name whoever the provider expects, defaulting to the
client_id. ``aud`` defaults to the token endpoint URL, which both documents allow (§3 item 3,
OIDC Core §9 "SHOULD be the URL of the Authorization Server's Token Endpoint"). Every assertion
is made just before it is sent and expires shortly after (§3 item 4); a fresh ``jti`` each time
lets the provider refuse replays (§3 item 7), so a retry never reuses one.
"""

from __future__ import annotations

import secrets

from sidecar.config import ProviderConfig
from sidecar.crypto import sign_jwt
from sidecar.model import Clock

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"  # RFC 7523 §2.1
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"  # §2.2


class AssertionSigner:
    """Makes signed assertions for one provider, dated by the injected clock."""

    def __init__(self, provider: ProviderConfig, clock: Clock) -> None:
        if provider.assertion is None:
            raise ValueError(f"provider {provider.name!r} has no signing key configured")
        self._settings = provider.assertion
        self._client_id = provider.client_id
        # Without a token_url (discovered later), the issuer identifier is an audience
        # RFC 7523 §3 item 3 allows as well.
        self._audience = provider.assertion.audience or provider.token_url or provider.issuer or ""
        self._clock = clock

    def for_grant(self) -> str:
        """The ``assertion`` of a jwt-bearer grant request (RFC 7523 §2.1)."""
        s = self._settings
        return self._sign(s.issuer or self._client_id, s.subject or self._client_id)

    def for_client(self) -> str:
        """The ``client_assertion`` that authenticates the client (RFC 7523 §2.2)."""
        return self._sign(self._client_id, self._client_id)

    def _sign(self, issuer: str, subject: str) -> str:
        s = self._settings
        now = int(self._clock())
        claims = {
            "iss": issuer,
            "sub": subject,
            "aud": self._audience,
            "iat": now,
            "exp": now + s.lifetime_seconds,
            "jti": secrets.token_urlsafe(18),
        }
        return sign_jwt(claims, s.key, s.algorithm, s.key_id)
