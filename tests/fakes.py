"""Fake OAuth token endpoint and fake upstream API: real aiohttp servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web


class ManualClock:
    """An injected clock: tests move time by hand, never sleep."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class FakeTokenEndpoint:
    """Issues tokens, rotates refresh tokens, and detects reuse of a rotated-away one.

    ``script`` holds canned answers consumed one per call before normal behaviour resumes:
    each is a callable returning a web.Response (or raising to drop the connection).
    ``gate``, when set, holds every answer until it is set, so tests can pile up waiters.
    """

    expires_in: int | None = 3600
    rotate: bool = True
    calls: int = 0
    requests: list[dict[str, str]] = field(default_factory=list)
    auth_headers: list[str | None] = field(default_factory=list)
    valid_refresh: set[str] = field(default_factory=set)
    rotated_away: set[str] = field(default_factory=set)
    issued_access: list[str] = field(default_factory=list)
    reuse_detected: int = 0
    script: list[Callable[[], web.StreamResponse]] = field(default_factory=list)
    gate: asyncio.Event | None = None
    drop_answers: int = 0  # process (and rotate) this many requests, then cut the connection
    # Reuse grace (DOT's REFRESH_TOKEN_GRACE_PERIOD_SECONDS, Okta's grace period, Auth0's reuse
    # interval): a rotated-away refresh token presented again this soon gets its answer again.
    grace_seconds: float = 0.0
    clock: Callable[[], float] | None = None
    answers: dict[str, tuple[float, dict[str, object]]] = field(default_factory=dict)
    grace_answers: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: int = 0
    max_in_flight: int = 0
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token", self.handle)
        return app

    def grant(self, prefix: str = "seed") -> tuple[str, str]:
        """A valid (access, refresh) pair, as if an operator got it by authorizing."""
        n = next(self._ids)
        access, refresh = f"{prefix}-access-{n}", f"{prefix}-refresh-{n}"
        self.valid_refresh.add(refresh)
        self.issued_access.append(access)
        return access, refresh

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        form = dict(await request.post())
        self.requests.append({k: str(v) for k, v in form.items()})
        self.auth_headers.append(request.headers.get("Authorization"))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.arrived.set()
        try:
            # The provider acts at once (a rotation happens even if the caller goes away);
            # only its answer waits for the gate.
            scripted = self.script.pop(0) if self.script else None
            answer = scripted() if scripted else self._issue(form)
            if self.gate is not None:
                await self.gate.wait()
            if scripted:
                return answer
            if self.drop_answers > 0:
                self.drop_answers -= 1
                assert request.transport is not None
                request.transport.abort()  # the provider acted; its answer is lost
            return answer
        finally:
            self.in_flight -= 1

    def _issue(self, form: dict[str, object]) -> web.Response:
        grant = form.get("grant_type")
        body: dict[str, object] = {"token_type": "Bearer"}
        if grant == "refresh_token":
            presented = str(form.get("refresh_token"))
            if presented in self.answers and self._within_grace(presented):
                self.grace_answers += 1
                return web.json_response(self.answers[presented][1])
            if presented in self.rotated_away:
                self.reuse_detected += 1
                self.valid_refresh.clear()  # reuse detection: the whole family is revoked
                return oauth_error("invalid_grant", "refresh token reuse detected")
            if presented not in self.valid_refresh:
                return oauth_error("invalid_grant", "unknown refresh token")
            n = next(self._ids)
            if self.rotate:
                self.valid_refresh.discard(presented)
                self.rotated_away.add(presented)
                body["refresh_token"] = f"refresh-{n}"
                self.valid_refresh.add(f"refresh-{n}")
        elif grant == "client_credentials":
            n = next(self._ids)
        else:
            return oauth_error("unsupported_grant_type")
        body["access_token"] = f"access-{n}"
        self.issued_access.append(f"access-{n}")
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        if grant == "refresh_token" and self.rotate and self.clock is not None:
            self.answers[str(form.get("refresh_token"))] = (self.clock(), body)
        return web.json_response(body)

    def _within_grace(self, presented: str) -> bool:
        assert self.clock is not None
        return self.clock() - self.answers[presented][0] <= self.grace_seconds


def oauth_error(error: str, description: str = "", status: int = 400) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


def basic_credentials(header: str | None) -> tuple[str, str]:
    assert header is not None and header.startswith("Basic ")
    user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    return user, password


@dataclass
class FakeUpstream:
    """An API that accepts only tokens in ``valid`` and records what it received."""

    valid: set[str] = field(default_factory=set)
    calls: int = 0
    seen_auth: list[str | None] = field(default_factory=list)
    seen: list[dict[str, object]] = field(default_factory=list)
    challenge: str | None = None  # WWW-Authenticate sent with a 401
    received_bytes: int = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/upload", self.upload)
        app.router.add_get("/big/{size}", self.big)
        app.router.add_get("/redirect", self.redirect)
        app.router.add_get("/gzip", self.gzip)
        app.router.add_route("*", "/{tail:.*}", self.echo)
        return app

    def _authorized(self, request: web.Request) -> web.Response | None:
        self.calls += 1
        auth = request.headers.get("Authorization")
        self.seen_auth.append(auth)
        if auth is None or auth.removeprefix("Bearer ") not in self.valid:
            headers = {"WWW-Authenticate": self.challenge} if self.challenge else None
            return web.json_response({"upstream": "unauthorized"}, status=401, headers=headers)
        return None

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append(
            {
                "method": request.method,
                "path_qs": request.raw_path,
                "host": request.host,
                "headers": dict(request.headers),
                "body": body,
            }
        )
        denied = self._authorized(request)
        if denied is not None:
            return denied
        return web.json_response(
            {
                "method": request.method,
                "path": request.raw_path,
                "body_length": len(body),
                "token": request.headers["Authorization"].removeprefix("Bearer "),
            },
            headers={"X-Upstream": "yes"},
        )

    async def upload(self, request: web.Request) -> web.Response:
        denied = self._authorized(request)
        if denied is not None:
            await request.read()
            return denied
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
        self.received_bytes = total
        return web.json_response({"received": total})

    async def big(self, request: web.Request) -> web.StreamResponse:
        denied = self._authorized(request)
        if denied is not None:
            return denied
        size = int(request.match_info["size"])
        response = web.StreamResponse(headers={"Content-Length": str(size)})
        await response.prepare(request)
        chunk = b"x" * 65536
        sent = 0
        while sent < size:
            piece = chunk[: size - sent]
            await response.write(piece)
            sent += len(piece)
        return response

    async def redirect(self, request: web.Request) -> web.Response:
        self._authorized(request)
        return web.Response(status=302, headers={"Location": "http://127.0.0.2:1/steal"})

    async def gzip(self, request: web.Request) -> web.Response:
        import gzip

        self._authorized(request)
        payload = gzip.compress(json.dumps({"compressed": True}).encode())
        return web.Response(
            body=payload, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )
