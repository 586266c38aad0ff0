"""What the sidecar changes in a request and an answer on the way through: the target path and
the header fields (RFC 9110 §7.6.1 hop-by-hop fields, the app's credentials, the account)."""

from __future__ import annotations

from urllib.parse import urlsplit

from sidecar.http.messages import Headers

ACCOUNT_HEADER = "X-Sidecar-Account"
# RFC 9110 §7.6.1 hop-by-hop fields, plus the pre-standard Keep-Alive/Proxy-Connection.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Never forwarded upstream: the client's Host and credentials, our own header, Expect (the
# sidecar answers 100-continue itself) and the framing, which the upstream pool writes.
REQUEST_DROP = HOP_BY_HOP | {
    b"host",
    b"authorization",
    b"x-sidecar-account",
    b"expect",
    b"content-length",
}
RESPONSE_DROP = HOP_BY_HOP | {b"content-length"}
_RESPONSE_DROP_LENGTHS = frozenset(len(name) for name in RESPONSE_DROP)
ENCODED_DOTS = frozenset({"%2e", "%2e%2e", ".%2e", "%2e."})


class InvalidAccountHeader(ValueError):
    """X-Sidecar-Account is repeated or empty: which account is meant is ambiguous."""


def target_path(raw: bytes) -> bytes:
    """The path and query to forward, from a request-target in any form (RFC 9112 §3.2).

    An absolute-form target loses its scheme and authority: only the configured target is
    ever contacted. Dot segments are removed (RFC 3986 §5.2.4) so the path cannot climb above
    the target's base path; percent-encoded dot segments are refused, since servers disagree
    on whether they mean the same thing.
    """
    if not raw.startswith(b"/"):
        parts = urlsplit(raw)
        if not parts.scheme or not parts.netloc:
            raise ValueError(f"unsupported request target {raw[:100]!r}")
        raw = (parts.path or b"/") + (b"?" + parts.query if parts.query else b"")
    path, sep, query = raw.partition(b"?")
    if b"." in path or b"%" in path:
        path = _remove_dot_segments(path.decode("latin-1")).encode("latin-1")
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


def forward_headers(incoming: Headers) -> tuple[Headers, str | None]:
    """The app's headers minus hop-by-hop fields and its credentials; the account it named.

    Raises InvalidAccountHeader for a repeated or empty X-Sidecar-Account: the default account
    applies only when the header is absent.
    """
    kept: Headers = []
    account = connection = None
    for name, value in incoming:
        lower = name.lower()
        if lower not in REQUEST_DROP:
            kept.append((name, value))
        elif lower == b"x-sidecar-account":
            if account is not None:
                raise InvalidAccountHeader(f"name one account: {ACCOUNT_HEADER} is repeated")
            account = value.decode("latin-1").strip(" \t")
            if not account:
                raise InvalidAccountHeader(f"{ACCOUNT_HEADER} is empty")
        elif lower == b"connection":
            connection = value if connection is None else connection + b"," + value
    return _without_connection_options(kept, connection), account


def response_headers(incoming: Headers) -> Headers:
    kept: Headers = []
    connection = None
    for name, value in incoming:
        if len(name) not in _RESPONSE_DROP_LENGTHS:  # Date, Server, Content-Type...: kept as is
            kept.append((name, value))
            continue
        lower = name.lower()
        if lower not in RESPONSE_DROP:
            kept.append((name, value))
        elif lower == b"connection":
            connection = value if connection is None else connection + b"," + value
    return _without_connection_options(kept, connection)


def _without_connection_options(headers: Headers, connection: bytes | None) -> Headers:
    """Fields named in Connection are hop-by-hop too (RFC 9110 §7.6.1)."""
    if connection is None:
        return headers
    named = {token.strip().lower() for token in connection.split(b",")} - HOP_BY_HOP
    named.discard(b"close")
    if not named:
        return headers  # the usual "keep-alive" or "close": nothing more to drop
    return [(name, value) for name, value in headers if name.lower() not in named]
