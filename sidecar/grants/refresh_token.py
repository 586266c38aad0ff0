"""The refresh token grant, RFC 6749 §6."""

from __future__ import annotations

from sidecar.errors import FatalGrantError
from sidecar.grants.base import TokenEndpoint
from sidecar.model import Token


class RefreshTokenGrant:
    def __init__(self, endpoint: TokenEndpoint, scopes: tuple[str, ...]) -> None:
        self._endpoint = endpoint
        self._scopes = scopes

    async def fetch(self, current: Token | None) -> Token:
        if current is None or not current.refresh_token:
            raise FatalGrantError("invalid_grant", "no refresh token is stored for this account")
        params = {"grant_type": "refresh_token", "refresh_token": current.refresh_token}
        if self._scopes:
            params["scope"] = " ".join(self._scopes)
        return await self._endpoint.request(params)
