"""Configuration: TOML in, frozen dataclasses out, every problem reported at once.

Parsing happens once, at the edge. Each problem names its key path (``provider[0].token_url``)
so an operator can fix a whole file in one pass. Secrets (client secrets, store keys) are read
here, so a missing or world-readable secret file is a configuration problem, not a crash later.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from sidecar.errors import ConfigError

GRANTS = ("refresh_token", "client_credentials", "jwt_bearer")
AUTH_METHODS = ("client_secret_basic", "client_secret_post", "private_key_jwt", "none")
SINGLE_TOKEN_GRANTS = ("client_credentials", "jwt_bearer")
SIGNING_ALGORITHMS = ("RS256", "ES256")
SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
# RFC 6749 §5.2 token endpoint codes, plus the two §4.1.2.1 codes providers also send there.
TOKEN_ERROR_CODES = (
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
    "temporarily_unavailable",
    "server_error",
)
# Token request parameters the sidecar sets itself: extra_params may not replace them.
RESERVED_PARAMS = frozenset(
    {
        "grant_type",
        "scope",
        "refresh_token",
        "assertion",
        "code",
        "redirect_uri",
        "code_verifier",
        "client_id",
        "client_secret",
        "client_assertion",
        "client_assertion_type",
        "audience",
        "resource",
    }
)
CLIENT_CREDENTIALS_ACCOUNT = "default"
"""A client_credentials provider has one token; it is stored under this account name."""
ADMIN_TOKEN_MIN_CHARS = 16


@dataclass(frozen=True)
class StoreConfig:
    url: str = field(repr=False)  # may carry a database password
    key_file: str
    keys: tuple[bytes, ...] = field(repr=False)  # 32-byte AES keys; the first one encrypts
    connect_retry_seconds: float = 60.0  # keep trying an unreachable store this long at start


@dataclass(frozen=True)
class AdminConfig:
    host: str = "127.0.0.1"
    port: int = 9901
    token_file: str | None = None
    token: str | None = field(default=None, repr=False)  # None: the admin JSON API is off


@dataclass(frozen=True)
class AssertionConfig:
    """How a provider's RFC 7523 JWTs are signed and addressed.

    ``issuer`` and ``subject`` apply to the grant assertion only (a client assertion's are
    always the client_id); None means the client_id. ``audience`` None means the token URL.
    """

    key_file: str
    key: SigningKey = field(repr=False, compare=False)
    algorithm: str = "RS256"
    key_id: str | None = None
    issuer: str | None = None
    subject: str | None = None
    audience: str | None = None
    lifetime_seconds: int = 300


@dataclass(frozen=True)
class ProviderQuirks:
    """Where a provider's token endpoint departs from RFC 6749 §5.2 (see grants/quirks.py)."""

    error_field: str = "error"  # a dotted path reaches a nested code: "error.code"
    error_description_field: str = "error_description"
    error_statuses: tuple[int, ...] = (400, 401)  # answers whose body may name an error
    error_aliases: tuple[tuple[str, str], ...] = ()  # (provider's code, RFC 6749 code)


