"""The forwarding handler: inject the account's token, forward, stream back, retry once.

Each ``[[upstream]]`` listener gets one ``UpstreamProxy`` on aiohttp's low-level server (no
router: every request is forwarded). The request goes only to the configured target: the
request line's scheme and host, the Host header and CONNECT are never honoured, and dot
segments cannot climb out of the target's base path.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import TypeAlias
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from sidecar.config import UpstreamConfig
from sidecar.credentials import CredentialManager
from sidecar.errors import CredentialError, ReauthorizationRequired, TokenUnavailable
from sidecar.metrics import Metrics
from sidecar.model import Clock, Token
from sidecar.responses import error_response

log = logging.getLogger(__name__)

ACCOUNT_HEADER = "X-Sidecar-Account"
# RFC 9110 §7.6.1 hop-by-hop fields, plus the pre-standard Keep-Alive/Proxy-Connection.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Never forwarded upstream: the client's Host and credentials, our own header, and Expect
# (the sidecar answers 100-continue itself).
REQUEST_DROP = HOP_BY_HOP | {"host", "authorization", "x-sidecar-account", "expect"}
ENCODED_DOTS = frozenset({"%2e", "%2e%2e", ".%2e", "%2e."})

Body: TypeAlias = bytes | AsyncIterator[bytes] | aiohttp.StreamReader | None


class UpstreamProxy:
    def __init__(
        self,
        cfg: UpstreamConfig,
        credentials: CredentialManager,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self._clock = clock
        self._expired = metrics.expired_injections.labels(cfg.name)
        self._cfg = cfg
        self._credentials = credentials
        self._session = session
        self._metrics = metrics
        target = URL(cfg.target)
        self._origin = str(target.origin())
        self._base_path = target.raw_path.rstrip("/")
        self._latency = metrics.upstream_latency.labels(cfg.name)
        self._request_counters: dict[tuple[str, int], object] = {}

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        response = await self._handle(request)
        self._count(request.method, response.status)
        return response

    def _count(self, method: str, status: int) -> None:
        key = (method, status // 100)
        counter = self._request_counters.get(key)
        if counter is None:
            method_label = method if method in _KNOWN_METHODS else "other"
            counter = self._metrics.requests.labels(self._cfg.name, method_label, f"{key[1]}xx")
            self._request_counters[key] = counter
        counter.inc()  # type: ignore[attr-defined]

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method == "CONNECT":
            return self._error(405, "method_not_allowed", "the sidecar does not tunnel CONNECT")
        try:
            url = URL(self._origin + self._base_path + target_path(request.raw_path), encoded=True)
        except ValueError as exc:
            return self._error(400, "invalid_path", str(exc))
        account = self._credentials.account_for(
            self._cfg.provider, request.headers.get(ACCOUNT_HEADER) or self._cfg.default_account
        )
        if not account:
            return self._error(
                400, "account_required", f"name the account in the {ACCOUNT_HEADER} header"
            )
        try:
            return await self._forward(request, url, account)
        except CredentialError as exc:
            return self._credential_error(exc)
        except TimeoutError:
            return self._error(504, "upstream_timeout", "the upstream did not answer in time")
        except aiohttp.ClientError as exc:
            log.warning(
                "upstream_failed", extra={"upstream": self._cfg.name, "error": type(exc).__name__}
            )
            return self._error(
                502, "upstream_unavailable", f"cannot reach the upstream: {type(exc).__name__}"
            )

    async def _forward(
        self, request: web.BaseRequest, url: URL, account: str
    ) -> web.StreamResponse:
        provider = self._cfg.provider
        headers = forward_headers(request.headers)
        body, replayable = await read_body(request, self._cfg.replay_limit_bytes)
        token = await self._credentials.current(provider, account)
        # Retry once, as an explicit bounded loop: the second answer goes back as it is.
        for attempt in range(2):
            upstream = await self._send(request.method, url, headers, body, token)
            if attempt == 1 or not self._rejects_token(upstream):
                break
            if not replayable:
                self._metrics.retries.labels(self._cfg.name, "not_replayable").inc()
                await self._refresh_quietly(account, token)
                break
            try:
                token = await self._credentials.refresh(provider, account, failed=token)
            except CredentialError:
                self._metrics.retries.labels(self._cfg.name, "refresh_failed").inc()
                upstream.release()
                raise
            upstream.release()  # the first answer is dropped before the replay
            self._metrics.retries.labels(self._cfg.name, "replayed").inc()
        return await self._relay(request, upstream)

    async def _send(
        self, method: str, url: URL, headers: CIMultiDict[str], body: Body, token: Token
    ) -> aiohttp.ClientResponse:
        if token.expires_at is not None and self._clock() >= token.expires_at:
            self._expired.inc()  # a bug if it ever happens: the alert watches this
        headers["Authorization"] = f"Bearer {token.access_token}"
        start = time.perf_counter()
        upstream = await self._session.request(
            method, url, headers=headers, data=body, allow_redirects=False
        )
        self._latency.observe(time.perf_counter() - start)
        return upstream

    def _rejects_token(self, upstream: aiohttp.ClientResponse) -> bool:
        """An invalid-token answer (RFC 6750 §3.1), as configured for this upstream."""
        if upstream.status not in self._cfg.retry_statuses:
            return False
        if not self._cfg.require_invalid_token_challenge:
            return True
        return any(
            is_invalid_token_challenge(v) for v in upstream.headers.getall("WWW-Authenticate", ())
        )

    async def _refresh_quietly(self, account: str, failed: Token) -> None:
        """Refresh for the next request when this one cannot be replayed; its answer stands."""
        with contextlib.suppress(CredentialError):
            await self._credentials.refresh(self._cfg.provider, account, failed=failed)

    async def _relay(
        self, request: web.BaseRequest, upstream: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        """Stream the upstream's answer back untouched (no decompression, no buffering)."""
        try:
            response = web.StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=response_headers(upstream.headers),
            )
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            upstream.release()

    def _credential_error(self, exc: CredentialError) -> web.Response:
        if isinstance(exc, ReauthorizationRequired):
            return self._error(exc.status, exc.code, str(exc), reason=exc.reason, since=exc.since)
        if isinstance(exc, TokenUnavailable):
            return self._error(
                exc.status, exc.code, str(exc), headers={"Retry-After": str(exc.retry_after)}
            )
        return self._error(exc.status, exc.code, str(exc))

    def _error(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        **details: object,
    ) -> web.Response:
        self._metrics.sidecar_errors.labels(self._cfg.name, code).inc()
        return error_response(status, code, message, headers=headers, **details)


