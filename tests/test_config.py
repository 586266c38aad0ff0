"""Configuration: every problem at once, each with its key path; secrets read safely."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar import config as config_module
from sidecar.crypto import generate_key
from sidecar.errors import ConfigError
from tests.conftest import base_config, write_secret

ROOT = Path(__file__).resolve().parent.parent


def problems_of(raw: dict, tmp: Path, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_module.parse(raw, environ or {}, tmp)
    return info.value.problems


def test_valid_config_parses_with_defaults(secrets_dir: Path) -> None:
    cfg = config_module.parse(
        base_config(secrets_dir, "http://127.0.0.1:1/t", "https://api.example.com/"),
        {},
        secrets_dir,
    )
    provider, upstream = cfg.providers[0], cfg.upstreams[0]
    assert provider.client_secret == "s3cr3t-client-value"  # newline stripped
    assert "s3cr3t" not in repr(provider) and "keys" not in repr(cfg.store)
    assert (upstream.target, upstream.replay_limit_bytes, upstream.retry_statuses) == (
        "https://api.example.com",
        1024 * 1024,
        (401,),
    )
    assert (cfg.admin.host, len(cfg.store.keys)) == ("127.0.0.1", 1)


def test_every_problem_is_reported_with_its_key_path(secrets_dir: Path) -> None:
    raw = base_config(secrets_dir, "ftp://nope", "not a url")
    raw["provider"][0].update(
        grant="password", timeout_seconds=-1, colour="blue", max_concurrent_refreshes="four"
    )
    raw["upstream"][0].update(provider="missing", listen="0.0.0.0:8081")
    raw["admin"]["listen"] = "nonsense"
    problems = problems_of(raw, secrets_dir)
    expected = [
        "provider[0].token_url: must be an http(s) URL",
        "provider[0].grant: must be one of refresh_token, client_credentials",
        "provider[0].timeout_seconds: must be greater than 0",
        "provider[0].colour: unknown key",
        "provider[0].max_concurrent_refreshes: must be an integer",
        "upstream[0].target: must be an http(s) URL",
        "upstream[0].provider: no provider named 'missing'",
        "upstream[0].listen: 0.0.0.0 is not a loopback address",
        "admin.listen: must be host:port",
    ]
    for prefix in expected:
        assert any(p.startswith(prefix) for p in problems), (prefix, problems)
    assert len(problems) == len(expected)


def test_non_loopback_listener_needs_explicit_setting(secrets_dir: Path) -> None:
    raw = base_config(secrets_dir, "http://127.0.0.1:1/t", "http://127.0.0.1:2")
    raw["upstream"][0]["listen"] = "0.0.0.0:8081"
    assert problems_of(raw, secrets_dir)
    raw["upstream"][0]["allow_non_loopback"] = True
    cfg = config_module.parse(raw, {}, secrets_dir)
    assert cfg.upstreams[0].host == "0.0.0.0"


def test_secret_files_missing_or_world_readable(secrets_dir: Path) -> None:
    raw = base_config(secrets_dir, "http://127.0.0.1:1/t", "http://127.0.0.1:2")
    os.chmod(secrets_dir / "store.key", 0o644)
    raw["provider"][0]["client_secret_file"] = str(secrets_dir / "absent")
    problems = problems_of(raw, secrets_dir)
    assert any(p.startswith("store.key_file:") and "readable by every user" in p for p in problems)
    assert any(
        p.startswith("provider[0].client_secret_file:") and "does not exist" in p for p in problems
    )


def test_client_secret_from_environment(secrets_dir: Path) -> None:
    raw = base_config(secrets_dir, "http://127.0.0.1:1/t", "http://127.0.0.1:2")
    del raw["provider"][0]["client_secret_file"]
    raw["provider"][0]["client_secret_env"] = "CLIENT_SECRET"
    assert problems_of(raw, secrets_dir) == [
        "provider[0].client_secret_env: environment variable CLIENT_SECRET is not set"
    ]
    cfg = config_module.parse(raw, {"CLIENT_SECRET": "from-env"}, secrets_dir)
    assert cfg.providers[0].client_secret == "from-env"


def test_bad_key_file_line(secrets_dir: Path) -> None:
    write_secret(secrets_dir / "store.key", generate_key() + "\nnot-a-key\n")
    raw = base_config(secrets_dir, "http://127.0.0.1:1/t", "http://127.0.0.1:2")
    assert problems_of(raw, secrets_dir) == [
        "store.key_file: line 2 is not a base64-encoded 32-byte key "
        "(make one with `sidecar keys generate`)"
    ]


def check_config(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
    )


def test_example_config_is_accepted(tmp_path: Path) -> None:
    shutil.copy(ROOT / "config.example.toml", tmp_path / "config.toml")
    write_secret(tmp_path / "store.key", generate_key())
    write_secret(tmp_path / "client-secret", "x")
    result = check_config(tmp_path / "config.toml")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: 1 provider(s), 1 upstream(s)")


def test_check_config_exits_2_listing_every_problem(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text(
        '[store]\nkey_file = "missing.key"\n[[upstream]]\nname = "a"\nlisten = "127.0.0.1:1"\n'
        'target = "https://x"\nprovider = "p"\n'
    )
    result = check_config(tmp_path / "config.toml")
    assert result.returncode == 2
    assert "store.key_file:" in result.stderr and "does not exist" in result.stderr
    assert "upstream[0].provider: no provider named 'p'" in result.stderr
    assert result.stderr.startswith("2 configuration problem(s):")


def test_not_toml_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("[store\n")
    result = check_config(tmp_path / "config.toml")
    assert result.returncode == 2 and "not valid TOML" in result.stderr


def test_store_url_from_a_secret_file(secrets_dir: Path) -> None:
    raw = base_config(secrets_dir, "http://127.0.0.1:1/t", "http://127.0.0.1:2")
    write_secret(secrets_dir / "store-url", "postgresql://app:pw@db:5432/tokens\n")
    del raw["store"]["url"]
    raw["store"]["url_file"] = "store-url"
    cfg = config_module.parse(raw, {}, secrets_dir)
    assert cfg.store.url == "postgresql://app:pw@db:5432/tokens"
    assert "pw" not in repr(cfg)
    raw["store"]["url"] = "sqlite://x.db"
    assert problems_of(raw, secrets_dir) == ["store.url_file: set url or url_file, not both"]
