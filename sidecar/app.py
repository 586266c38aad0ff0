"""Composition root: builds every long-lived object once and owns its lifecycle.

``Sidecar.start`` opens the store, builds the credential manager and one proxy listener per
``[[upstream]]`` plus the admin listener. ``stop`` stops accepting, lets in-flight requests
finish (bounded by ``shutdown_timeout_seconds``), then closes sessions and the store.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from sidecar.admin import AdminApi
from sidecar.callback import CALLBACK_PATH
from sidecar.config import Config, UpstreamConfig
from sidecar.credentials import CredentialManager
from sidecar.credentials.accounts import AccountService, make_account_service
from sidecar.credentials.logins import Logins
from sidecar.credentials.maintenance import check_keys, reset_client_credentials
from sidecar.credentials.notifier import Notifier
from sidecar.credentials.refresher import Refresher
from sidecar.crypto import TokenCipher
from sidecar.errors import ListenError
from sidecar.grants import make_grant
from sidecar.grants.discovery import Endpoints, endpoints_for
from sidecar.http.client import HttpClient, UpstreamPool
from sidecar.http.messages import FastHandler, Handler, Request, Response
from sidecar.http.responses import error_response, json_response
from sidecar.http.server import Limits, Server
from sidecar.metrics import Metrics
from sidecar.model import Clock, system_clock
from sidecar.proxy import UpstreamProxy
from sidecar.store import TokenStore, open_store, open_store_patiently
from sidecar.tasks import Tasks

log = logging.getLogger(__name__)


@dataclass
class Sidecar:
    config: Config
    store: TokenStore
    credentials: CredentialManager
    metrics: Metrics
    clock: Clock
    refresher: Refresher
    addresses: dict[str, tuple[str, int]] = field(default_factory=dict)  # listener -> address
    _exit: AsyncExitStack = field(default_factory=AsyncExitStack)
    _servers: list[Server] = field(default_factory=list)
    _background: asyncio.Task[None] | None = None

    @classmethod
    async def start(
        cls,
        config: Config,
        *,
        clock: Clock = system_clock,
        registry: CollectorRegistry | None = None,
        rng: random.Random | None = None,
    ) -> Sidecar:
        exit_stack = AsyncExitStack()
        try:
            return await cls._build(config, clock, Metrics(registry), rng, exit_stack)
        except BaseException:
            await exit_stack.aclose()
            raise

    @classmethod
    async def _build(
        cls,
        config: Config,
        clock: Clock,
        metrics: Metrics,
        rng: random.Random | None,
        exit_stack: AsyncExitStack,
    ) -> Sidecar:
        # The admin listener comes first, so probes get an answer while the store is awaited:
        # alive, not ready.
        admin_handler = _Switch(_starting)
        servers: list[Server] = []
        addresses: dict[str, tuple[str, int]] = {}
        admin = config.admin
        await _listen(
            exit_stack, servers, addresses, "admin", admin_handler, admin.host, admin.port
        )
        store = await open_store_patiently(config.store.url, config.store.connect_retry_seconds)
        exit_stack.push_async_callback(store.close)
        await check_keys(store, TokenCipher(config.store.keys))  # refuse a wrong key file
        token_http = HttpClient()
        exit_stack.push_async_callback(token_http.close)
        tasks = Tasks()  # closed first: refreshes stop before the HTTP client and store go
        exit_stack.push_async_callback(tasks.close)
        endpoints = endpoints_for(config.providers)  # discovery, shared by every use
        grants = {
            p.name: make_grant(token_http, p, clock, endpoints[p.name]) for p in config.providers
        }
        providers = {p.name: p for p in config.providers}
        credentials = CredentialManager(
            store,
            TokenCipher(config.store.keys),
            grants,
            providers,
            metrics,
            clock,
            tasks,
            rng,
            Notifier(token_http, config.notify, tasks) if config.notify else None,
        )
        await reset_client_credentials(store, config.providers, clock())
        refresher = Refresher(store, credentials, providers, clock)
        credentials.recovered = lambda provider: refresher.wake()
        sidecar = cls(
            config, store, credentials, metrics, clock, refresher, addresses, exit_stack, servers
        )
        if config.background_refresh:
            sidecar._background = tasks.spawn(refresher.run(), name="background refresher")
        for upstream in config.upstreams:
            await sidecar._listen_upstream(upstream)
        accounts = make_account_service(
            config.providers,
            store,
            TokenCipher(config.store.keys),
            token_http,
            credentials,
            clock,
            changed=_on_account_change(credentials, refresher),
            discovered=endpoints,
        )
        admin_handler.handler = AdminApi(
            store,
            metrics,
            tuple(p.name for p in config.providers),
            sidecar.listeners_up,
            accounts,
            config.admin.token,
            Logins(accounts, endpoints, clock),
            _callback_url(addresses["admin"]),
        ).handle
        return sidecar

    async def _listen_upstream(self, cfg: UpstreamConfig) -> None:
        pool = upstream_pool(cfg)
        self._exit.push_async_callback(pool.close)
        proxy = UpstreamProxy(cfg, self.credentials, pool, self.metrics, self.clock)
        limits = Limits(cfg.client_header_timeout_seconds, cfg.client_body_timeout_seconds)
        await _listen(
            self._exit,
            self._servers,
            self.addresses,
            cfg.name,
            proxy.handle,
            cfg.host,
            cfg.port,
            proxy.fast,
            limits,
        )

    def listeners_up(self) -> bool:
        return len(self.addresses) == len(self.config.upstreams) + 1

    def url(self, listener: str) -> str:
        host, port = self.addresses[listener]
        return f"http://{host}:{port}"

    async def stop(self) -> None:
        """Stop refreshing ahead and accepting, let in-flight requests finish (bounded), store
        the answers of token calls already sent, then release everything."""
        if self._background is not None:
            self._background.cancel()  # its refreshes in progress are shielded: drained below
        grace = self.config.shutdown_timeout_seconds
        await asyncio.gather(*(server.close(grace) for server in self._servers))
        self._servers.clear()
        self.addresses.clear()
        await self.credentials.drain()
        await self._exit.aclose()


@asynccontextmanager
async def open_accounts(
    config: Config, clock: Clock = system_clock, endpoints: Mapping[str, Endpoints] | None = None
) -> AsyncIterator[AccountService]:
    """The account service on its own, for one ``sidecar accounts`` command.

    A running sidecar sees these changes only when it next reads the account from the store;
    the admin API makes the same changes and tells the running process at once.
    """
    async with AsyncExitStack() as stack:
        store = await open_store(config.store.url)
        stack.push_async_callback(store.close)
        http = HttpClient()
        stack.push_async_callback(http.close)
        tasks = Tasks()  # closed first: a refresh stops before the HTTP client and store go
        stack.push_async_callback(tasks.close)
        cipher = TokenCipher(config.store.keys)
        endpoints = endpoints or endpoints_for(config.providers)
        grants = {p.name: make_grant(http, p, clock, endpoints[p.name]) for p in config.providers}
        providers = {p.name: p for p in config.providers}
        credentials = CredentialManager(
            store, cipher, grants, providers, Metrics(), clock, tasks, None
        )
        yield make_account_service(
            config.providers, store, cipher, http, credentials, clock, discovered=endpoints
        )


async def _listen(
    exit_stack: AsyncExitStack,
    servers: list[Server],
    addresses: dict[str, tuple[str, int]],
    name: str,
    handler: Handler,
    host: str,
    port: int,
    fast: FastHandler | None = None,
    limits: Limits | None = None,
) -> None:
    """Bind one listener; a port in use is a ListenError naming the listener and address."""
    server = Server(handler, asyncio.get_running_loop(), fast, limits)
    servers.append(server)
    exit_stack.push_async_callback(server.close, 0.0)  # after stop()'s drain, or on failure
    try:
        addresses[name] = await server.listen(host, port)
    except OSError as exc:
        # asyncio's message repeats the address; the errno's text is the reason.
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ListenError(name, host, port, reason.lower()) from None
    log.info("listening", extra={"listener": name, "port": addresses[name][1]})


class _Switch:
    """A listener's handler that can be replaced once what it needs exists."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    async def __call__(self, request: Request) -> Response:
        return await self.handler(request)


async def _starting(request: Request) -> Response:
    """The admin listener before the admin API exists: alive (so a liveness probe does not
    restart a pod that waits for its database), not ready, and nothing else yet."""
    if request.target.partition(b"?")[0] == b"/healthz":
        return json_response({"status": "starting"})
    return error_response(503, "not_ready", "starting: waiting for the token store")


def _callback_url(address: tuple[str, int]) -> str:
    """The admin listener's login callback, as a browser on this host reaches it."""
    host, port = address
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{CALLBACK_PATH}"


def upstream_pool(cfg: UpstreamConfig) -> UpstreamPool:
    """A keep-alive pool for one upstream that changes nothing the app sent."""
    return UpstreamPool(
        cfg.target,
        connect_timeout=cfg.connect_timeout_seconds,
        read_timeout=cfg.read_timeout_seconds,
        max_connections=cfg.max_connections,
        pool_wait=cfg.pool_wait_seconds,
    )


def _on_account_change(
    credentials: CredentialManager, refresher: Refresher
) -> Callable[[str, str], None]:
    """After an operator changes an account: drop the cached pair, reschedule refreshes."""

    def changed(provider: str, account: str) -> None:
        credentials.forget(provider, account)
        refresher.wake()

    return changed