@dataclass(frozen=True)
class ProviderConfig:
    name: str
    token_url: str
    grant: str
    client_id: str
    client_secret: str | None = field(default=None, repr=False)
    auth_method: str = "client_secret_basic"
    revocation_url: str | None = None  # RFC 7009; used when an account is deleted
    # RFC 8414 / OIDC discovery fills the endpoints left unset above (grants/discovery.py).
    issuer: str | None = None
    authorization_url: str | None = None  # RFC 6749 §3.1; for `accounts connect`
    redirect_uri: str | None = None  # where the provider sends the browser back with the code
    scopes: tuple[str, ...] = ()
    extra_params: tuple[tuple[str, str], ...] = ()
    audience: tuple[str, ...] = ()  # one `audience` parameter each
    resource: tuple[str, ...] = ()  # one `resource` parameter each, RFC 8707 §2
    assertion: AssertionConfig | None = None  # jwt_bearer grant, private_key_jwt auth
    quirks: ProviderQuirks = ProviderQuirks()
    refresh_skew_seconds: float = 60.0
    timeout_seconds: float = 10.0
    max_concurrent_refreshes: int = 4
    backoff_initial_seconds: float = 1.0
    backoff_max_seconds: float = 300.0
    max_refreshes_per_second: float = 25.0
    # Background refresh: an access token is refreshed once this share of its lifetime is
    # left (at least refresh_lead_seconds, at most half the lifetime), minus per-account jitter.
    # With the jitter, 10-20 % is left: at most 1.25 refreshes per lifetime (0.2 gave 1.43).
    refresh_lead_fraction: float = 0.1
    refresh_lead_seconds: float = 0.0
    refresh_jitter_fraction: float = 0.1
    refresh_token_lifetime_seconds: float | None = None  # keepalive: refresh before it lapses
    lost_refresh_max_attempts: int = 8
    recovery_probe_seconds: float = 5.0  # while the provider fails: one call this often
    unconcluded_refresh_wait_seconds: float = 30.0  # another process's refresh: its pair first

    @property
    def single_token(self) -> bool:
        """The provider issues the client's own token: one per provider, stored under
        CLIENT_CREDENTIALS_ACCOUNT, and obtainable again from configuration alone."""
        return self.grant in SINGLE_TOKEN_GRANTS


@dataclass(frozen=True)
class UpstreamConfig:
    name: str
    host: str
    port: int
    target: str
    provider: str
    default_account: str | None = None
    connect_timeout_seconds: float = 5.0
    read_timeout_seconds: float = 60.0
    replay_limit_bytes: int = 1024 * 1024
    retry_statuses: tuple[int, ...] = (401,)
    require_invalid_token_challenge: bool = False
    max_connections: int = 100
    pool_wait_seconds: float = 5.0
    client_header_timeout_seconds: float = 60.0
    client_body_timeout_seconds: float = 60.0


@dataclass(frozen=True)
class NotifyConfig:
    url: str
    timeout_seconds: float = 5.0
    attempts: int = 5
    retry_initial_seconds: float = 1.0


@dataclass(frozen=True)
class Config:
    store: StoreConfig
    admin: AdminConfig
    providers: tuple[ProviderConfig, ...]
    upstreams: tuple[UpstreamConfig, ...]
    shutdown_timeout_seconds: float = 10.0
    log_level: str = "info"
    background_refresh: bool = True
    notify: NotifyConfig | None = None

    def provider(self, name: str) -> ProviderConfig:
        return next(p for p in self.providers if p.name == name)


T = TypeVar("T")


class _Reader:
    """Pulls typed values out of one TOML table, recording problems under its key path."""

    def __init__(self, table: Mapping[str, Any], path: str, problems: list[str]) -> None:
        self.table, self.path, self.problems = table, path, problems
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def problem(self, name: str, message: str) -> None:
        self.problems.append(f"{self.key(name)}: {message}")

    def get(self, name: str, kind: type[T], default: T | None = None, required: bool = False) -> T:
        self.seen.add(name)
        if name not in self.table:
            if required:
                self.problem(name, "is required")
            return default  # type: ignore[return-value]
        value = self.table[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.problem(name, f"must be {_KIND_NAMES.get(kind, kind.__name__)}, got {value!r}")
            return default  # type: ignore[return-value]
        return value

    def positive(self, name: str, kind: type[T], default: T) -> T:
        value = self.get(name, kind, default)
        if value is not None and value <= 0:  # type: ignore[operator]
            self.problem(name, f"must be greater than 0, got {value!r}")
        return value

    def finish(self) -> None:
        for name in sorted(set(self.table) - self.seen):
            self.problem(name, "unknown key")


_KIND_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "a list",
    dict: "a table",
}


def load(path: str | Path, environ: Mapping[str, str]) -> Config:
    """Read and validate a config file; raise ConfigError listing every problem."""
    try:
        raw = tomllib.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
    return parse(raw, environ, base_dir=Path(path).parent)


