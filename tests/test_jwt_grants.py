"""RFC 7523 JWTs, as the grant (jwt_bearer) and as client authentication (private_key_jwt).

The fake token endpoint verifies every assertion with the public key (PyJWT) and checks iss,
sub, aud, exp, iat, kid and that no jti comes twice; it refuses anything else, as a provider
would. Keys are made fresh in tmp_path, RS256 and ES256 alike.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from sidecar import config as config_module
from sidecar.config import ProviderConfig
from sidecar.errors import ConfigError, FatalGrantError
from sidecar.grants import make_grant
from sidecar.http.client import HttpClient
from tests.conftest import CLIENT_SECRET, base_config, seed, write_secret
from tests.fakes import FakeTokenEndpoint, FakeUpstream, ManualClock, oauth_error

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
CLAIMS = ["iss", "sub", "aud", "exp", "iat", "jti"]


@dataclass
class KeyPair:
    algorithm: str
    path: Path
    public_key: PublicKeyTypes


def write_key(path: Path, key: PrivateKeyTypes, mode: int = 0o600, password: bytes = b"") -> Path:
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    write_secret(path, pem.decode())
    os.chmod(path, mode)
    return path


def rsa_key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def ec_key(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve or ec.SECP256R1())


@pytest.fixture(params=["RS256", "ES256"])
def keypair(request: pytest.FixtureRequest, tmp_path: Path) -> KeyPair:
    key = rsa_key() if request.param == "RS256" else ec_key()
    path = write_key(tmp_path / f"client-{request.param}.pem", key)
    return KeyPair(request.param, path, key.public_key())


@dataclass
class AssertionCheckingEndpoint(FakeTokenEndpoint):
    """A token endpoint that takes RFC 7523 assertions, but only ones that verify.

    ``expect`` holds what the next grant assertion must claim (iss, sub); a client assertion
    must claim the client_id for both (RFC 7523 §3, OIDC Core §9).
    """

    url: str = ""
    clock: ManualClock = field(default_factory=ManualClock)
    public_key: Any = None
    algorithm: str = "RS256"
    key_id: str | None = None
    client_id: str = "client-1"
    audience: str = ""
    lifetime: int = 300
    expect: dict[str, str] = field(default_factory=dict)
    verified: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    raw_forms: list[list[tuple[str, str]]] = field(default_factory=list)
    jtis: set[str] = field(default_factory=set)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        # The multidict keeps repeated parameters (resource) that a dict would fold.
        self.raw_forms.append([(k, str(v)) for k, v in (await request.post()).items()])
        return await super().handle(request)

    def _issue(self, form: dict[str, object]) -> web.Response:
        if "client_assertion" in form:
            if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
                return oauth_error("invalid_client", "wrong client_assertion_type", 401)
            problem = self._verify("client", str(form["client_assertion"]), self.client_id, None)
            if problem:
                return oauth_error("invalid_client", problem, 401)
        if form.get("grant_type") != GRANT_TYPE:
            return super()._issue(form)
        issuer = self.expect.get("iss", self.client_id)
        problem = self._verify("grant", str(form.get("assertion")), issuer, self.expect.get("sub"))
        if problem:
            return oauth_error("invalid_grant", problem)
        n = next(self._ids)
        self.issued_access.append(f"access-{n}")
        # A refresh token the sidecar must not keep: it can always sign a new assertion.
        return web.json_response(
            {
                "access_token": f"access-{n}",
                "token_type": "Bearer",
                "expires_in": 600,
                "refresh_token": f"unwanted-{n}",
            }
        )

    def _verify(self, kind: str, assertion: str, issuer: str, subject: str | None) -> str:
        try:
            header = jwt.get_unverified_header(assertion)
            claims = jwt.decode(
                assertion,
                self.public_key,
                algorithms=[self.algorithm],
                audience=self.audience,
                issuer=issuer,
                # exp and iat are checked against the injected clock below, not real time.
                options={"require": CLAIMS, "verify_exp": False, "verify_iat": False},
            )
        except jwt.PyJWTError as exc:
            return f"assertion does not verify: {exc}"
        now = self.clock()
        checks = {
            "kid": header.get("kid") == self.key_id,
            "sub": claims["sub"] == (subject or issuer),
            "iat": claims["iat"] == int(now),
            "exp": claims["exp"] == claims["iat"] + self.lifetime and now < claims["exp"],
            "jti": claims["jti"] not in self.jtis,  # RFC 7523 §3 item 7: no replays
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            return f"bad {', '.join(failed)}: {header} {claims}"
        self.jtis.add(claims["jti"])
        self.verified.append((kind, claims))
        return ""


@pytest.fixture
async def idp(
    aiohttp_server: Any, clock: ManualClock, keypair: KeyPair
) -> AsyncIterator[AssertionCheckingEndpoint]:
    """Replaces conftest's idp, so make_sidecar talks to the assertion-checking endpoint."""
    fake = AssertionCheckingEndpoint(
        clock=clock, public_key=keypair.public_key, algorithm=keypair.algorithm
    )
    server = await aiohttp_server(fake.app())
    fake.url = fake.audience = str(server.make_url("/token"))
    yield fake


