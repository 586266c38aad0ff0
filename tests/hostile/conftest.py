"""Fixtures of the hostile-input suite: a sidecar between a raw app and a recording target."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from tests.conftest import seed
from tests.hostile.harness import Rig
from tests.hostile.target import RecordingUpstream, Reply, Script, answer

MakeRig = Callable[..., Awaitable[Rig]]


def _never_answer(_: Any) -> Reply:
    return Reply(b"", "hold")


@pytest.fixture
async def make_rig(
    make_sidecar: Any, idp: Any, api: Any, clock: Any, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[MakeRig]:
    """Start a recording target, a silent second target and a sidecar seeded with two
    accounts ("main", the default, and "other"); ``upstream`` keys go to [[upstream]]."""
    made: list[Rig] = []

    async def make(script: Script = answer, **upstream: Any) -> Rig:
        target = await RecordingUpstream(script).start()
        silent = await RecordingUpstream(_never_answer).start()
        sidecar = await make_sidecar(upstream={"target": target.url, **upstream})
        tokens = {}
        for account in ("main", "other"):
            token = await seed(sidecar, idp, api, clock, account=account)
            tokens[account] = token.access_token.encode()
        target.accounts = {token: account for account, token in tokens.items()}
        rig = Rig(sidecar, target, silent, tokens, caplog)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        await rig.close()
        await rig.upstream.stop()
        await rig.silent.stop()
