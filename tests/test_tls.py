"""HTTPS to the upstream and to the token endpoint: verified certificates, nothing sent otherwise.

Real TLS servers on 127.0.0.1 with a certificate from a test CA; the sidecar trusts that CA
through ``SSL_CERT_FILE``, as an operator would point it at a private CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import seed
from tests.fakes import FakeTokenEndpoint, FakeUpstream

Serve = Callable[[web.Application, Path, Path], Awaitable[str]]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it: (ca.pem, server.pem)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_pem, server_pem = directory / f"{name}-ca.pem", directory / f"{name}-server.pem"
    ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    server_pem.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_pem, server_pem


@pytest.fixture
async def serve_tls() -> AsyncIterator[Serve]:
    runners: list[web.AppRunner] = []

    async def serve(app: web.Application, server_pem: Path, ca_pem: Path) -> str:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(server_pem)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        port = runner.addresses[0][1]
        return f"https://127.0.0.1:{port}"

    yield serve
    for runner in runners:
        await runner.cleanup()


async def test_https_upstream_and_token_endpoint_with_a_trusted_ca(
    make_sidecar, clock, client, serve_tls: Serve, tmp_path: Path, monkeypatch
) -> None:
    ca_pem, server_pem = make_ca(tmp_path, "trusted")
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_pem))
    idp, api = FakeTokenEndpoint(), FakeUpstream()
    token_url = await serve_tls(idp.app(), server_pem, ca_pem) + "/token"
    target = await serve_tls(api.app(), server_pem, ca_pem)
    sidecar = await make_sidecar(provider={"token_url": token_url}, upstream={"target": target})
    await seed(sidecar, idp, api, clock, expires_in=3600)
    clock.advance(3601)  # expired: the request needs a refresh over TLS, then a forward
    api.valid.add("access-2")
    async with client.get(sidecar.url("api") + "/v1/x") as resp:
        assert resp.status == 200
        assert (await resp.json())["token"] == "access-2"
    assert idp.calls == 1
    assert api.seen_auth == ["Bearer access-2"]


async def test_an_upstream_certificate_from_an_unknown_ca_gets_nothing(
    make_sidecar, idp, clock, client, serve_tls: Serve, tmp_path: Path, monkeypatch
) -> None:
    trusted_ca, _ = make_ca(tmp_path, "trusted")
    _, other_server_pem = make_ca(tmp_path, "other")
    monkeypatch.setenv("SSL_CERT_FILE", str(trusted_ca))
    api = FakeUpstream()
    target = await serve_tls(api.app(), other_server_pem, trusted_ca)
    sidecar = await make_sidecar(upstream={"target": target})
    await seed(sidecar, idp, api, clock)
    async with client.get(sidecar.url("api") + "/v1/x") as resp:
        assert resp.status == 502
        assert resp.headers["X-Sidecar-Error"] == "upstream_unavailable"
    assert api.calls == 0  # the handshake failed before any request: no token went out