def provider_config(secrets_dir: Path, token_url: str, **settings: Any) -> ProviderConfig:
    raw = base_config(secrets_dir, token_url, "http://127.0.0.1:1", provider=settings)
    return config_module.parse(raw, {}, secrets_dir).providers[0]


async def fetch(provider: ProviderConfig, clock: ManualClock) -> Any:
    http = HttpClient()
    try:
        return await make_grant(http, provider, clock).fetch(None)
    finally:
        await http.close()


async def test_jwt_bearer_grant_sends_a_verified_assertion(
    secrets_dir: Path, idp: AssertionCheckingEndpoint, keypair: KeyPair, clock: ManualClock
) -> None:
    idp.key_id = "key-2024"
    provider = provider_config(
        secrets_dir,
        idp.url,
        grant="jwt_bearer",
        auth_method="none",
        private_key_file=str(keypair.path),
        signing_algorithm=keypair.algorithm,
        key_id="key-2024",
        scopes=["read", "write"],
    )
    token = await fetch(provider, clock)
    assert (token.access_token, token.refresh_token) == ("access-1", None)
    assert token.expires_at == clock() + 600
    form = idp.requests[0]
    assert set(form) == {"grant_type", "assertion", "scope", "client_id"}
    assert (form["grant_type"], form["scope"]) == (GRANT_TYPE, "read write")
    assert idp.auth_headers == [None]
    # A second grant is a new assertion: new iat from the clock, new jti.
    clock.advance(90)
    assert (await fetch(provider, clock)).access_token == "access-2"
    (_, first), (_, second) = idp.verified
    assert (first["iss"], first["sub"], first["aud"]) == ("client-1", "client-1", idp.url)
    assert (first["iat"], first["exp"]) == (int(clock()) - 90, int(clock()) - 90 + 300)
    assert (second["iat"], second["exp"]) == (int(clock()), int(clock()) + 300)
    assert first["jti"] != second["jti"] and idp.calls == 2


async def test_private_key_jwt_authenticates_the_client_through_the_proxy(
    make_sidecar,
    idp: AssertionCheckingEndpoint,
    api: FakeUpstream,
    keypair: KeyPair,
    clock: ManualClock,
    client: aiohttp.ClientSession,
) -> None:
    sidecar = await make_sidecar(
        provider={
            "grant": "client_credentials",
            "auth_method": "private_key_jwt",
            "private_key_file": str(keypair.path),
            "signing_algorithm": keypair.algorithm,
        }
    )
    api.valid.update({"access-1", "access-2"})
    async with client.get(sidecar.url("api") + "/x") as resp:
        assert (resp.status, (await resp.json())["token"]) == (200, "access-1")
    form = idp.requests[0]
    assert set(form) == {"grant_type", "client_id", "client_assertion_type", "client_assertion"}
    assert CLIENT_SECRET not in str(form) and idp.auth_headers == [None]
    clock.advance(3600)  # expired: a new token, so a new client assertion
    async with client.get(sidecar.url("api") + "/x") as resp:
        assert (resp.status, (await resp.json())["token"]) == (200, "access-2")
    kinds = [kind for kind, _ in idp.verified]
    claims = [c for _, c in idp.verified]
    assert kinds == ["client", "client"] and idp.calls == 2
    assert {(c["iss"], c["sub"], c["aud"]) for c in claims} == {("client-1", "client-1", idp.url)}
    assert [c["iat"] for c in claims] == [int(clock()) - 3600, int(clock())]
    assert claims[0]["jti"] != claims[1]["jti"]