def parse(raw: Mapping[str, Any], environ: Mapping[str, str], base_dir: Path) -> Config:
    problems: list[str] = []
    top = _Reader(raw, "", problems)
    store = _store(_table(top, "store", required=True), problems, base_dir)
    admin = _admin(_table(top, "admin"), problems, base_dir)
    sidecar = _Reader(_table(top, "sidecar"), "sidecar", problems)
    shutdown = sidecar.positive("shutdown_timeout_seconds", float, 10.0)
    log_level = sidecar.get("log_level", str, "info")
    if log_level not in ("debug", "info", "warning", "error"):
        sidecar.problem("log_level", "must be one of debug, info, warning, error")
    background_refresh = sidecar.get("background_refresh", bool, True)
    sidecar.finish()
    providers = tuple(
        _provider(t, f"provider[{i}]", problems, environ, base_dir)
        for i, t in enumerate(_tables(top, "provider"))
    )
    upstreams = tuple(
        _upstream(t, f"upstream[{i}]", problems) for i, t in enumerate(_tables(top, "upstream"))
    )
    notify = _notify(_table(top, "notify"), problems)
    _cross_check(providers, upstreams, admin, problems)
    top.finish()
    if problems:
        raise ConfigError(problems)
    return Config(
        store, admin, providers, upstreams, shutdown, log_level, background_refresh, notify
    )


def _table(top: _Reader, name: str, required: bool = False) -> dict[str, Any]:
    return top.get(name, dict, {}, required=required) or {}


def _tables(top: _Reader, name: str) -> list[dict[str, Any]]:
    items = top.get(name, list, [])
    good = [t for t in items if isinstance(t, dict)]
    if len(good) != len(items):
        top.problem(name, f"must be an array of tables ([[{name}]])")
    return good


def _store(table: dict[str, Any], problems: list[str], base_dir: Path) -> StoreConfig:
    r = _Reader(table, "store", problems)
    url = r.get("url", str, "sqlite:///var/lib/sidecar/tokens.db")
    url_file = r.get("url_file", str)  # a PostgreSQL URL with a password, from a Secret
    if url_file and "url" in table:
        r.problem("url_file", "set url or url_file, not both")
    elif url_file:
        text = _read_secret_file(_resolve(url_file, base_dir), "url_file", r)
        url = text.strip() if text is not None else url
    if not url.startswith(("sqlite://", "postgresql://", "postgres://", "memory://")):
        r.problem("url", "must start with sqlite://, postgresql:// or memory://")
    elif url.startswith("sqlite://"):
        url = _sqlite_url(url, base_dir, r)
    key_file = r.get("key_file", str, "", required=True)
    keys: tuple[bytes, ...] = ()
    if key_file:
        keys = _read_keys(_resolve(key_file, base_dir), r)
    retry = _seconds(r, "connect_retry_seconds", 60.0)
    r.finish()
    return StoreConfig(url, key_file, keys, retry)


def _sqlite_url(url: str, base_dir: Path, r: _Reader) -> str:
    """The URL with its path made absolute against the config file's directory, like every
    other path in the file: every command then opens the same database, wherever it runs."""
    path = url.removeprefix("sqlite://")
    if not path:
        r.problem("url", "sqlite:// needs a path, e.g. sqlite://tokens.db")
        return url
    return f"sqlite://{_resolve(path, base_dir).absolute()}"


def _read_keys(path: Path, r: _Reader) -> tuple[bytes, ...]:
    text = _read_secret_file(path, "key_file", r)
    if text is None:
        return ()
    keys = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            key = base64.urlsafe_b64decode(line.strip())
        except (binascii.Error, ValueError):
            key = b""
        if len(key) != 32:
            r.problem(
                "key_file",
                f"line {n} is not a base64-encoded 32-byte key "
                "(make one with `sidecar keys generate`)",
            )
            continue
        keys.append(key)
    if not keys and text is not None and not r.problems:
        r.problem("key_file", "holds no key (make one with `sidecar keys generate`)")
    return tuple(keys)


def _read_secret_file(path: Path, name: str, r: _Reader) -> str | None:
    try:
        mode = path.stat().st_mode
        if mode & stat.S_IROTH:
            r.problem(name, f"{path} is readable by every user; chmod o-rwx it")
            return None
        return path.read_text()
    except FileNotFoundError:
        r.problem(name, f"{path} does not exist")
    except UnicodeDecodeError:
        r.problem(name, f"{path} is not a text file")
    except OSError as exc:
        r.problem(name, f"{path}: cannot read: {exc.strerror}")
    return None


