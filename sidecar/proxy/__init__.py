"""The forwarding handler: inject the account's token, forward, stream back, retry once.

Each ``[[upstream]]`` listener gets one ``UpstreamProxy`` behind the lean HTTP/1.1 server in
``sidecar.http`` (no router: every request is forwarded). The request goes only to the
configured target: the request line's scheme and host, the Host header and CONNECT are never
honoured, and dot segments cannot climb out of the target's base path.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from sidecar.config import UpstreamConfig
from sidecar.credentials import CredentialManager
from sidecar.errors import CredentialError, ReauthorizationRequired, TokenUnavailable
from sidecar.http.body import BodyStream
from sidecar.http.client import (
    IDEMPOTENT,
    PoolBusy,
    RequestBody,
    StaleConnection,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
)
from sidecar.http.messages import Headers, Request, RequestError, Responder, Response
from sidecar.http.responses import error_response
from sidecar.metrics import CounterValue, Metrics
from sidecar.model import Clock, Token
from sidecar.proxy.rewrite import (
    ACCOUNT_HEADER,
    InvalidAccountHeader,
    forward_headers,
    response_headers,
    target_path,
)

log = logging.getLogger(__name__)

# Refused with 405 before anything is sent. TRACE: an upstream that reflects the request
# (RFC 9110 §9.3.8) would hand the injected token to the app.
REFUSED_METHODS = {
    "CONNECT": "the sidecar does not tunnel CONNECT",
    "TRACE": "TRACE would reflect the injected credential back to the app",
}


@dataclass(slots=True)
class Attempt:
    """One send of a request: the token it carried and the answer's head, or the error."""

    token: Token
    upstream: UpstreamResponse | None = None
    error: BaseException | None = None

    def answer(self) -> UpstreamResponse:
        if self.error is not None:
            raise self.error
        assert self.upstream is not None
        return self.upstream