_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def target_path(raw: str) -> str:
    """The path and query to forward, from a request-target in any form (RFC 9112 §3.2).

    An absolute-form target loses its scheme and authority: only the configured target is
    ever contacted. Dot segments are removed (RFC 3986 §5.2.4) so the path cannot climb above
    the target's base path; percent-encoded dot segments are refused, since servers disagree
    on whether they mean the same thing.
    """
    if not raw.startswith("/"):
        parts = urlsplit(raw)
        if not parts.scheme or not parts.netloc:
            raise ValueError(f"unsupported request target {raw[:100]!r}")
        raw = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    path, sep, query = raw.partition("?")
    if "." in path or "%" in path:
        path = _remove_dot_segments(path)
    return path + sep + query


def _remove_dot_segments(path: str) -> str:
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, segment in enumerate(segments):
        if segment.lower() in ENCODED_DOTS:
            raise ValueError("percent-encoded dot segments are not allowed in the path")
        if segment == "..":
            if out:
                out.pop()
        elif segment != ".":
            out.append(segment)
        if segment in (".", "..") and i == len(segments) - 1:
            out.append("")  # "/a/.." means the directory "/", keep the trailing slash
    return "/" + "/".join(out)


def forward_headers(incoming: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The app's headers minus hop-by-hop fields, its credentials and our own header."""
    drop = REQUEST_DROP | _connection_tokens(incoming)
    return CIMultiDict((k, v) for k, v in incoming.items() if k.lower() not in drop)


def response_headers(incoming: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    drop = HOP_BY_HOP | _connection_tokens(incoming)
    return CIMultiDict((k, v) for k, v in incoming.items() if k.lower() not in drop)


def _connection_tokens(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """Fields named in Connection are hop-by-hop too (RFC 9110 §7.6.1)."""
    values = headers.getall("Connection", ())
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())


def is_invalid_token_challenge(value: str) -> bool:
    """True for a Bearer challenge carrying ``error="invalid_token"`` (RFC 6750 §3)."""
    scheme, _, params = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    for param in params.split(","):
        name, _, val = param.strip().partition("=")
        if name.strip().lower() == "error" and val.strip().strip('"') == "invalid_token":
            return True
    return False


async def read_body(request: web.BaseRequest, limit: int) -> tuple[Body, bool]:
    """The body to forward, and whether it can be sent a second time.

    Bodies up to ``limit`` bytes are buffered for a replay; larger ones are streamed through
    without buffering and cannot be replayed.
    """
    if not request.body_exists:
        return None, True
    length = request.content_length
    if length is not None:
        if length <= limit:
            return await request.read(), True
        return request.content, False
    # Chunked: buffer until the limit; past it, stream what was read and then the rest.
    prefix = bytearray()
    while len(prefix) <= limit:
        chunk = await request.content.readany()
        if not chunk:
            return bytes(prefix), True
        prefix += chunk
    return _chain(bytes(prefix), request.content), False


async def _chain(prefix: bytes, rest: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    yield prefix
    async for chunk in rest.iter_any():
        yield chunk
