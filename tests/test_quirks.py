"""Provider quirks: non-standard token endpoint errors, read at one seam (grants/quirks.py).

Each quirk is a [provider.quirks] setting; without it the answer is read by RFC 6749 §5.2 alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sidecar import config as config_module
from sidecar.config import ProviderQuirks
from sidecar.errors import ConfigError, FatalGrantError, TransientGrantError
from sidecar.grants.base import classify
from tests.conftest import base_config, seed

STANDARD = ProviderQuirks()
GITHUB = ProviderQuirks(error_aliases=(("bad_refresh_token", "invalid_grant"),))
INVALID_TOKEN = ProviderQuirks(error_aliases=(("invalid_token", "invalid_grant"),))
ERROR_CODE_FIELD = ProviderQuirks(error_field="errorCode", error_description_field="message")
NESTED = ProviderQuirks(error_field="error.code", error_description_field="error.message")
FORBIDDEN = ProviderQuirks(error_statuses=(400, 401, 403))


def answer(
    status: int, body: object, quirks: ProviderQuirks = STANDARD, retry_after: str | None = None
) -> Exception | str:
    """What classify makes of an answer: the error it raises, or the access token."""
    headers = {"Retry-After": retry_after} if retry_after else {}
    try:
        return classify(status, headers, json.dumps(body).encode(), 0.0, quirks).access_token
    except (FatalGrantError, TransientGrantError) as exc:
        return exc


def fatal(result: Exception | str) -> tuple[str, str]:
    assert isinstance(result, FatalGrantError), result
    return result.error, result.description


def transient(result: Exception | str) -> str:
    assert isinstance(result, TransientGrantError), result
    return result.reason


def test_standard_answers_are_read_by_rfc_6749_alone() -> None:
    assert fatal(answer(400, {"error": "invalid_grant", "error_description": "gone"})) == (
        "invalid_grant",
        "gone",
    )
    assert fatal(answer(401, {"error": "invalid_client"})) == ("invalid_client", "")
    assert transient(answer(400, {"error": "slow_down"})) == (
        "token endpoint error 'slow_down' (HTTP 400)"
    )
    assert transient(answer(403, {"error": "invalid_grant"})) == "token endpoint answered HTTP 403"
    assert answer(200, {"access_token": "a", "token_type": "Bearer"}) == "a"


def test_an_alias_maps_a_provider_code_onto_ours() -> None:
    body = {"error": "invalid_token", "error_description": "refresh token expired"}
    assert transient(answer(400, body)) == "token endpoint error 'invalid_token' (HTTP 400)"
    assert fatal(answer(400, body, INVALID_TOKEN)) == (
        "invalid_grant",
        "refresh token expired (the provider said 'invalid_token')",
    )
    # Codes that are not aliased keep their standard meaning.
    assert fatal(answer(400, {"error": "invalid_client"}, INVALID_TOKEN))[0] == "invalid_client"


def test_an_error_in_a_200_answer_is_an_error() -> None:
    """GitHub answers a dead refresh token with HTTP 200 and an error field."""
    body = {"error": "bad_refresh_token", "error_description": "The refresh token is incorrect"}
    assert transient(answer(200, body)) == ("token endpoint error 'bad_refresh_token' (HTTP 200)")
    assert fatal(answer(200, body, GITHUB))[0] == "invalid_grant"
    assert fatal(answer(200, {"error": "invalid_grant"}))[0] == "invalid_grant"
    # With an access token it is a token, whatever else the body says.
    assert answer(200, {"access_token": "a", "error": "invalid_grant"}) == "a"


def test_the_error_code_may_live_in_another_field() -> None:
    body = {"errorCode": "invalid_grant", "message": "consent revoked"}
    assert transient(answer(400, body)) == "token endpoint answered HTTP 400"
    assert fatal(answer(400, body, ERROR_CODE_FIELD)) == ("invalid_grant", "consent revoked")


def test_the_error_code_may_be_nested() -> None:
    body = {"error": {"code": "invalid_grant", "message": "user deleted"}}
    assert transient(answer(400, body)) == "token endpoint answered HTTP 400"
    assert fatal(answer(400, body, NESTED)) == ("invalid_grant", "user deleted")
    # An exact path: a different shape is no error code, not a guess.
    assert transient(answer(400, {"error": "invalid_grant"}, NESTED)) == (
        "token endpoint answered HTTP 400"
    )


def test_errors_may_come_with_another_status() -> None:
    assert fatal(answer(403, {"error": "invalid_grant"}, FORBIDDEN))[0] == "invalid_grant"
    assert transient(answer(403, {"error": "slow_down"}, FORBIDDEN)) == (
        "token endpoint error 'slow_down' (HTTP 403)"
    )
    # Statuses not listed stay read by their status alone.
    assert transient(answer(500, {"error": "invalid_grant"}, FORBIDDEN)) == (
        "token endpoint answered HTTP 500"
    )


def test_retry_after_is_kept_for_transient_errors() -> None:
    result = answer(400, {"error": "temporarily_unavailable"}, retry_after="7")
    assert isinstance(result, TransientGrantError) and result.retry_after == 7.0
    result = answer(429, {}, FORBIDDEN, retry_after="3")
    assert isinstance(result, TransientGrantError) and result.retry_after == 3.0


def parse_quirks(secrets_dir: Path, quirks: dict[str, Any]) -> ProviderQuirks:
    raw = base_config(secrets_dir, "http://127.0.0.1:1/t", "http://127.0.0.1:2")
    raw["provider"][0]["quirks"] = quirks
    return config_module.parse(raw, {}, secrets_dir).providers[0].quirks


def test_quirks_are_configured_per_provider(secrets_dir: Path) -> None:
    assert parse_quirks(secrets_dir, {}) == STANDARD
    quirks = parse_quirks(
        secrets_dir,
        {
            "error_field": "error.code",
            "error_description_field": "error.message",
            "error_statuses": [400, 401, 403],
            "error_aliases": {
                "invalid_token": "invalid_grant",
                "bad_refresh_token": "invalid_grant",
            },
        },
    )
    assert quirks == ProviderQuirks(
        "error.code",
        "error.message",
        (400, 401, 403),
        (("bad_refresh_token", "invalid_grant"), ("invalid_token", "invalid_grant")),
    )


def test_quirk_problems_are_reported_with_their_key_paths(secrets_dir: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_quirks(
            secrets_dir,
            {
                "error_field": "error..code",
                "error_statuses": [200, 403],
                "error_aliases": {"nope": "fatal", "invalid_token": "invalid_grant"},
                "colour": "blue",
            },
        )
    assert info.value.problems == [
        "provider[0].quirks.error_field: must be a field name or a dotted path (error.code), "
        "got 'error..code'",
        "provider[0].quirks.error_statuses: must be a list of HTTP status codes between 400 "
        "and 599",
        "provider[0].quirks.error_aliases.nope: must be one of "
        + ", ".join(config_module.TOKEN_ERROR_CODES),
        "provider[0].quirks.colour: unknown key",
    ]


async def test_a_quirky_fatal_answer_marks_the_account_through_the_proxy(
    make_sidecar, idp, api, clock, client
) -> None:
    sidecar = await make_sidecar(
        provider={"quirks": {"error_aliases": {"bad_refresh_token": "invalid_grant"}}}
    )
    # STALE: refreshed before use (a 1-h token near its end)
    await seed(sidecar, idp, api, clock, expires_in=10, lifetime=3600)
    idp.script.append(lambda: web.json_response({"error": "bad_refresh_token"}, status=200))
    for _ in range(2):
        async with client.get(sidecar.url("api") + "/x") as resp:
            body = await resp.json()
            assert (resp.status, resp.headers["X-Sidecar-Error"]) == (
                401,
                "reauthorization_required",
            )
            assert body["reason"] == "invalid_grant"
    assert idp.calls == 1 and api.calls == 0
    row = await sidecar.store.get("example", "main")
    assert row is not None
    assert (row.state, row.state_reason) == ("reauthorization_required", "invalid_grant")