def _resolve(name: str, base_dir: Path) -> Path:
    path = Path(name)
    return path if path.is_absolute() else base_dir / path


def _notify(table: dict[str, Any], problems: list[str]) -> NotifyConfig | None:
    if not table:
        return None
    r = _Reader(table, "notify", problems)
    url = r.get("url", str, "", required=True)
    if url and not _is_http_url(url):
        r.problem("url", f"must be an http(s) URL, got {url!r}")
    cfg = NotifyConfig(
        url=url,
        timeout_seconds=r.positive("timeout_seconds", float, 5.0),
        attempts=r.positive("attempts", int, 5),
        retry_initial_seconds=r.positive("retry_initial_seconds", float, 1.0),
    )
    r.finish()
    return cfg


def _admin(table: dict[str, Any], problems: list[str], base_dir: Path) -> AdminConfig:
    r = _Reader(table, "admin", problems)
    host, port = _listen(r, "127.0.0.1:9901")
    token_file = r.get("token_file", str)
    token = None
    if token_file:
        text = _read_secret_file(_resolve(token_file, base_dir), "token_file", r)
        token = text.strip() if text is not None else None
        if token is not None and len(token) < ADMIN_TOKEN_MIN_CHARS:
            r.problem(
                "token_file",
                f"holds a token shorter than {ADMIN_TOKEN_MIN_CHARS} characters "
                "(make one with `openssl rand -hex 32`)",
            )
    r.finish()
    return AdminConfig(host, port, token_file, token)


