"""The JWT bearer grant, RFC 7523 §2.1: a signed assertion is the grant.

Like client_credentials, the provider has one token, and a new one can be had at any time by
signing a new assertion, so no refresh token is ever kept.
"""

from __future__ import annotations

import dataclasses

from sidecar.grants.assertion import GRANT_TYPE, AssertionSigner
from sidecar.grants.base import TokenEndpoint
from sidecar.model import Token


class JwtBearerGrant:
    def __init__(
        self, endpoint: TokenEndpoint, signer: AssertionSigner, scopes: tuple[str, ...]
    ) -> None:
        self._endpoint = endpoint
        self._signer = signer
        self._scopes = scopes

    async def fetch(self, current: Token | None) -> Token:
        params = {"grant_type": GRANT_TYPE, "assertion": self._signer.for_grant()}
        if self._scopes:
            params["scope"] = " ".join(self._scopes)  # RFC 7521 §4.1
        token = await self._endpoint.request(params)
        return dataclasses.replace(token, refresh_token=None)
