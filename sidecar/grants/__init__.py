"""Ways to get tokens from a provider's token endpoint."""

from __future__ import annotations

from sidecar.config import ProviderConfig
from sidecar.grants.assertion import AssertionSigner
from sidecar.grants.base import Grant, TokenEndpoint
from sidecar.grants.client_credentials import ClientCredentialsGrant
from sidecar.grants.discovery import Endpoints
from sidecar.grants.jwt_bearer import JwtBearerGrant
from sidecar.grants.refresh_token import RefreshTokenGrant
from sidecar.http.client import HttpClient
from sidecar.model import Clock

__all__ = ["Grant", "TokenEndpoint", "make_grant"]


def make_grant(
    http: HttpClient, provider: ProviderConfig, clock: Clock, endpoints: Endpoints | None = None
) -> Grant:
    endpoint = TokenEndpoint(http, provider, clock, endpoints)
    if provider.grant == "client_credentials":
        return ClientCredentialsGrant(endpoint, provider.scopes)
    if provider.grant == "jwt_bearer":
        return JwtBearerGrant(endpoint, AssertionSigner(provider, clock), provider.scopes)
    return RefreshTokenGrant(endpoint, provider.scopes)
