"""The admin listener: Prometheus metrics and health probes.

``/metrics``, ``/healthz`` and ``/readyz`` are open, as probes and scrapers expect.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sidecar.errors import StoreError
from sidecar.metrics import Metrics
from sidecar.model import AccountState
from sidecar.responses import error_response
from sidecar.store import TokenStore

STORE: web.AppKey[TokenStore] = web.AppKey("store", TokenStore)
METRICS = web.AppKey("metrics", Metrics)
PROVIDERS: web.AppKey[tuple[str, ...]] = web.AppKey("providers", tuple)
LISTENERS_UP: web.AppKey[Callable[[], bool]] = web.AppKey("listeners_up", Callable)  # type: ignore[arg-type]


def make_admin_app(
    store: TokenStore,
    metrics: Metrics,
    providers: tuple[str, ...],
    listeners_up: Callable[[], bool],
) -> web.Application:
    app = web.Application()
    app[STORE], app[METRICS], app[PROVIDERS], app[LISTENERS_UP] = (
        store,
        metrics,
        providers,
        listeners_up,
    )
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


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