def _listen(r: _Reader, default: str) -> tuple[str, int]:
    """Parse ``host:port``; a non-loopback host needs ``allow_non_loopback = true``."""
    listen = r.get("listen", str, default)
    allow_remote = r.get("allow_non_loopback", bool, False)
    host, _, port_text = listen.rpartition(":")
    host = host.strip("[]")
    if not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        r.problem("listen", f"must be host:port, got {listen!r}")
        return "127.0.0.1", 0
    if not _is_loopback(host) and not allow_remote:
        r.problem(
            "listen",
            f"{host} is not a loopback address; set allow_non_loopback = true "
            "to expose this listener beyond the pod",
        )
    return host, int(port_text)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _provider(
    table: dict[str, Any],
    path: str,
    problems: list[str],
    environ: Mapping[str, str],
    base_dir: Path,
) -> ProviderConfig:
    r = _Reader(table, path, problems)
    name = r.get("name", str, "", required=True)
    issuer = r.get("issuer", str)
    if issuer is not None and not _is_http_url(issuer):
        r.problem("issuer", f"must be an http(s) URL without query or fragment, got {issuer!r}")
    token_url = r.get("token_url", str, "", required=issuer is None)  # else discovered
    if token_url and not _is_http_url(token_url):
        r.problem("token_url", f"must be an http(s) URL, got {token_url!r}")
    grant = r.get("grant", str, "refresh_token")
    if grant not in GRANTS:
        r.problem("grant", f"must be one of {', '.join(GRANTS)}, got {grant!r}")
    auth_method = r.get("auth_method", str, "client_secret_basic")
    if auth_method not in AUTH_METHODS:
        r.problem("auth_method", f"must be one of {', '.join(AUTH_METHODS)}, got {auth_method!r}")
    secret = _client_secret(r, environ, base_dir)
    revocation_url = r.get("revocation_url", str)
    if revocation_url is not None and not _is_http_url(revocation_url):
        r.problem("revocation_url", f"must be an http(s) URL, got {revocation_url!r}")
    authorization_url = r.get("authorization_url", str)
    if authorization_url is not None and not _is_http_url(authorization_url):
        r.problem("authorization_url", f"must be an http(s) URL, got {authorization_url!r}")
    redirect_uri = r.get("redirect_uri", str)
    if redirect_uri is not None and not _is_http_url(redirect_uri):
        r.problem("redirect_uri", f"must be an http(s) URL, got {redirect_uri!r}")
    has_secret_key = "client_secret_file" in table or "client_secret_env" in table
    if not has_secret_key and auth_method not in ("none", "private_key_jwt"):
        r.problem(
            "client_secret_file",
            "set client_secret_file or client_secret_env "
            '(or auth_method = "none" for a public client)',
        )
    scopes = r.get("scopes", list, [])
    if not all(isinstance(s, str) for s in scopes):
        r.problem("scopes", "must be a list of strings")
    extra = r.get("extra_params", dict, {})
    if not all(isinstance(v, str) for v in extra.values()):
        r.problem("extra_params", "values must be strings")
    for param in sorted(RESERVED_PARAMS.intersection(extra)):
        hint = "use the provider's own key" if param in ("audience", "resource") else "it is ours"
        r.problem("extra_params", f"cannot set {param}: {hint}")
    audience, resource = _strings(r, "audience"), _strings(r, "resource")
    for uri in resource:
        if not urlsplit(uri).scheme or "#" in uri:
            r.problem("resource", f"{uri!r} is not an absolute URI without fragment (RFC 8707 §2)")
    provider = ProviderConfig(
        name=name,
        token_url=token_url,
        grant=grant,
        client_id=r.get("client_id", str, "", required=True),
        client_secret=secret,
        auth_method=auth_method,
        revocation_url=revocation_url,
        issuer=issuer,
        authorization_url=authorization_url,
        redirect_uri=redirect_uri,
        scopes=tuple(scopes),
        extra_params=tuple(sorted(extra.items())),
        audience=audience,
        resource=resource,
        assertion=_assertion(r, grant, auth_method, base_dir),
        quirks=_quirks(_Reader(_table(r, "quirks"), r.key("quirks"), problems)),
        refresh_skew_seconds=r.positive("refresh_skew_seconds", float, 60.0),
        timeout_seconds=r.positive("timeout_seconds", float, 10.0),
        max_concurrent_refreshes=r.positive("max_concurrent_refreshes", int, 4),
        backoff_initial_seconds=r.positive("backoff_initial_seconds", float, 1.0),
        backoff_max_seconds=r.positive("backoff_max_seconds", float, 300.0),
        max_refreshes_per_second=r.positive("max_refreshes_per_second", float, 25.0),
        refresh_lead_fraction=_fraction(r, "refresh_lead_fraction", 0.1),
        refresh_lead_seconds=r.get("refresh_lead_seconds", float, 0.0),
        refresh_jitter_fraction=_fraction(r, "refresh_jitter_fraction", 0.1),
        refresh_token_lifetime_seconds=r.positive("refresh_token_lifetime_seconds", float, None),
        lost_refresh_max_attempts=r.positive("lost_refresh_max_attempts", int, 8),
        recovery_probe_seconds=r.positive("recovery_probe_seconds", float, 5.0),
        unconcluded_refresh_wait_seconds=_seconds(r, "unconcluded_refresh_wait_seconds", 30.0),
    )
    r.finish()
    return provider


def _seconds(r: _Reader, name: str, default: float) -> float:
    """A duration that may be 0."""
    value = r.get(name, float, default)
    if value < 0:
        r.problem(name, f"must be 0 or more, got {value!r}")
    return value


def _fraction(r: _Reader, name: str, default: float) -> float:
    value = r.get(name, float, default)
    if value is not None and not 0 <= value < 1:
        r.problem(name, f"must be a fraction from 0 up to (not including) 1, got {value!r}")
    return value


def _client_secret(r: _Reader, environ: Mapping[str, str], base_dir: Path) -> str | None:
    secret_file = r.get("client_secret_file", str)
    secret_env = r.get("client_secret_env", str)
    if secret_file and secret_env:
        r.problem("client_secret_file", "set client_secret_file or client_secret_env, not both")
        return None
    if secret_env:
        if secret_env not in environ:
            r.problem("client_secret_env", f"environment variable {secret_env} is not set")
            return None
        return environ[secret_env]
    if secret_file:
        text = _read_secret_file(_resolve(secret_file, base_dir), "client_secret_file", r)
        return text.strip() if text is not None else ""
    return None


def _strings(r: _Reader, name: str) -> tuple[str, ...]:
    """A string or a list of strings."""
    r.seen.add(name)
    value = r.table.get(name, [])
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) and v for v in values):
        r.problem(name, "must be a string or a list of non-empty strings")
        return ()
    return tuple(values)


