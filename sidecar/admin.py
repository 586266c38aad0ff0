"""The admin listener: metrics, health probes and the accounts API.

``/metrics``, ``/healthz`` and ``/readyz`` are open, as probes and scrapers expect. Everything
else needs ``Authorization: Bearer <token from [admin] token_file>``; without a token file the
JSON API is off. Every answer is JSON and none ever holds a token. ``/openapi.json`` (the
``openapi.json`` beside this module) documents the API.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from importlib import resources

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar.credentials.accounts import (
    AccountService,
    GrantNotSupported,
    InvalidInput,
    ListQuery,
    RevocationFailed,
    Stored,
    UnknownProvider,
)
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
from sidecar.metrics import Metrics
from sidecar.model import AccountState
from sidecar.responses import error_response
from sidecar.store import TokenStore

STORE: web.AppKey[TokenStore] = web.AppKey("store", TokenStore)
METRICS = web.AppKey("metrics", Metrics)
PROVIDERS: web.AppKey[tuple[str, ...]] = web.AppKey("providers", tuple)
LISTENERS_UP: web.AppKey[Callable[[], bool]] = web.AppKey("listeners_up", Callable)  # type: ignore[arg-type]
ACCOUNTS = web.AppKey("accounts", AccountService)

OPEN_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
ACCOUNT = "/v1/providers/{provider}/accounts/{account}"
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="sidecar-admin"'}


def make_admin_app(
    store: TokenStore,
    metrics: Metrics,
    providers: tuple[str, ...],
    listeners_up: Callable[[], bool],
    accounts: AccountService | None = None,
    admin_token: str | None = None,
) -> web.Application:
    """The admin app; the accounts API answers only when both ``accounts`` and a token are set."""
    enabled = accounts is not None and admin_token is not None
    app = web.Application(middlewares=[guard(admin_token if enabled else None), json_errors])
    app[STORE], app[METRICS], app[PROVIDERS], app[LISTENERS_UP] = (
        store,
        metrics,
        providers,
        listeners_up,
    )
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if accounts is not None:
        app[ACCOUNTS] = accounts
        add_account_routes(app.router)
    return app


def add_account_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/openapi.json", openapi)
    router.add_get("/v1/providers", list_providers)
    router.add_get("/v1/providers/{provider}/accounts", list_accounts)
    router.add_get(ACCOUNT, get_account)
    router.add_put(ACCOUNT, put_account)
    router.add_delete(ACCOUNT, delete_account)
    router.add_post(ACCOUNT + "/authorize", authorize_account)
    router.add_post(ACCOUNT + "/refresh", refresh_account)


def guard(token: str | None) -> Middleware:
    """Bearer authentication for everything but the open probes, compared in constant time."""
    # Hashing first makes the comparison independent of the presented token's length too.
    expected = hashlib.sha256(token.encode()).digest() if token is not None else None

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        if expected is None:
            return error_response(
                404,
                "admin_api_disabled",
                "the admin API is disabled: set [admin] token_file to enable it",
            )
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        digest = hashlib.sha256(presented.strip().encode()).digest()
        valid = hmac.compare_digest(digest, expected)
        if scheme.lower() != "bearer" or not valid:
            return error_response(
                401, "unauthorized", "a valid admin bearer token is required", headers=CHALLENGE
            )
        return await handler(request)

    return middleware


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Errors as JSON with ``X-Sidecar-Error``, like every answer the sidecar makes itself."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return error_response(exc.status, code, exc.reason, headers=_allow(exc))
    except SidecarError as exc:
        return error_for(exc)


def _allow(exc: web.HTTPException) -> dict[str, str] | None:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else None


# Errors answered with their message only; the first matching class wins.
PLAIN_ERRORS: tuple[tuple[type[SidecarError], int, str], ...] = (
    (UnknownProvider, 404, "unknown_provider"),
    (UnknownAccount, 404, "unknown_account"),
    (GrantNotSupported, 409, "grant_not_supported"),
    (DecryptError, 500, "undecryptable"),  # a key was removed: delete with force=true
    (StoreError, 503, "store_unavailable"),
)


def error_for(exc: SidecarError) -> web.Response:
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
        retry = {"Retry-After": str(exc.retry_after)}
        return error_response(503, exc.code, str(exc), headers=retry)
    if isinstance(exc, FatalGrantError):  # the provider rejected the code (RFC 6749 §5.2)
        return error_response(
            400,
            "authorization_rejected",
            str(exc),
            provider_error=exc.error,
            provider_error_description=exc.description,
        )
    if isinstance(exc, TransientGrantError):
        later = {"Retry-After": str(int(exc.retry_after))} if exc.retry_after else None
        return error_response(502, "token_endpoint_unavailable", str(exc), headers=later)
    if isinstance(exc, RevocationFailed):
        error = exc.cause.error if isinstance(exc.cause, FatalGrantError) else None
        return error_response(502, "revocation_failed", str(exc), provider_error=error)
    return error_response(500, "internal_error", type(exc).__name__)


async def _body(request: web.Request) -> object:
    try:
        return await request.json()
    except ValueError:
        raise InvalidInput(["body: must be JSON"]) from None


def _names(request: web.Request) -> tuple[str, str]:
    return request.match_info["provider"], request.match_info["account"]


def _stored(stored: Stored, **extra: object) -> web.Response:
    return web.json_response(
        stored.summary.to_json() | extra, status=201 if stored.created else 200
    )


async def openapi(request: web.Request) -> web.Response:
    text = resources.files("sidecar").joinpath("openapi.json").read_text()
    return web.Response(text=text, content_type="application/json")


async def list_providers(request: web.Request) -> web.Response:
    return web.json_response({"providers": await request.app[ACCOUNTS].providers()})


async def list_accounts(request: web.Request) -> web.Response:
    provider = request.match_info["provider"]
    service = request.app[ACCOUNTS]
    service.provider(provider)  # an unknown provider is a 404 before any parameter problem
    page = await service.list(provider, ListQuery.parse(request.query))
    return web.json_response(page.to_json())


async def get_account(request: web.Request) -> web.Response:
    return web.json_response((await request.app[ACCOUNTS].get(*_names(request))).to_json())


async def put_account(request: web.Request) -> web.Response:
    return _stored(await request.app[ACCOUNTS].put(*_names(request), await _body(request)))


async def authorize_account(request: web.Request) -> web.Response:
    stored = await request.app[ACCOUNTS].authorize(*_names(request), await _body(request))
    return _stored(stored, warnings=list(stored.warnings))


async def refresh_account(request: web.Request) -> web.Response:
    return web.json_response((await request.app[ACCOUNTS].refresh(*_names(request))).to_json())


async def delete_account(request: web.Request) -> web.Response:
    force = request.query.get("force", "false")
    if force not in ("true", "false"):
        raise InvalidInput([f"force: must be true or false, got {force!r}"])
    provider, account = _names(request)
    revocation = await request.app[ACCOUNTS].revoke(provider, account, force=force == "true")
    return web.json_response({"account": account, "deleted": True, "revocation": revocation})


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    if not request.app[LISTENERS_UP]():
        return error_response(503, "not_ready", "proxy listeners are not up")
    try:
        await request.app[STORE].ping()
    except StoreError as exc:
        return error_response(503, "store_unavailable", str(exc))
    return web.json_response({"status": "ready"})


async def metrics_handler(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    try:
        counts = await request.app[STORE].count_by_state()
    except StoreError:
        counts = None  # keep the last known account counts rather than fail the scrape
    if counts is not None:
        for provider in request.app[PROVIDERS]:
            for state in AccountState:
                metrics.accounts.labels(provider, state.value).set(
                    counts.get((provider, state.value), 0)
                )
    body = generate_latest(metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
