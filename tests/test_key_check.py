"""A key file that does not match the store is found at start, not by the app's requests."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from sidecar.credentials.maintenance import import_credentials
from sidecar.crypto import TokenCipher, generate_key, key_id
from sidecar.model import Credential, Token
from tests.conftest import base_config, sample, write_secret
from tests.test_cli import free_port, write_config
from tests.test_cli import sidecar_cmd as sidecar

ACCOUNT = "X-Sidecar-Account"


def kid(line: str) -> str:
    return key_id(base64.urlsafe_b64decode(line))


async def test_a_row_sealed_with_an_unknown_key_is_a_clear_503_not_a_500(
    make_sidecar, idp, api, clock, client
) -> None:
    """Another replica with another key file wrote the row: the app gets the sidecar's own
    JSON error naming the cause, with X-Sidecar-Error, and no token is ever injected."""
    running = await make_sidecar()
    other_key = generate_key()
    other = TokenCipher([base64.urlsafe_b64decode(other_key)])
    token = Token("foreign-access", "foreign-refresh", clock() + 3600)
    await import_credentials(running.store, other, [Credential("example", "main", token, 0)])

    for _ in range(2):  # not cached as a good pair: the second request is answered the same
        async with client.get(running.url("api") + "/x") as resp:
            assert resp.status == 503
            assert resp.headers["X-Sidecar-Error"] == "token_undecryptable"
            body = await resp.json()
            assert body["error"] == "token_undecryptable"
            assert kid(other_key) in body["message"] and "key_file" in body["message"]
    assert api.calls == 0 and idp.calls == 0
    assert sample(running, "sidecar_errors_total", upstream="api", code="internal_error") == 0


def test_check_config_and_run_refuse_keys_that_cannot_decrypt_the_store(
    secrets_dir: Path,
) -> None:
    raw = base_config(secrets_dir, "http://127.0.0.1:9/token", "http://127.0.0.1:9")
    raw["admin"]["listen"] = f"127.0.0.1:{free_port()}"
    config = write_config(secrets_dir, raw)
    key_file = secrets_dir / "store.key"
    old = key_file.read_text().strip()
    pair = {"account": "main", "access_token": "at-1", "refresh_token": "rt-1"}
    imported = sidecar(
        "accounts", "import", "--config", str(config), "--provider", "example",
        stdin=json.dumps(pair),
    )  # fmt: skip
    assert imported.returncode == 0, imported.stderr

    new = generate_key()
    write_secret(key_file, new + "\n")  # the old key was dropped before `keys rotate` ran
    for command in ("check-config", "run"):
        result = sidecar(command, "--config", str(config))
        assert result.returncode == 2, (command, result.stderr)
        problem = [line for line in result.stderr.splitlines() if "store.key_file" in line]
        assert len(problem) == 1, result.stderr
        assert f"key id(s) in use: {kid(old)} (1 row)" in problem[0]
        assert f"configured: {kid(new)}" in problem[0]
        assert "Traceback" not in result.stderr and '"event": "ready"' not in result.stderr

    write_secret(key_file, new + "\n" + old + "\n")  # mid-rotation: every id is configured
    result = sidecar("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: 1 provider(s), 1 upstream(s)")


def test_check_config_does_not_create_a_missing_sqlite_store(secrets_dir: Path) -> None:
    config = write_config(
        secrets_dir, base_config(secrets_dir, "http://127.0.0.1:9/token", "http://127.0.0.1:9")
    )
    result = sidecar("check-config", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert not (secrets_dir / "tokens.db").exists()
