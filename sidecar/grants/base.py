"""Talking to a token endpoint: client authentication, RFC 6749 §5.1/§5.2 parsing, error classes.

Every way a provider can answer is classified at one seam, ``classify``: a token, a fatal error
(the grant or client is dead: mark the account, never retry by ourselves), or a transient error
(back off and retry). Errors are read from the JSON ``error`` field, never by substring; where a
provider puts them elsewhere or names them otherwise, ``quirks.oauth_error`` reads them first.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping
from typing import Any, Protocol
from urllib.parse import quote_plus, urlencode

from sidecar.config import ProviderConfig, ProviderQuirks
from sidecar.errors import FatalGrantError, TransientGrantError
from sidecar.grants.assertion import CLIENT_ASSERTION_TYPE, AssertionSigner
from sidecar.grants.discovery import Endpoints
from sidecar.grants.quirks import STANDARD, oauth_error
from sidecar.http.client import ConnectFailed, HttpClient, UpstreamError
from sidecar.model import Clock, Token

# RFC 6749 §5.2 codes that no retry can fix: the grant or the client itself is rejected.
FATAL_ERRORS = frozenset(
    {
        "invalid_grant",
        "invalid_client",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
    }
)


class Grant(Protocol):
    """One way of getting a token pair from a provider."""

    async def fetch(self, current: Token | None) -> Token:
        """A new token; raises FatalGrantError or TransientGrantError."""


class TokenEndpoint:
    """POSTs grant parameters with the client's credentials and parses the answer."""

    def __init__(
        self,
        http: HttpClient,
        provider: ProviderConfig,
        clock: Clock,
        endpoints: Endpoints | None = None,
    ) -> None:
        self._http = http
        self._provider = provider
        self.endpoints = endpoints or Endpoints(provider)
        self._clock = clock
        self._signer = (
            AssertionSigner(provider, clock) if provider.auth_method == "private_key_jwt" else None
        )

    async def request(self, params: Mapping[str, str]) -> Token:
        url = await self.endpoints.token_url()  # DiscoveryFailed before anything is sent
        form, headers = self._authenticate(dict(params))
        received_at = self._clock()  # expiry counts from the request, erring early
        try:
            reply = await self._http.post(
                url,
                urlencode(self._fields(form)).encode("ascii"),
                headers,
                self._provider.timeout_seconds,
            )
        except ConnectFailed as exc:
            raise TransientGrantError(str(exc)) from None
        except TimeoutError:
            # The request may have been processed: the provider may have rotated already.
            raise TransientGrantError(
                "timed out", outcome_unknown=True, lost_cause="timeout"
            ) from None
        except UpstreamError as exc:
            raise TransientGrantError(f"connection failed: {exc}", outcome_unknown=True) from None
        return classify(reply.status, reply.headers, reply.body, received_at, self._provider.quirks)

    def _authenticate(self, form: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
        """Client authentication, RFC 6749 §2.3.1."""
        p = self._provider
        headers = {
            "Accept": "application/json",
            "Content-Type": "application/x-www-form-urlencoded",
        }
        if p.auth_method == "client_secret_basic":
            # The id and secret are form-urlencoded before base64 (§2.3.1).
            pair = f"{quote_plus(p.client_id)}:{quote_plus(p.client_secret or '')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        elif p.auth_method == "client_secret_post":
            form["client_id"], form["client_secret"] = p.client_id, p.client_secret or ""
        elif self._signer is not None:
            # RFC 7523 §2.2. client_id is optional beside an assertion (RFC 7521 §4.2), but
            # some providers (Microsoft's) require it.
            form["client_id"] = p.client_id
            form["client_assertion_type"] = CLIENT_ASSERTION_TYPE
            form["client_assertion"] = self._signer.for_client()
        else:
            form["client_id"] = p.client_id
        return form, headers

    def _fields(self, form: dict[str, str]) -> list[tuple[str, str]]:
        """The form with the provider's extra parameters; audience and resource may repeat."""
        p = self._provider
        return [
            *form.items(),
            *p.extra_params,  # config rejects names that would replace the ones above
            *(("audience", a) for a in p.audience),
            *(("resource", r) for r in p.resource),  # RFC 8707 §2
        ]


def classify(
    status: int,
    headers: Mapping[str, str],
    body: bytes,
    received_at: float,
    quirks: ProviderQuirks = STANDARD,
) -> Token:
    """Turn a token endpoint's answer into a Token or a classified error."""
    data = _json_object(body)
    error = oauth_error(status, data, quirks)
    if error is not None and error.code in FATAL_ERRORS:
        said = f" (the provider said {error.sent!r})" if error.sent != error.code else ""
        raise FatalGrantError(error.code, error.description + said)
    if error is not None:
        raise TransientGrantError(
            f"token endpoint error {error.sent!r} (HTTP {status})",
            retry_after=_retry_after(headers),
        )
    if status == 200:
        if data is None:
            raise TransientGrantError("token response is not a JSON object")
        return _token(data, received_at)
    raise TransientGrantError(
        f"token endpoint answered HTTP {status}", retry_after=_retry_after(headers)
    )


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _token(data: dict[str, Any], received_at: float) -> Token:
    """RFC 6749 §5.1; anything missing or malformed is an incomplete answer (transient)."""
    access = data.get("access_token")
    token_type = data.get("token_type", "Bearer")
    refresh = data.get("refresh_token")
    expires_in = data.get("expires_in")
    scope = data.get("scope")
    if not isinstance(access, str) or not access:
        raise TransientGrantError("token response has no access_token")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise TransientGrantError(f"token response has unsupported token_type {token_type!r}")
    if refresh is not None and (not isinstance(refresh, str) or not refresh):
        raise TransientGrantError("token response has a malformed refresh_token")
    return Token(
        access_token=access,
        refresh_token=refresh,
        expires_at=None if expires_in is None else received_at + _seconds(expires_in),
        scope=scope if isinstance(scope, str) else None,
        issued_at=received_at,
    )


def _seconds(expires_in: object) -> float:
    # Some providers send expires_in as a string; accept any finite non-negative number.
    try:
        value = float(expires_in)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(expires_in, bool) or not math.isfinite(value) or value < 0:
        raise TransientGrantError(f"token response has a malformed expires_in {expires_in!r}")
    return value


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = header(headers, "retry-after")
    return float(value) if value.isdigit() else None


def header(headers: Mapping[str, str], name: str) -> str:
    """A header's value by its lower-case name, whatever case the mapping uses ("" if absent)."""
    return next((v for k, v in headers.items() if k.lower() == name), "")
