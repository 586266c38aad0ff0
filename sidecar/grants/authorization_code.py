"""The authorization code grant's token request, RFC 6749 §4.1.3, with PKCE (RFC 7636 §4.5).

The sidecar never meets the user: whoever ran the authorization request (an operator, an
onboarding page) hands over the code, the redirect URI it used and, with PKCE, the verifier.
"""

from __future__ import annotations

from sidecar.grants.base import TokenEndpoint
from sidecar.model import Token


class AuthorizationCodeGrant:
    def __init__(self, endpoint: TokenEndpoint) -> None:
        self._endpoint = endpoint

    async def exchange(self, code: str, redirect_uri: str, code_verifier: str | None) -> Token:
        """The token pair for a code; raises FatalGrantError (e.g. a used or expired code,
        a wrong redirect URI or verifier: all ``invalid_grant``) or TransientGrantError."""
        # §4.1.3: redirect_uri must be the one the authorization request used; client_id
        # goes in the form only for a client that does not authenticate (auth_method "none").
        params = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri}
        if code_verifier is not None:
            params["code_verifier"] = code_verifier
        return await self._endpoint.request(params)
