"""The admin listener: metrics, health probes and the accounts API.

``/metrics``, ``/healthz`` and ``/readyz`` are open, as probes and scrapers expect. Everything
else needs ``Authorization: Bearer <token from [admin] token_file>``; without a token file the
JSON API is off. Every answer is JSON and none ever holds a token. ``/openapi.json`` (the
``openapi.json`` beside this module) documents the API.

It runs on the same small HTTP server as the proxy listeners, with a route table instead of a
web framework: eleven routes do not need one, and the process then carries one HTTP stack.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from urllib.parse import parse_qsl, unquote

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar.callback import CALLBACK_PATH, complete_login
from sidecar.credentials.accounts import (
    AccountService,
    GrantNotSupported,
    InvalidInput,
    ListQuery,
    RevocationFailed,
    Stored,
    UnknownProvider,
)
from sidecar.credentials.logins import Logins, NotConnectable
from sidecar.errors import (
    DecryptError,
    FatalGrantError,
    ReauthorizationRequired,
    SidecarError,
    StoreError,
    TokenUnavailable,
    TransientGrantError,
    UnknownAccount,
)
from sidecar.http.messages import Headers, Request, Response
from sidecar.http.responses import error_response, json_response
from sidecar.metrics import Metrics
from sidecar.model import AccountState
from sidecar.store import TokenStore

OPEN_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
ACCOUNT = "/v1/providers/{provider}/accounts/{account}"
CHALLENGE: Headers = [(b"WWW-Authenticate", b'Bearer realm="sidecar-admin"')]
MAX_BODY_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class AdminRequest:
    method: str
    path: str
    params: dict[str, str]  # from the route's {placeholders}, percent-decoded
    query: dict[str, str]
    body: bytes


Endpoint = Callable[["AdminApi", AdminRequest], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class Route:
    method: str
    template: str
    endpoint: Endpoint

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile("^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", self.template) + "$")


class AdminApi:
    """The admin handler; the accounts API answers only when both ``accounts`` and a token
    are set."""

    def __init__(
        self,
        store: TokenStore,
        metrics: Metrics,
        providers: tuple[str, ...],
        listeners_up: Callable[[], bool],
        accounts: AccountService | None = None,
        admin_token: str | None = None,
        logins: Logins | None = None,
        callback_url: str | None = None,
    ) -> None:
        self.store, self.metrics, self.providers = store, metrics, providers
        self.listeners_up = listeners_up
        self._accounts = accounts
        # Hashing first makes the comparison independent of the presented token's length too.
        self._expected = (
            hashlib.sha256(admin_token.encode()).digest()
            if accounts is not None and admin_token is not None
            else None
        )
        self.routes = OPEN_ROUTES + (ACCOUNT_ROUTES if accounts is not None else ())
        # The provider sends the browser to the callback without our bearer token: its
        # ``state`` is its credential (single-use, expiring, checked in constant time).
        self.open_paths = OPEN_PATHS
        self._logins, self.callback_url = logins, callback_url
        if logins is not None and self._expected is not None:
            self.routes += LOGIN_ROUTES
            self.open_paths = OPEN_PATHS | {CALLBACK_PATH}
        self._routes = [(route, route.pattern) for route in self.routes]

    @property
    def logins(self) -> Logins:
        assert self._logins is not None  # login routes exist only with logins
        return self._logins

    @property
    def accounts(self) -> AccountService:
        assert self._accounts is not None  # account routes exist only with a service
        return self._accounts

    async def handle(self, request: Request) -> Response:
        path, _, query = request.target.decode("latin-1").partition("?")
        if path not in self.open_paths:
            refused = self._refuse(request.headers)
            if refused is not None:
                return refused
        found = self._route(request.method, path)
        if isinstance(found, Response):
            return found
        endpoint, params = found
        body = b""
        if request.body is not None:
            whole = await request.body.read_all(MAX_BODY_BYTES)
            if whole is None:
                return error_response(413, "payload_too_large", "the body is too large")
            body = whole
        admin_request = AdminRequest(request.method, path, params, dict(parse_qsl(query)), body)
        try:
            return await endpoint(self, admin_request)
        except SidecarError as exc:
            return error_for(exc)

    def _refuse(self, headers: Headers) -> Response | None:
        """Bearer authentication for everything but the open probes, in constant time."""
        if self._expected is None:
            return error_response(
                404,
                "admin_api_disabled",
                "the admin API is disabled: set [admin] token_file to enable it",
            )
        authorization = next((v for k, v in headers if k.lower() == b"authorization"), b"")
        scheme, _, presented = authorization.decode("latin-1").partition(" ")
        digest = hashlib.sha256(presented.strip().encode()).digest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(digest, self._expected):
            return error_response(
                401, "unauthorized", "a valid admin bearer token is required", CHALLENGE
            )
        return None

    def _route(self, method: str, path: str) -> tuple[Endpoint, dict[str, str]] | Response:
        allowed: list[str] = []
        for route, pattern in self._routes:
            match = pattern.match(path)
            if match is None:
                continue
            if route.method == method or (route.method == "GET" and method == "HEAD"):
                return route.endpoint, {k: unquote(v) for k, v in match.groupdict().items()}
            allowed += [route.method, "HEAD"] if route.method == "GET" else [route.method]
        if allowed:
            allow = ",".join(sorted(set(allowed))).encode("ascii")
            return error_response(
                405, "method_not_allowed", "Method Not Allowed", [(b"Allow", allow)]
            )
        return error_response(404, "not_found", "Not Found")


# Errors answered with their message only; the first matching class wins.
PLAIN_ERRORS: tuple[tuple[type[SidecarError], int, str], ...] = (
    (UnknownProvider, 404, "unknown_provider"),
    (UnknownAccount, 404, "unknown_account"),
    (GrantNotSupported, 409, "grant_not_supported"),
    (NotConnectable, 409, "not_connectable"),
    (DecryptError, 500, "undecryptable"),  # a key was removed: delete with force=true
    (StoreError, 503, "store_unavailable"),
)


def error_for(exc: SidecarError) -> Response:
    """The status, code and details of each error the account service raises."""
    for kind, status, code in PLAIN_ERRORS:
        if isinstance(exc, kind):
            return error_response(status, code, str(exc))
    if isinstance(exc, InvalidInput):
        return error_response(
            422, "invalid_request", "the request is invalid", problems=exc.problems
        )
    if isinstance(exc, ReauthorizationRequired):  # 409, not 401: the admin's token is fine
        return error_response(409, exc.code, str(exc), reason=exc.reason, since=exc.since)
    if isinstance(exc, TokenUnavailable):
        retry = [(b"Retry-After", str(exc.retry_after).encode("ascii"))]
        return error_response(503, exc.code, str(exc), retry)
    if isinstance(exc, FatalGrantError):  # the provider rejected the code (RFC 6749 §5.2)
        return error_response(
            400,
            "authorization_rejected",
            str(exc),
            provider_error=exc.error,
            provider_error_description=exc.description,
        )
    if isinstance(exc, TransientGrantError):
        later = [(b"Retry-After", b"%d" % exc.retry_after)] if exc.retry_after else None
        return error_response(502, "token_endpoint_unavailable", str(exc), later)
    if isinstance(exc, RevocationFailed):
        error = exc.cause.error if isinstance(exc.cause, FatalGrantError) else None
        return error_response(502, "revocation_failed", str(exc), provider_error=error)
    return error_response(500, "internal_error", type(exc).__name__)


def _body(request: AdminRequest) -> object:
    try:
        return json.loads(request.body)
    except ValueError:
        raise InvalidInput(["body: must be JSON"]) from None


def _names(request: AdminRequest) -> tuple[str, str]:
    return request.params["provider"], request.params["account"]


def _stored(stored: Stored, **extra: object) -> Response:
    return json_response(stored.summary.to_json() | extra, status=201 if stored.created else 200)


async def openapi(api: AdminApi, request: AdminRequest) -> Response:
    return Response(200, [(b"Content-Type", b"application/json")], OPENAPI)


async def list_providers(api: AdminApi, request: AdminRequest) -> Response:
    return json_response({"providers": await api.accounts.providers()})


async def list_accounts(api: AdminApi, request: AdminRequest) -> Response:
    provider = request.params["provider"]
    api.accounts.provider(provider)  # an unknown provider is a 404 before any parameter problem
    page = await api.accounts.list(provider, ListQuery.parse(request.query))
    return json_response(page.to_json())


async def get_account(api: AdminApi, request: AdminRequest) -> Response:
    return json_response((await api.accounts.get(*_names(request))).to_json())


async def put_account(api: AdminApi, request: AdminRequest) -> Response:
    return _stored(await api.accounts.put(*_names(request), _body(request)))


async def authorize_account(api: AdminApi, request: AdminRequest) -> Response:
    stored = await api.accounts.authorize(*_names(request), _body(request))
    return _stored(stored, warnings=list(stored.warnings))


async def connect_account(api: AdminApi, request: AdminRequest) -> Response:
    """Start a login: the URL to open in a browser; the callback route completes it."""
    body = _body(request) if request.body.strip() else {}
    if not isinstance(body, dict) or set(body) - {"redirect_uri"}:
        raise InvalidInput(['body: must be {} or {"redirect_uri": "..."}'])
    provider, account = _names(request)
    redirect_uri = body.get("redirect_uri") or api.accounts.provider(provider).redirect_uri
    redirect_uri = redirect_uri or api.callback_url
    if not isinstance(redirect_uri, str) or not redirect_uri:
        raise InvalidInput(["redirect_uri: is required (no provider redirect_uri is set)"])
    started = await api.logins.start(provider, account, redirect_uri)
    return json_response(started.to_json())


async def oauth_callback(api: AdminApi, request: AdminRequest) -> Response:
    response, _ = await complete_login(api.logins, request.query)
    return response


async def refresh_account(api: AdminApi, request: AdminRequest) -> Response:
    return json_response((await api.accounts.refresh(*_names(request))).to_json())


async def delete_account(api: AdminApi, request: AdminRequest) -> Response:
    force = request.query.get("force", "false")
    if force not in ("true", "false"):
        raise InvalidInput([f"force: must be true or false, got {force!r}"])
    provider, account = _names(request)
    revocation = await api.accounts.revoke(provider, account, force=force == "true")
    return json_response({"account": account, "deleted": True, "revocation": revocation})


async def healthz(api: AdminApi, request: AdminRequest) -> Response:
    return json_response({"status": "ok"})


async def readyz(api: AdminApi, request: AdminRequest) -> Response:
    if not api.listeners_up():
        return error_response(503, "not_ready", "proxy listeners are not up")
    try:
        await api.store.ping()
    except StoreError as exc:
        return error_response(503, "store_unavailable", str(exc))
    return json_response({"status": "ready"})


async def metrics(api: AdminApi, request: AdminRequest) -> Response:
    try:
        counts = await api.store.count_by_state()
    except StoreError:
        counts = None  # keep the last known account counts rather than fail the scrape
    if counts is not None:
        for provider in api.providers:
            for state in AccountState:
                api.metrics.accounts.labels(provider, state.value).set(
                    counts.get((provider, state.value), 0)
                )
    body = generate_latest(api.metrics.registry)
    return Response(200, [(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))], body)


OPENAPI = resources.files("sidecar").joinpath("openapi.json").read_bytes()
OPEN_ROUTES = (
    Route("GET", "/metrics", metrics),
    Route("GET", "/healthz", healthz),
    Route("GET", "/readyz", readyz),
)
ACCOUNT_ROUTES = (
    Route("GET", "/openapi.json", openapi),
    Route("GET", "/v1/providers", list_providers),
    Route("GET", "/v1/providers/{provider}/accounts", list_accounts),
    Route("GET", ACCOUNT, get_account),
    Route("PUT", ACCOUNT, put_account),
    Route("DELETE", ACCOUNT, delete_account),
    Route("POST", ACCOUNT + "/authorize", authorize_account),
    Route("POST", ACCOUNT + "/refresh", refresh_account),
)
LOGIN_ROUTES = (
    Route("POST", ACCOUNT + "/connect", connect_account),
    Route("GET", CALLBACK_PATH, oauth_callback),
)
