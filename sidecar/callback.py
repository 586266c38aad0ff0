"""The redirect endpoint of a login (RFC 6749 §3.1.2): the page the browser lands on.

Both the admin listener (``GET /oauth/callback``) and ``sidecar accounts connect``'s loopback
listener answer with it. The page says what happened in words a person understands and never
holds the code, a token or the state; it loads nothing and sends no referrer, so the callback
URL (which holds the code) goes nowhere else.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from sidecar.credentials.accounts import Stored
from sidecar.credentials.logins import LoginRefused, Logins
from sidecar.errors import FatalGrantError, SidecarError, TransientGrantError
from sidecar.http.messages import Headers, Response

log = logging.getLogger(__name__)

CALLBACK_PATH = "/oauth/callback"
PAGE_HEADERS: Headers = [
    (b"Content-Type", b"text/html; charset=utf-8"),
    (b"Cache-Control", b"no-store"),
    (b"Referrer-Policy", b"no-referrer"),
    (b"Content-Security-Policy", b"default-src 'none'"),
    (b"X-Content-Type-Options", b"nosniff"),
]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a callback did: ``stored`` on success, else the ``error`` its page explains."""

    stored: Stored | None
    error: SidecarError | None


async def complete_login(logins: Logins, query: Mapping[str, str]) -> tuple[Response, Outcome]:
    try:
        provider, account, stored = await logins.complete(query)
    except LoginRefused as exc:
        return page(400, exc.title, str(exc)), Outcome(None, exc)
    except FatalGrantError as exc:  # RFC 6749 §5.2, e.g. invalid_grant for a used code
        text = f"The provider refused the code ({exc.error}). Start again."
        return page(400, "Sign-in failed", text), Outcome(None, exc)
    except TransientGrantError as exc:
        text = f"The token endpoint could not be reached ({exc}). Start again."
        return page(502, "Sign-in failed", text), Outcome(None, exc)
    except SidecarError as exc:  # the store, or input the provider sent
        log.warning("login_failed", extra={"error": type(exc).__name__})
        return page(500, "Sign-in failed", str(exc)), Outcome(None, exc)
    log.info("login_completed", extra={"provider": provider, "account": account})
    text = f"Account {account!r} of provider {provider!r} is connected. You can close this window."
    return page(200, "Connected", text), Outcome(stored, None)


def page(status: int, title: str, text: str) -> Response:
    body = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head>"
        f"<body><h1>{html.escape(title)}</h1><p>{html.escape(text)}</p></body></html>"
    )
    return Response(status, list(PAGE_HEADERS), body.encode())
