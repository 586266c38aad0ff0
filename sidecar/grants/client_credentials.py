"""The client credentials grant, RFC 6749 §4.4: the client's own token, no refresh token."""

from __future__ import annotations

import dataclasses

from sidecar.grants.base import TokenEndpoint
from sidecar.model import Token


class ClientCredentialsGrant:
    def __init__(self, endpoint: TokenEndpoint, scopes: tuple[str, ...]) -> None:
        self._endpoint = endpoint
        self._scopes = scopes

    async def fetch(self, current: Token | None) -> Token:
        params = {"grant_type": "client_credentials"}
        if self._scopes:
            params["scope"] = " ".join(self._scopes)
        token = await self._endpoint.request(params)
        # §4.4.3: a refresh token SHOULD NOT be included; never keep one if it is.
        return dataclasses.replace(token, refresh_token=None)
