"""A PostgreSQL outage under traffic: valid tokens keep flowing, refreshes wait and resume.

The sidecar reaches PostgreSQL through a TCP relay that the test cuts (every connection
dropped, new ones refused) and restores, as a restart or a network partition would.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from sidecar.credentials.codec import unseal
from sidecar.crypto import TokenCipher
from tests.conftest import seed

if TYPE_CHECKING:
    from tests.pg import PgSchema

pytest_plugins = ("tests.pg",)


class Relay:
    """127.0.0.1:<port> -> the PostgreSQL server, until cut."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.server: asyncio.Server | None = None
        self.port = 0
        self.links: set[asyncio.StreamWriter] = set()

    async def up(self) -> None:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        for writer in list(self.links):
            writer.transport.abort()
        self.links.clear()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.links |= {writer, up_writer}
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self.links.discard(w)
                w.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def test_requests_flow_through_a_postgres_outage_and_the_refresh_resumes(
    make_sidecar, idp, api, clock, client, pg_schema: PgSchema
) -> None:
    server = urlsplit(pg_schema.url)
    relay = Relay(server.hostname or "127.0.0.1", server.port or 5432)
    await relay.up()
    url = pg_schema.url.replace(server.netloc, f"{server.username}@127.0.0.1:{relay.port}")
    sidecar = await make_sidecar(store={"url": url})
    seeded = await seed(sidecar, idp, api, clock, expires_in=3600)
    async with client.get(sidecar.url("api") + "/x") as resp:
        assert resp.status == 200  # the pair is cached now
    clock.advance(3600 - 60)  # STALE: every request wants a refresh; the token is still valid
    api.valid.add("access-2")

    await relay.cut()
    for _ in range(3):
        for _ in range(5):
            async with client.get(sidecar.url("api") + "/x") as resp:
                assert resp.status == 200
                assert (await resp.json())["token"] == seeded.access_token
        clock.advance(6)  # past each refresh backoff: the next request tries again
    assert idp.calls == 0  # no attempt could be recorded, so none reached the provider

    await relay.up()
    clock.advance(6)
    async with client.get(sidecar.url("api") + "/x") as resp:
        assert resp.status == 200
        assert (await resp.json())["token"] == "access-2"  # the refresh resumed
    # One rotation reached the provider, its result is stored, no refresh token was reused.
    assert (idp.calls, idp.reuse_detected) == (1, 0)
    row = await sidecar.store.get("example", "main")
    assert row is not None and row.version == 2
    assert unseal(TokenCipher(sidecar.config.store.keys), row).token.access_token == "access-2"
    await relay.cut()
