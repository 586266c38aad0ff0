"""Shared fixtures: real fake servers on 127.0.0.1, a real SQLite file, a manual clock."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar import config as config_module
from sidecar.app import Sidecar
from sidecar.credentials.maintenance import import_credentials
from sidecar.crypto import TokenCipher, generate_key
from sidecar.model import Credential, Token
from tests.fakes import FakeTokenEndpoint, FakeUpstream, ManualClock

CLIENT_SECRET = "s3cr3t-client-value"

MakeSidecar = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def idp(aiohttp_server: Any) -> AsyncIterator[FakeTokenEndpoint]:
    fake = FakeTokenEndpoint()
    server = await aiohttp_server(fake.app())
    fake.url = str(server.make_url("/token"))  # type: ignore[attr-defined]
    yield fake


@pytest.fixture
async def api(aiohttp_server: Any) -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    server = await aiohttp_server(fake.app())
    fake.url = str(server.make_url(""))  # type: ignore[attr-defined]
    yield fake


@pytest.fixture
async def refreshed_only_upstream(aiohttp_server: Any, idp: FakeTokenEndpoint) -> str:
    """An API that accepts only access tokens the fake issued by refreshing (not the seed)."""

    async def handle(request: web.Request) -> web.Response:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if token not in idp.issued_access[1:]:
            return web.json_response({"upstream": "unauthorized"}, status=401)
        return web.json_response({"token": token})

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/")


def write_secret(path: Path, text: str) -> Path:
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


@pytest.fixture
def secrets_dir(tmp_path: Path) -> Path:
    write_secret(tmp_path / "store.key", generate_key() + "\n")
    write_secret(tmp_path / "client-secret", CLIENT_SECRET + "\n")
    return tmp_path


def base_config(
    tmp: Path,
    token_url: str,
    target: str,
    *,
    provider: dict[str, Any] | None = None,
    upstream: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "store": {"url": f"sqlite://{tmp / 'tokens.db'}", "key_file": str(tmp / "store.key")},
        "admin": {"listen": "127.0.0.1:0"},
        # Background refresh runs on real time; tests drive it with run_once() instead.
        "sidecar": {"shutdown_timeout_seconds": 5, "background_refresh": False},
        "provider": [
            {
                "name": "example",
                "token_url": token_url,
                "grant": "refresh_token",
                "client_id": "client-1",
                "client_secret_file": str(tmp / "client-secret"),
                "refresh_skew_seconds": 60,
                "backoff_initial_seconds": 5,
                **(provider or {}),
            }
        ],
        "upstream": [
            {
                "name": "api",
                "listen": "127.0.0.1:0",
                "target": target,
                "provider": "example",
                "default_account": "main",
                **(upstream or {}),
            }
        ],
    }


@pytest.fixture
async def make_sidecar(
    secrets_dir: Path,
    idp: FakeTokenEndpoint,
    api: FakeUpstream,
    clock: ManualClock,
) -> AsyncIterator[MakeSidecar]:
    started: list[Sidecar] = []

    async def make(**overrides: Any) -> Sidecar:
        raw = base_config(
            secrets_dir,
            idp.url,
            api.url,  # type: ignore[attr-defined]
            provider=overrides.get("provider"),
            upstream=overrides.get("upstream"),
        )
        raw["store"].update(overrides.get("store", {}))
        raw["sidecar"].update(overrides.get("sidecar", {}))
        raw["admin"].update(overrides.get("admin", {}))
        if "notify" in overrides:
            raw["notify"] = overrides["notify"]
        cfg = config_module.parse(raw, {}, secrets_dir)
        sidecar = await Sidecar.start(
            cfg, clock=clock, registry=CollectorRegistry(), rng=random.Random(7)
        )
        started.append(sidecar)
        return sidecar

    yield make
    for sidecar in started:
        await sidecar.stop()


async def seed(
    sidecar: Sidecar,
    idp: FakeTokenEndpoint,
    api: FakeUpstream,
    clock: ManualClock,
    account: str = "main",
    expires_in: float | None = 3600,
    provider: str = "example",
    lifetime: float | None = None,
) -> Token:
    """Import a first token pair the fakes accept, as `sidecar accounts import` would.

    ``lifetime``: the pair was received that long before it expires (default: received now,
    so its lifetime is ``expires_in``). A 1-h token with 30 s left is inside the 60-s skew;
    a 30-s token received now is not (the skew is at most a tenth of the lifetime).
    """
    access, refresh = idp.grant(account)
    api.valid.add(access)
    token = Token(access, refresh, None if expires_in is None else clock() + expires_in)
    received = clock() if lifetime is None or expires_in is None else token.expires_at - lifetime
    cipher = TokenCipher(sidecar.config.store.keys)
    cred = Credential(provider, account, token, 0, refreshed_at=received)
    await import_credentials(sidecar.store, cipher, [cred])
    return token


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def sample(sidecar: Sidecar, name: str, **labels: str) -> float:
    value = sidecar.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value