class UpstreamProxy:
    def __init__(
        self,
        cfg: UpstreamConfig,
        credentials: CredentialManager,
        pool: UpstreamPool,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self._clock = clock
        self._expired = metrics.expired_injections.labels(cfg.name)
        self._cfg = cfg
        self._credentials = credentials
        self._pool = pool
        self._metrics = metrics
        self._base_path = urlsplit(cfg.target).path.rstrip("/").encode("ascii")
        self._latency = metrics.upstream_latency.labels(cfg.name)
        self._request_counters: dict[tuple[str, int], CounterValue] = {}
        self._replay_limit = cfg.replay_limit_bytes

    async def handle(self, request: Request, first: Attempt | None = None) -> Response:
        """Answer one request. ``first``: an attempt the fast path made and could not finish
        (a dead pooled connection, an invalid-token answer, an error); its policy is this one."""
        prepared = self._prepare(request)
        if isinstance(prepared, Response):
            response = prepared
        else:
            try:
                response = await self._forward(request, *prepared, first)
            except (CredentialError, RequestError, TimeoutError, UpstreamError) as exc:
                response = self._explain(exc)
        self._count(request.method, response.status)
        return response

    def _count(self, method: str, status: int) -> None:
        key = (method, status // 100)
        counter = self._request_counters.get(key)
        if counter is None:
            method_label = method if method in _KNOWN_METHODS else "other"
            counter = self._metrics.requests.labels(self._cfg.name, method_label, f"{key[1]}xx")
            self._request_counters[key] = counter
        counter.inc()

    def _prepare(self, request: Request) -> tuple[bytes, Headers, str] | Response:
        """Where the request goes, what goes with it, and for which account; or why not."""
        if request.method in REFUSED_METHODS:
            return self._error(405, "method_not_allowed", REFUSED_METHODS[request.method])
        try:
            path = self._base_path + target_path(request.target)
        except ValueError as exc:
            return self._error(400, "invalid_path", str(exc))
        try:
            headers, named = forward_headers(request.headers)
        except InvalidAccountHeader as exc:
            return self._error(400, "invalid_account_header", str(exc))
        account = self._credentials.account_for(
            self._cfg.provider, named or self._cfg.default_account
        )
        if not account:
            return self._error(
                400, "account_required", f"name the account in the {ACCOUNT_HEADER} header"
            )
        return path, headers, account

    def fast(self, request: Request, responder: Responder) -> bool:
        """Forward without a task when nothing can make the request wait.

        That is a bodiless idempotent request, a FRESH cached token and an idle pooled
        connection: the answer is written from the upstream connection's I/O callback. Anything
        else (a refresh, a body, a new connection, an invalid-token answer to replay) goes
        through ``handle``'s coroutines. The fast path saves a task, a future and a coroutine
        chain per request, which is most of what the sidecar adds to a request's latency.
        """
        if request.method not in IDEMPOTENT:
            return False
        prepared = self._prepare(request)
        if isinstance(prepared, Response):
            self._count(request.method, prepared.status)
            responder.deliver(request, prepared)
            return True
        path, headers, account = prepared
        token = self._credentials.fresh(self._cfg.provider, account)
        connection = self._pool.reuse() if token is not None else None
        if token is None or connection is None:
            return False
        auth = (b"Authorization", b"Bearer " + token.access_token.encode("latin-1"))
        head = self._pool.head(request.method, path, [*headers, auth], None, None)
        start = time.perf_counter()

        def answered(upstream: UpstreamResponse | None, error: BaseException | None) -> None:
            if upstream is None or self._rejects_token(upstream):
                first = Attempt(token, upstream, error)
                responder.serve(request, self.handle(request, first))  # the one policy
                return
            self._latency.observe(time.perf_counter() - start)
            self._count(request.method, upstream.status)
            responder.deliver(request, relay(upstream))

        connection.start(request.method, head, answered)
        return True

    def _explain(self, exc: BaseException) -> Response:
        """The sidecar's own answer for a failure to forward."""
        if isinstance(exc, CredentialError):
            return self._credential_error(exc)
        if isinstance(exc, RequestError):  # the app's own request was bad, late or cut off
            return self._error(exc.status, exc.code, str(exc))
        if isinstance(exc, PoolBusy):
            message = f"the upstream's connections are all busy: {exc}"
            return self._error(503, "upstream_busy", message, headers=[(b"Retry-After", b"1")])
        if isinstance(exc, TimeoutError) and not isinstance(exc, UpstreamError):
            return self._error(504, "upstream_timeout", "the upstream did not answer in time")
        if isinstance(exc, UpstreamError):  # a connect timeout too: nothing was sent
            log.warning("upstream_failed", extra={"upstream": self._cfg.name, "error": str(exc)})
            return self._error(502, "upstream_unavailable", f"cannot reach the upstream: {exc}")
        raise exc

    async def _forward(
        self,
        request: Request,
        path: bytes,
        headers: Headers,
        account: str,
        first: Attempt | None,
    ) -> Response:
        """Send (unless the fast path did), then on an invalid-token answer refresh once and
        replay once: the second answer goes back as it is."""
        body: RequestBody = None
        replayable = True
        if request.body is not None:
            body, replayable = await read_body(request.body, request.length, self._replay_limit)
        if first is None or isinstance(first.error, StaleConnection):  # (a dead pooled one)
            token = await self._token(account) if first is None else first.token
            first = Attempt(token, await self._send(request, path, headers, body, token))
        upstream = first.answer()
        if not self._rejects_token(upstream):
            return relay(upstream)
        if not replayable:
            self._metrics.retries.labels(self._cfg.name, "not_replayable").inc()
            try:
                await self._refresh_quietly(account, first.token)
            except BaseException:  # the app went away: the answer's connection is freed
                upstream.release()
                raise
            return relay(upstream)
        try:
            token = await self._credentials.refresh(self._cfg.provider, account, failed=first.token)
        except CredentialError:
            self._metrics.retries.labels(self._cfg.name, "refresh_failed").inc()
            raise
        finally:
            upstream.release()  # the first answer is dropped before the replay
        self._metrics.retries.labels(self._cfg.name, "replayed").inc()
        return relay(await self._send(request, path, headers, body, token))

    async def _token(self, account: str) -> Token:
        provider = self._cfg.provider
        fresh = self._credentials.fresh(provider, account)
        return fresh or await self._credentials.current(provider, account)

    async def _send(
        self, request: Request, path: bytes, headers: Headers, body: RequestBody, token: Token
    ) -> UpstreamResponse:
        if token.expires_at is not None and self._clock() >= token.expires_at:
            self._expired.inc()  # a bug if it ever happens: the alert watches this
        auth = (b"Authorization", b"Bearer " + token.access_token.encode("latin-1"))
        start = time.perf_counter()
        upstream = await self._pool.send(
            request.method, path, [*headers, auth], body, request.length
        )
        self._latency.observe(time.perf_counter() - start)
        return upstream

    def _rejects_token(self, upstream: UpstreamResponse) -> bool:
        """An invalid-token answer (RFC 6750 §3.1), as configured for this upstream."""
        if upstream.status not in self._cfg.retry_statuses:
            return False
        if not self._cfg.require_invalid_token_challenge:
            return True
        return any(
            is_invalid_token_challenge(value.decode("latin-1"))
            for name, value in upstream.headers
            if name.lower() == b"www-authenticate"
        )

    async def _refresh_quietly(self, account: str, failed: Token) -> None:
        """Refresh for the next request when this one cannot be replayed; its answer stands."""
        with contextlib.suppress(CredentialError):
            await self._credentials.refresh(self._cfg.provider, account, failed=failed)

    def _credential_error(self, exc: CredentialError) -> Response:
        if isinstance(exc, ReauthorizationRequired):
            return self._error(exc.status, exc.code, str(exc), reason=exc.reason, since=exc.since)
        if isinstance(exc, TokenUnavailable):
            retry_after = str(exc.retry_after).encode("ascii")
            return self._error(
                exc.status, exc.code, str(exc), headers=[(b"Retry-After", retry_after)]
            )
        return self._error(exc.status, exc.code, str(exc))

    def _error(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: Headers | None = None,
        **details: object,
    ) -> Response:
        self._metrics.sidecar_errors.labels(self._cfg.name, code).inc()
        return error_response(status, code, message, headers, **details)


def relay(upstream: UpstreamResponse) -> Response:
    """The upstream's answer, streamed back untouched (no decompression, no buffering)."""
    return Response(
        upstream.status,
        response_headers(upstream.headers),
        upstream.body,
        upstream.length,
        upstream.reason,
        upstream.release,
    )


_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


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


async def read_body(body: BodyStream, length: int | None, limit: int) -> tuple[RequestBody, bool]:
    """The body to forward, and whether it can be sent a second time.

    Bodies up to ``limit`` bytes are buffered for a replay; larger ones are streamed through
    without buffering and cannot be replayed.
    """
    if length is not None and length > limit:
        return body, False
    whole = await body.read_all(limit)
    return (body, False) if whole is None else (whole, True)
