"""Token revocation, RFC 7009: tell the provider a token is no longer needed.

The request is authenticated like a token request (§2.1). The provider answers 200 whether or
not the token was still valid (§2.2), ``unsupported_token_type`` for a kind of token it cannot
revoke, and 503 when it wants the client to retry later (§2.2.1).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Literal
from urllib.parse import urlencode

from sidecar.config import ProviderConfig
from sidecar.errors import FatalGrantError, TransientGrantError
from sidecar.grants.base import TokenEndpoint, header
from sidecar.http.client import HttpClient, UpstreamError

TokenHint = Literal["access_token", "refresh_token"]


class Revocation:
    def __init__(self, http: HttpClient, provider: ProviderConfig, endpoint: TokenEndpoint) -> None:
        if provider.revocation_url is None and provider.issuer is None:
            raise ValueError(f"provider {provider.name!r} has no revocation_url")
        self._http, self._endpoint = http, endpoint
        self._timeout = provider.timeout_seconds

    async def url(self) -> str | None:
        """The configured endpoint, else the discovered one (None: the provider has none)."""
        return await self._endpoint.endpoints.revocation_url()

    async def revoke(self, token: str, hint: TokenHint) -> bool:
        """True when the token is revoked (or was already invalid); False when the provider
        cannot revoke this kind of token. Raises FatalGrantError or TransientGrantError."""
        # Client authentication exactly as at the token endpoint (§2.1).
        form, headers = self._endpoint._authenticate({"token": token, "token_type_hint": hint})
        body = urlencode(form).encode("ascii")
        url = await self.url()
        if url is None:
            raise ValueError("no revocation endpoint: check url() first")
        try:
            reply = await self._http.post(url, body, headers, self._timeout)
        except (TimeoutError, UpstreamError) as exc:
            raise TransientGrantError(f"revocation failed: {type(exc).__name__}") from None
        return classify_revocation(reply.status, reply.headers, reply.body)


def classify_revocation(status: int, headers: Mapping[str, str], body: bytes) -> bool:
    if status == 200:
        return True
    error, description = _oauth_error(body)
    if status == 400 and error == "unsupported_token_type":
        return False
    if status in (400, 401) and error is not None:
        raise FatalGrantError(error, description)
    retry_after = header(headers, "retry-after")
    raise TransientGrantError(
        f"revocation endpoint answered HTTP {status}",
        retry_after=float(retry_after) if retry_after.isdigit() else None,
    )


def _oauth_error(body: bytes) -> tuple[str | None, str]:
    """RFC 6749 §5.2 ``error`` and ``error_description``, read from JSON, never by substring."""
    try:
        data = json.loads(body)
    except ValueError:
        return None, ""
    if not isinstance(data, dict) or not isinstance(data.get("error"), str):
        return None, ""
    description = data.get("error_description")
    return data["error"], description if isinstance(description, str) else ""
