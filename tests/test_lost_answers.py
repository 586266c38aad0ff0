"""A lost token answer (the provider rotated, the answer never arrived) against providers with
and without a reuse grace period.

The sidecar presents the same refresh token again, the only safe move. With a grace period
(DOT's REFRESH_TOKEN_GRACE_PERIOD_SECONDS, Okta's grace period, Auth0's reuse interval) the
provider answers it again and the account lives; without one, the provider sees reuse and
revokes the family, and the account needs re-authorization, with the cause named. Either way
the loss is counted and logged with the account.
"""

from __future__ import annotations

import logging

import pytest

from tests.conftest import sample, seed

LOST = "sidecar_token_answers_lost_total"


def lost_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return [
        (r.__dict__["account"], r.__dict__["cause"])
        for r in caplog.records
        if r.getMessage() == "token_answer_lost"
    ]


@pytest.mark.parametrize("grace", [10.0, 0.0], ids=["with-grace", "without-grace"])
async def test_a_lost_answer_is_counted_logged_and_survived_only_with_a_grace_period(
    make_sidecar, idp, api, clock, client, caplog: pytest.LogCaptureFixture, grace: float
) -> None:
    caplog.set_level(logging.WARNING)
    idp.clock, idp.grace_seconds = clock, grace
    sidecar = await make_sidecar(provider={"backoff_initial_seconds": 1})
    seeded = await seed(sidecar, idp, api, clock, expires_in=0)
    idp.drop_answers = 1  # the provider rotates, the connection breaks before the answer
    async with client.get(sidecar.url("api") + "/x") as resp:
        assert (resp.status, resp.headers["X-Sidecar-Error"]) == (503, "token_unavailable")
    assert sample(sidecar, LOST, provider="example", cause="connection_lost") == 1
    assert lost_lines(caplog) == [("main", "connection_lost")]

    clock.advance(2)  # past the backoff, inside the grace period
    api.valid.update(idp.issued_access)
    async with client.get(sidecar.url("api") + "/x") as resp:
        status, body = resp.status, await resp.json()
    presented = [r["refresh_token"] for r in idp.requests]
    assert presented == [seeded.refresh_token] * 2  # the same token, never an invented one
    row = await sidecar.store.get("example", "main")
    assert row is not None
    if grace:
        assert (status, body["token"]) == (200, idp.issued_access[-1])
        assert (idp.grace_answers, idp.reuse_detected) == (1, 0)
        assert (row.state, row.refresh_attempt_at) == ("active", None)
    else:
        assert (status, body["error"], body["reason"]) == (
            401,
            "reauthorization_required",
            "refresh_outcome_lost",
        )
        assert idp.reuse_detected == 1
        assert (row.state, row.state_reason) == ("reauthorization_required", "refresh_outcome_lost")
        assert (
            sample(
                sidecar,
                "sidecar_account_reauthorizations_total",
                provider="example",
                reason="refresh_outcome_lost",
            )
            == 1
        )
    assert sample(sidecar, LOST, provider="example", cause="connection_lost") == 1