_KEY_SETTINGS = (
    "private_key_file",
    "signing_algorithm",
    "key_id",
    "assertion_audience",
    "assertion_lifetime_seconds",
)
_GRANT_ASSERTION_SETTINGS = ("assertion_issuer", "assertion_subject")
_ANY_JWT_USE = 'grant = "jwt_bearer" or auth_method = "private_key_jwt"'
_KEY_NEEDS = {
    "RS256": "an RSA key of 2048 bits or more (RFC 7518 §3.3)",
    "ES256": "an EC key on curve P-256 (RFC 7518 §3.4)",
}


def _assertion(r: _Reader, grant: str, auth_method: str, base_dir: Path) -> AssertionConfig | None:
    """RFC 7523 signing settings, for grant = "jwt_bearer" and auth_method = "private_key_jwt"."""
    uses = [
        use
        for use, on in (
            ('grant = "jwt_bearer"', grant == "jwt_bearer"),
            ('auth_method = "private_key_jwt"', auth_method == "private_key_jwt"),
        )
        if on
    ]
    if not uses:
        _unused(r, _KEY_SETTINGS + _GRANT_ASSERTION_SETTINGS, _ANY_JWT_USE)
        return None
    if grant != "jwt_bearer":  # a client assertion's iss and sub are always the client_id
        _unused(r, _GRANT_ASSERTION_SETTINGS, 'grant = "jwt_bearer"')
    algorithm = r.get("signing_algorithm", str, "RS256")
    if algorithm not in SIGNING_ALGORITHMS:
        choices = ", ".join(SIGNING_ALGORITHMS)
        r.problem("signing_algorithm", f"must be one of {choices}, got {algorithm!r}")
    key_file = r.get("private_key_file", str, "")
    if not r.table.get("private_key_file"):
        r.problem("private_key_file", f"is required with {' and '.join(uses)}")
    key = _private_key(_resolve(key_file, base_dir), algorithm, r) if key_file else None
    key_id = r.get("key_id", str)
    issuer, subject = r.get("assertion_issuer", str), r.get("assertion_subject", str)
    audience = r.get("assertion_audience", str)
    lifetime = r.positive("assertion_lifetime_seconds", int, 300)
    if key is None:
        return None  # the problem is recorded already
    return AssertionConfig(key_file, key, algorithm, key_id, issuer, subject, audience, lifetime)


def _unused(r: _Reader, names: tuple[str, ...], needs: str) -> None:
    for name in names:
        if name in r.table:
            r.seen.add(name)
            r.problem(name, f"only applies with {needs}")


def _private_key(path: Path, algorithm: str, r: _Reader) -> SigningKey | None:
    """An unencrypted PEM private key, not readable by every user, that fits the algorithm."""
    text = _read_secret_file(path, "private_key_file", r)
    if text is None:
        return None
    try:
        key = serialization.load_pem_private_key(text.encode(), password=None)
    except TypeError:  # how cryptography says the key is password-protected
        r.problem("private_key_file", f"{path} is encrypted; store it unencrypted, mode 0600")
        return None
    except (ValueError, UnsupportedAlgorithm):
        r.problem("private_key_file", f"{path} is not a PEM private key")
        return None
    mismatch = _key_mismatch(key, algorithm)
    if mismatch is not None:
        r.problem("private_key_file", f"{path} holds {mismatch}")
    if mismatch or not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        return None
    return key


def _key_mismatch(key: PrivateKeyTypes, algorithm: str) -> str | None:
    """Why ``key`` cannot sign with ``algorithm``, or None when it can."""
    if algorithm not in _KEY_NEEDS:
        return None  # the algorithm itself is the problem, reported already
    if isinstance(key, rsa.RSAPrivateKey):
        found = f"a {key.key_size}-bit RSA key"
        fits = algorithm == "RS256" and key.key_size >= 2048
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        found = f"an EC key on curve {key.curve.name}"
        fits = algorithm == "ES256" and isinstance(key.curve, ec.SECP256R1)
    else:
        found, fits = f"a key of type {type(key).__name__}", False
    return None if fits else f"{found}; {algorithm} needs {_KEY_NEEDS[algorithm]}"