async def test_private_key_jwt_on_refresh_token_grant(
    make_sidecar, idp, api, keypair, clock, client
) -> None:
    sidecar = await make_sidecar(
        provider={
            "auth_method": "private_key_jwt",
            "private_key_file": str(keypair.path),
            "signing_algorithm": keypair.algorithm,
        }
    )
    # STALE: refreshed first (a 1-h token near its end)
    seeded = await seed(sidecar, idp, api, clock, expires_in=10, lifetime=3600)
    api.valid.add("access-2")
    async with client.get(sidecar.url("api") + "/x") as resp:
        assert (resp.status, (await resp.json())["token"]) == (200, "access-2")
    assert idp.requests[0]["refresh_token"] == seeded.refresh_token
    assert [kind for kind, _ in idp.verified] == ["client"]


async def test_jwt_bearer_grant_with_private_key_jwt_and_custom_claims(
    secrets_dir: Path, idp: AssertionCheckingEndpoint, keypair: KeyPair, clock: ManualClock
) -> None:
    idp.audience, idp.lifetime = "https://issuer.example.com", 60
    idp.expect = {"iss": "svc@example.com", "sub": "user-42"}
    provider = provider_config(
        secrets_dir,
        idp.url,
        grant="jwt_bearer",
        auth_method="private_key_jwt",
        private_key_file=str(keypair.path),
        signing_algorithm=keypair.algorithm,
        assertion_issuer="svc@example.com",
        assertion_subject="user-42",
        assertion_audience="https://issuer.example.com",
        assertion_lifetime_seconds=60,
    )
    assert (await fetch(provider, clock)).access_token == "access-1"
    (kind_1, client_claims), (kind_2, grant_claims) = idp.verified
    assert (kind_1, client_claims["iss"], client_claims["sub"]) == (
        "client",
        "client-1",
        "client-1",
    )
    assert (kind_2, grant_claims["iss"], grant_claims["sub"]) == (
        "grant",
        "svc@example.com",
        "user-42",
    )
    assert {client_claims["aud"], grant_claims["aud"]} == {"https://issuer.example.com"}
    assert client_claims["exp"] - client_claims["iat"] == 60
    assert client_claims["jti"] != grant_claims["jti"]


async def test_rejected_assertion_is_fatal(
    secrets_dir: Path, idp: AssertionCheckingEndpoint, keypair: KeyPair, clock: ManualClock
) -> None:
    """A provider that does not know the key: the grant is dead until the config changes."""
    idp.public_key = (rsa_key() if keypair.algorithm == "RS256" else ec_key()).public_key()
    settings = {"private_key_file": str(keypair.path), "signing_algorithm": keypair.algorithm}
    as_grant = provider_config(
        secrets_dir,
        idp.url,
        grant="jwt_bearer",
        auth_method="none",
        **settings,
    )
    with pytest.raises(FatalGrantError) as info:
        await fetch(as_grant, clock)
    assert info.value.error == "invalid_grant" and "does not verify" in info.value.description
    as_client = provider_config(
        secrets_dir,
        idp.url,
        grant="client_credentials",
        auth_method="private_key_jwt",
        **settings,
    )
    with pytest.raises(FatalGrantError) as info:
        await fetch(as_client, clock)
    assert info.value.error == "invalid_client" and idp.verified == []


async def test_audience_and_resource_go_with_every_token_request(
    make_sidecar, idp, api, clock, client
) -> None:
    sidecar = await make_sidecar(
        provider={
            "audience": "https://api.example.com",
            "resource": ["https://api.example.com/", "urn:example:files"],
            "extra_params": {"tenant": "t1"},
        }
    )
    await seed(sidecar, idp, api, clock, expires_in=10, lifetime=3600)
    api.valid.add("access-2")
    async with client.get(sidecar.url("api") + "/x") as resp:
        assert resp.status == 200
    sent = [(k, v) for k, v in idp.raw_forms[0] if k not in ("refresh_token",)]
    assert sent == [
        ("grant_type", "refresh_token"),
        ("tenant", "t1"),
        ("audience", "https://api.example.com"),
        ("resource", "https://api.example.com/"),
        ("resource", "urn:example:files"),
    ]


