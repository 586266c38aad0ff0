"""``sidecar accounts connect``: get an account's first token pair by signing in with a browser.

The flow of a native app (RFC 8252): the authorization request carries PKCE (S256) and a
``state``; the provider sends the browser back to a listener on the loopback interface
(§7.3), which checks the ``state``, exchanges the code and stores the pair. The listener lives
only while the command waits, answers nothing but its callback path, and binds a loopback
address only, so no other machine can reach it.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable
from urllib.parse import parse_qsl, urlsplit

from sidecar.app import open_accounts
from sidecar.callback import Outcome, complete_login, page
from sidecar.config import Config
from sidecar.credentials.accounts import Stored
from sidecar.credentials.logins import Logins, UnknownLogin
from sidecar.errors import SidecarError
from sidecar.grants.discovery import endpoints_for
from sidecar.http.messages import Request, Response
from sidecar.http.server import Server
from sidecar.model import Clock, system_clock

# No port: any port, as RFC 8252 §7.3 requires providers to accept for loopback IP addresses.
DEFAULT_REDIRECT_URI = "http://127.0.0.1/callback"


class LoginFailed(SidecarError):
    """The login could not be run or did not finish."""


def loopback_redirect(uri: str) -> tuple[str, int, str]:
    """(host to bind, port, path) of a loopback redirect URI; port 0 when it names none."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme != "http" or not loopback or parts.query or parts.fragment:
        raise LoginFailed(
            f"redirect URI {uri!r} is not a loopback http URI (http://127.0.0.1[:PORT]/PATH), "
            "which is what `connect` listens on; use --redirect-uri, or the admin API's connect"
        )
    # RFC 8252 §8.3: "localhost" may resolve elsewhere; bind the loopback IP it stands for.
    return ("127.0.0.1" if host == "localhost" else host), parts.port or 0, parts.path or "/"


async def connect(
    cfg: Config,
    provider: str,
    account: str,
    *,
    redirect_uri: str | None,
    wait_seconds: float,
    show: Callable[[str, str], None],
    clock: Clock = system_clock,
) -> Stored:
    """Run one login: ``show(authorization_url, redirect_uri)`` once the listener is up, then
    wait for the callback; the pair is stored when this returns."""
    if provider not in {p.name for p in cfg.providers}:
        raise LoginFailed(f"no provider named {provider!r}")
    uri = redirect_uri or cfg.provider(provider).redirect_uri or DEFAULT_REDIRECT_URI
    host, port, path = loopback_redirect(uri)
    endpoints = endpoints_for(cfg.providers)
    async with open_accounts(cfg, clock, endpoints) as accounts:
        logins = Logins(accounts, endpoints, clock, ttl=wait_seconds)
        listener = _Listener(logins, path)
        server = Server(listener.handle, asyncio.get_running_loop())
        try:
            bound = await server.listen(host, port)
        except OSError as exc:
            raise LoginFailed(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        try:
            netloc = f"[{host}]" if ":" in host else host
            actual = f"http://{netloc}:{bound[1]}{path}"
            started = await logins.start(provider, account, actual)
            show(started.url, actual)
            outcome = await _wait(listener.done, wait_seconds)
        finally:
            await server.close(5.0)  # the browser gets its page before the process exits
    if outcome.error is not None:
        raise LoginFailed(str(outcome.error))
    assert outcome.stored is not None
    return outcome.stored


async def _wait(done: asyncio.Future[Outcome], seconds: float) -> Outcome:
    try:
        async with asyncio.timeout(seconds):
            return await done
    except TimeoutError:
        raise LoginFailed(f"no sign-in completed within {seconds:.0f} s") from None


class _Listener:
    """Answers the callback path; the first callback with a known ``state`` ends the wait
    (an unknown one, say a reload of an old page, gets its error page and changes nothing)."""

    def __init__(self, logins: Logins, path: str) -> None:
        self._logins, self._path = logins, path
        self.done: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()

    async def handle(self, request: Request) -> Response:
        path, _, query = request.target.decode("latin-1").partition("?")
        if request.method != "GET" or path != self._path:
            return page(404, "Not found", "This listener only receives the sign-in redirect.")
        response, outcome = await complete_login(self._logins, dict(parse_qsl(query)))
        if not isinstance(outcome.error, UnknownLogin) and not self.done.done():
            self.done.set_result(outcome)
        return response
