"""Provider endpoints from RFC 8414 / OpenID Connect Discovery 1.0 metadata.

A provider with ``issuer`` may leave out ``token_url``, ``revocation_url`` and
``authorization_url``: they are read from the issuer's metadata. Explicit keys always win, and
the document is fetched only when an endpoint that was left out is first needed, never at
start. So a restart with tokens in the store serves them even while the metadata cannot be
fetched; only a token request (or a login) waits for it, and its failure is transient (the
account backs off, it is never marked as needing re-authorization). Pinning ``token_url``
removes the dependency for refreshes altogether.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sidecar.config import ProviderConfig
from sidecar.errors import TransientGrantError
from sidecar.http.client import UpstreamError, UpstreamPool

log = logging.getLogger(__name__)

MAX_METADATA_BYTES = 256 * 1024


class DiscoveryFailed(TransientGrantError):
    """The metadata could not be fetched or is unusable; nothing about the grant is known."""


@dataclass(frozen=True, slots=True)
class Metadata:
    """The endpoints the sidecar uses, as the issuer's metadata names them."""

    issuer: str
    token_endpoint: str
    authorization_endpoint: str | None
    revocation_endpoint: str | None
    source: str  # the document's URL

    @classmethod
    def parse(cls, issuer: str, source: str, data: Any) -> Metadata:
        if not isinstance(data, dict):
            raise DiscoveryFailed(f"{source}: not a JSON object")
        # RFC 8414 §3.3, OIDC Discovery §4.3: the document must name the issuer it was
        # fetched for, or an attacker's metadata could stand in for it.
        if data.get("issuer") != issuer:
            raise DiscoveryFailed(f"{source}: names issuer {data.get('issuer')!r}, not {issuer!r}")
        urls = {
            name: data.get(name)
            for name in ("token_endpoint", "authorization_endpoint", "revocation_endpoint")
        }
        for name, url in urls.items():
            if url is not None and (not isinstance(url, str) or not _is_http(url)):
                raise DiscoveryFailed(f"{source}: {name} is not an http(s) URL")
        if urls["token_endpoint"] is None:
            raise DiscoveryFailed(f"{source}: has no token_endpoint")
        return cls(
            issuer,
            urls["token_endpoint"],
            urls["authorization_endpoint"],
            urls["revocation_endpoint"],
            source,
        )


def metadata_urls(issuer: str) -> list[str]:
    """Where the metadata may be: RFC 8414 §3.1 inserts the well-known path before the
    issuer's path; OIDC Discovery §4 appends it."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    rfc8414 = urlunsplit(
        (parts.scheme, parts.netloc, "/.well-known/oauth-authorization-server" + path, "", "")
    )
    oidc = issuer.rstrip("/") + "/.well-known/openid-configuration"
    return [rfc8414, oidc]


async def fetch_metadata(issuer: str, seconds: float) -> Metadata:
    """The issuer's metadata, from the first well-known URL that answers 200."""
    answers: list[str] = []
    for url in metadata_urls(issuer):
        status, body = await _get(url, seconds)
        if status == 200:
            try:
                data = json.loads(body)
            except ValueError:
                raise DiscoveryFailed(f"{url}: not JSON") from None
            return Metadata.parse(issuer, url, data)
        answers.append(f"{url} answered HTTP {status}")
    raise DiscoveryFailed("no discovery document: " + "; ".join(answers))


async def _get(url: str, seconds: float) -> tuple[int, bytes]:
    """One GET on a connection of its own: metadata is read rarely (once per process)."""
    parts = urlsplit(url)
    origin = f"{parts.scheme}://{parts.netloc}"
    pool = UpstreamPool(origin, connect_timeout=seconds, read_timeout=seconds, max_connections=1)
    try:
        async with asyncio.timeout(seconds):
            response = await pool.send(
                "GET", parts.path.encode("ascii"), [(b"Accept", b"application/json")], None
            )
            try:
                body = await response.body.read_all(MAX_METADATA_BYTES)
            finally:
                response.release()
    except TimeoutError:
        raise DiscoveryFailed(f"{url}: timed out") from None
    except UpstreamError as exc:
        raise DiscoveryFailed(f"{url}: {exc}") from None
    finally:
        await pool.close()
    if body is None:
        raise DiscoveryFailed(f"{url}: larger than {MAX_METADATA_BYTES} bytes")
    return response.status, body


class Endpoints:
    """One provider's endpoints: the configured ones, else the discovered ones (fetched once,
    on first need, by one caller while the others wait)."""

    def __init__(self, provider: ProviderConfig) -> None:
        self.provider = provider
        self._metadata: Metadata | None = None
        self._lock = asyncio.Lock()

    async def token_url(self) -> str:
        if self.provider.token_url:
            return self.provider.token_url
        return (await self.metadata()).token_endpoint

    async def revocation_url(self) -> str | None:
        if self.provider.revocation_url or self.provider.issuer is None:
            return self.provider.revocation_url
        return (await self.metadata()).revocation_endpoint

    async def authorization_url(self) -> str | None:
        if self.provider.authorization_url or self.provider.issuer is None:
            return self.provider.authorization_url
        return (await self.metadata()).authorization_endpoint

    async def metadata(self) -> Metadata:
        issuer = self.provider.issuer
        if issuer is None:
            raise DiscoveryFailed(f"provider {self.provider.name!r} has no issuer")
        async with self._lock:
            if self._metadata is None:
                self._metadata = await fetch_metadata(issuer, self.provider.timeout_seconds)
                log.info(
                    "provider_discovered",
                    extra={"provider": self.provider.name, "source": self._metadata.source},
                )
            return self._metadata


async def describe_discovery(providers: Iterable[ProviderConfig]) -> tuple[list[str], bool]:
    """What discovery finds for each provider with an issuer, and which value is used:
    (lines to show, whether any fetch failed)."""
    lines, failed = [], False
    for p in providers:
        if p.issuer is None:
            continue
        try:
            found = await fetch_metadata(p.issuer, p.timeout_seconds)
        except DiscoveryFailed as exc:
            lines.append(f"provider {p.name!r}: discovery failed: {exc}")
            failed = True
            continue
        lines.append(f"provider {p.name!r}: issuer {p.issuer} ({found.source})")
        for key, configured, discovered in (
            ("token_url", p.token_url, found.token_endpoint),
            ("authorization_url", p.authorization_url, found.authorization_endpoint),
            ("revocation_url", p.revocation_url, found.revocation_endpoint),
        ):
            used = f"{configured} (configured; discovered {discovered or 'none'})"
            lines.append(f"  {key} = {used if configured else discovered or 'none found'}")
    return lines, failed


def endpoints_for(providers: Iterable[ProviderConfig]) -> dict[str, Endpoints]:
    return {p.name: Endpoints(p) for p in providers}


def _is_http(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.hostname)