async def test_jwt_bearer_grant_through_the_proxy(
    make_sidecar, idp, api, keypair, clock, client
) -> None:
    sidecar = await make_sidecar(
        provider={
            "grant": "jwt_bearer",
            "auth_method": "none",
            "private_key_file": str(keypair.path),
            "signing_algorithm": keypair.algorithm,
        }
    )
    api.valid.update({"access-1", "access-2"})
    for expected in ("access-1", "access-1"):  # one token, whatever account is asked for
        async with client.get(
            sidecar.url("api") + "/x", headers={"X-Sidecar-Account": "anyone"}
        ) as resp:
            assert (resp.status, (await resp.json())["token"]) == (200, expected)
    clock.advance(600)
    async with client.get(sidecar.url("api") + "/x") as resp:
        assert (resp.status, (await resp.json())["token"]) == (200, "access-2")
    assert [kind for kind, _ in idp.verified] == ["grant", "grant"] and idp.calls == 2


# Configuration


def problems_of(raw: dict[str, Any], tmp: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_module.parse(raw, {}, tmp)
    return info.value.problems


def test_key_problems_are_all_reported_with_their_key_paths(secrets_dir: Path) -> None:
    d = secrets_dir
    keys = {
        "readable": write_key(d / "readable.pem", ec_key(), mode=0o644),
        "rsa": write_key(d / "rsa.pem", rsa_key()),
        "ec": write_key(d / "ec.pem", ec_key()),
        "small": write_key(d / "small.pem", rsa_key(1024)),
        "p384": write_key(d / "p384.pem", ec_key(ec.SECP384R1())),
        "locked": write_key(d / "locked.pem", ec_key(), password=b"pw"),
        "garbage": write_secret(d / "garbage.pem", "not a key\n"),
    }
    jwt_grant = {"grant": "jwt_bearer", "auth_method": "none"}
    key_auth = {"grant": "client_credentials", "auth_method": "private_key_jwt"}
    cases: list[tuple[dict[str, Any], str]] = [
        (
            {**jwt_grant, "private_key_file": "absent.pem"},
            f"private_key_file: {d}/absent.pem does not exist",
        ),
        (
            {**key_auth, "private_key_file": "readable.pem", "signing_algorithm": "ES256"},
            f"private_key_file: {keys['readable']} is readable by every user; chmod o-rwx it",
        ),
        (
            {**key_auth, "private_key_file": "rsa.pem", "signing_algorithm": "ES256"},
            f"private_key_file: {keys['rsa']} holds a 2048-bit RSA key; "
            "ES256 needs an EC key on curve P-256 (RFC 7518 §3.4)",
        ),
        (
            {**jwt_grant, "private_key_file": "ec.pem"},
            f"private_key_file: {keys['ec']} holds an EC key on curve secp256r1; "
            "RS256 needs an RSA key of 2048 bits or more (RFC 7518 §3.3)",
        ),
        (
            {**jwt_grant, "private_key_file": "small.pem", "signing_algorithm": "RS256"},
            f"private_key_file: {keys['small']} holds a 1024-bit RSA key; "
            "RS256 needs an RSA key of 2048 bits or more (RFC 7518 §3.3)",
        ),
        (
            {**jwt_grant, "private_key_file": "p384.pem", "signing_algorithm": "ES256"},
            f"private_key_file: {keys['p384']} holds an EC key on curve secp384r1; "
            "ES256 needs an EC key on curve P-256 (RFC 7518 §3.4)",
        ),
        (
            {**jwt_grant, "private_key_file": "locked.pem", "signing_algorithm": "ES256"},
            f"private_key_file: {keys['locked']} is encrypted; store it unencrypted, mode 0600",
        ),
        (
            {**jwt_grant, "private_key_file": "garbage.pem"},
            f"private_key_file: {keys['garbage']} is not a PEM private key",
        ),
        (
            {**jwt_grant, "private_key_file": "ec.pem", "signing_algorithm": "HS256"},
            "signing_algorithm: must be one of RS256, ES256, got 'HS256'",
        ),
        (jwt_grant, 'private_key_file: is required with grant = "jwt_bearer"'),
        (key_auth, 'private_key_file: is required with auth_method = "private_key_jwt"'),
        (
            {"private_key_file": "ec.pem"},
            'private_key_file: only applies with grant = "jwt_bearer" or '
            'auth_method = "private_key_jwt"',
        ),
        (
            {**key_auth, "private_key_file": "rsa.pem", "assertion_subject": "someone"},
            'assertion_subject: only applies with grant = "jwt_bearer"',
        ),
        (
            {**jwt_grant, "private_key_file": "rsa.pem", "assertion_lifetime_seconds": 0},
            "assertion_lifetime_seconds: must be greater than 0, got 0",
        ),
    ]
    raw = base_config(d, "http://127.0.0.1:1/t", "http://127.0.0.1:2")
    template = raw["provider"][0]
    raw["provider"] = [
        {**template, "name": f"p{i}", **settings} for i, (settings, _) in enumerate(cases)
    ]
    raw["upstream"][0]["provider"] = "p0"
    expected = [f"provider[{i}].{problem}" for i, (_, problem) in enumerate(cases)]
    assert problems_of(raw, d) == expected


def test_token_request_parameters_are_validated(secrets_dir: Path) -> None:
    raw = base_config(secrets_dir, "http://127.0.0.1:1/t", "http://127.0.0.1:2")
    raw["provider"][0].update(
        extra_params={"audience": "x", "grant_type": "password", "tenant": "ok"},
        audience=["ok", 3],
        resource=["https://api.example.com/v1", "api.example.com", "https://a.example/#frag"],
    )
    assert problems_of(raw, secrets_dir) == [
        "provider[0].extra_params: cannot set audience: use the provider's own key",
        "provider[0].extra_params: cannot set grant_type: it is ours",
        "provider[0].audience: must be a string or a list of non-empty strings",
        "provider[0].resource: 'api.example.com' is not an absolute URI without fragment "
        "(RFC 8707 §2)",
        "provider[0].resource: 'https://a.example/#frag' is not an absolute URI without "
        "fragment (RFC 8707 §2)",
    ]
    raw["provider"][0].update(extra_params={}, audience="https://api", resource="urn:x:y")
    provider = config_module.parse(raw, {}, secrets_dir).providers[0]
    assert (provider.audience, provider.resource) == (("https://api",), ("urn:x:y",))


def test_signing_settings_parse_and_keep_the_key_out_of_repr(
    secrets_dir: Path, keypair: KeyPair
) -> None:
    raw = base_config(secrets_dir, "http://127.0.0.1:1/t", "http://127.0.0.1:2")
    raw["provider"][0].update(
        grant="jwt_bearer",
        auth_method="private_key_jwt",
        private_key_file=keypair.path.name,  # relative to the config file
        signing_algorithm=keypair.algorithm,
        key_id="k1",
        assertion_subject="user-1",
    )
    provider = config_module.parse(raw, {}, secrets_dir).providers[0]
    assert provider.assertion is not None and provider.single_token
    a = provider.assertion
    assert (a.key_file, a.algorithm, a.key_id, a.issuer, a.subject, a.audience) == (
        keypair.path.name,
        keypair.algorithm,
        "k1",
        None,
        "user-1",
        None,
    )
    assert a.lifetime_seconds == 300
    assert a.key.public_key() == keypair.public_key
    for text in (repr(provider), repr(a)):
        assert "PrivateKey" not in text and "PRIVATE" not in text and keypair.path.name in text
    assert "key=" not in repr(a).replace("key_file=", "").replace("key_id=", "")


def test_single_token_providers() -> None:
    def single_token(grant: str) -> bool:
        return ProviderConfig("p", "https://idp/token", grant, "c").single_token

    assert single_token("client_credentials") and single_token("jwt_bearer")
    assert not single_token("refresh_token")
