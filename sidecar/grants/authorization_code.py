"""The authorization code grant: the authorization request (RFC 6749 §4.1.1) with PKCE (RFC
7636) and ``state``, and the token request (§4.1.3) that exchanges the code.

The sidecar either builds the authorization request itself (``sidecar accounts connect``, the
admin API's ``connect``) or is handed a code that someone else obtained (``authorize``): then
they pass the redirect URI they used and, with PKCE, the verifier.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit

from sidecar.config import ProviderConfig
from sidecar.grants.base import TokenEndpoint
from sidecar.model import Token


@dataclass(frozen=True, slots=True)
class AuthorizationRequest:
    """One authorization request: the URL for the browser and the secrets that finish it."""

    url: str = field(repr=False)  # holds the state
    redirect_uri: str
    state: str = field(repr=False)
    code_verifier: str = field(repr=False)


def code_challenge(verifier: str) -> str:
    """RFC 7636 §4.2, S256: BASE64URL(SHA256(ASCII(code_verifier))) without padding."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def authorization_request(
    provider: ProviderConfig, authorization_url: str, redirect_uri: str
) -> AuthorizationRequest:
    """A fresh request: an unguessable ``state`` (RFC 6749 §10.12) and PKCE verifier
    (RFC 7636 §4.1: 43 to 128 unreserved characters; 64 here, 384 bits)."""
    state, verifier = secrets.token_urlsafe(32), secrets.token_urlsafe(48)
    params = [
        ("response_type", "code"),
        ("client_id", provider.client_id),
        ("redirect_uri", redirect_uri),
        ("state", state),
        ("code_challenge", code_challenge(verifier)),
        ("code_challenge_method", "S256"),
    ]
    if provider.scopes:
        params.append(("scope", " ".join(provider.scopes)))
    params += [("audience", a) for a in provider.audience]
    params += [("resource", r) for r in provider.resource]  # RFC 8707 §2.1
    # §3.1: the endpoint URL may carry a query of its own, which must be kept.
    separator = "&" if urlsplit(authorization_url).query else "?"
    url = authorization_url + separator + urlencode(params)
    return AuthorizationRequest(url, redirect_uri, state, verifier)


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