def _quirks(r: _Reader) -> ProviderQuirks:
    """[provider.quirks]: how this provider's token endpoint departs from RFC 6749 §5.2."""
    fields = {
        name: r.get(name, str, default)
        for name, default in (
            ("error_field", "error"),
            ("error_description_field", "error_description"),
        )
    }
    for name, dotted in fields.items():
        if "" in dotted.split("."):
            r.problem(name, f"must be a field name or a dotted path (error.code), got {dotted!r}")
    statuses = r.get("error_statuses", list, [400, 401])
    if not all(isinstance(s, int) and 400 <= s <= 599 for s in statuses):
        r.problem("error_statuses", "must be a list of HTTP status codes between 400 and 599")
    aliases = r.get("error_aliases", dict, {})
    for code, standard in sorted(aliases.items()):
        if standard not in TOKEN_ERROR_CODES:
            r.problem(f"error_aliases.{code}", f"must be one of {', '.join(TOKEN_ERROR_CODES)}")
    r.finish()
    return ProviderQuirks(
        fields["error_field"],
        fields["error_description_field"],
        tuple(statuses),
        tuple(sorted(aliases.items())),
    )


def _upstream(table: dict[str, Any], path: str, problems: list[str]) -> UpstreamConfig:
    r = _Reader(table, path, problems)
    host, port = _listen(r, "")
    target = r.get("target", str, "", required=True)
    if target and not _is_http_url(target):
        r.problem("target", f"must be an http(s) URL without query or fragment, got {target!r}")
    statuses = r.get("retry_statuses", list, [401])
    if not all(isinstance(s, int) and 400 <= s <= 599 for s in statuses):
        r.problem("retry_statuses", "must be a list of HTTP status codes between 400 and 599")
    upstream = UpstreamConfig(
        name=r.get("name", str, "", required=True),
        host=host,
        port=port,
        target=target.rstrip("/"),
        provider=r.get("provider", str, "", required=True),
        default_account=r.get("default_account", str),
        connect_timeout_seconds=r.positive("connect_timeout_seconds", float, 5.0),
        read_timeout_seconds=r.positive("read_timeout_seconds", float, 60.0),
        replay_limit_bytes=r.get("replay_limit_bytes", int, 1024 * 1024),
        retry_statuses=tuple(statuses),
        require_invalid_token_challenge=r.get("require_invalid_token_challenge", bool, False),
        max_connections=r.positive("max_connections", int, 100),
        pool_wait_seconds=r.positive("pool_wait_seconds", float, 5.0),
        client_header_timeout_seconds=r.positive("client_header_timeout_seconds", float, 60.0),
        client_body_timeout_seconds=r.positive("client_body_timeout_seconds", float, 60.0),
    )
    if upstream.replay_limit_bytes is not None and upstream.replay_limit_bytes < 0:
        r.problem("replay_limit_bytes", "must be 0 or more")
    if "listen" not in table:
        r.problem("listen", "is required")
    r.finish()
    return upstream


def _is_http_url(url: str) -> bool:
    parts = urlsplit(url)
    return (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and not (parts.query or parts.fragment)
    )


def _cross_check(
    providers: tuple[ProviderConfig, ...],
    upstreams: tuple[UpstreamConfig, ...],
    admin: AdminConfig,
    problems: list[str],
) -> None:
    names = [p.name for p in providers]
    for i, name in enumerate(names):
        if name and names.index(name) != i:
            problems.append(f"provider[{i}].name: duplicate provider name {name!r}")
    if not upstreams:
        problems.append("upstream: at least one [[upstream]] is required")
    seen_listens = {(admin.host, admin.port): "admin.listen"}
    for i, up in enumerate(upstreams):
        if up.provider and up.provider not in names:
            problems.append(f"upstream[{i}].provider: no provider named {up.provider!r}")
        where = seen_listens.setdefault((up.host, up.port), f"upstream[{i}].listen")
        if up.port and where != f"upstream[{i}].listen":
            problems.append(f"upstream[{i}].listen: {up.host}:{up.port} is also {where}")
