"""A port already in use: one line naming the listener and the address, exit code 2."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import base_config
from tests.test_cli import free_port, write_config


@pytest.fixture
def taken() -> Iterator[int]:
    """A port another program listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def own_lines(stderr: str) -> list[str]:
    """What the command printed itself, without its JSON log lines."""
    lines = []
    for line in stderr.splitlines():
        try:
            json.loads(line)
        except ValueError:
            lines.append(line)
    return lines


def run(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("listener", ["api", "admin"])
def test_run_on_a_port_in_use_prints_one_line_and_exits_2(
    secrets_dir: Path, taken: int, listener: str
) -> None:
    raw = base_config(secrets_dir, "http://127.0.0.1:9/token", "http://127.0.0.1:9")
    raw["admin"]["listen"] = f"127.0.0.1:{taken if listener == 'admin' else free_port()}"
    raw["upstream"][0]["listen"] = f"127.0.0.1:{taken if listener == 'api' else free_port()}"
    result = run(write_config(secrets_dir, raw))
    assert result.returncode == 2, result.stderr
    assert own_lines(result.stderr) == [
        f"error: cannot listen on 127.0.0.1:{taken} for the {listener} listener: "
        "address already in use"
    ]
    assert "Traceback" not in result.stderr


async def test_a_second_sidecar_dev_prints_one_line_and_exits_2() -> None:
    port, admin_port, provider_port = free_port(), free_port(), free_port()
    command = [sys.executable, "-m", "sidecar", "dev", "--port", str(port)]
    command += ["--admin-port", str(admin_port), "--provider-port", str(provider_port)]
    command += ["--api-port", "0"]
    first = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    try:
        assert first.stdout is not None
        banner = await asyncio.wait_for(first.stdout.readline(), 30)
        assert banner.startswith(b"oauth-sidecar demo is running")
        second = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(second.communicate(), 30)
        assert second.returncode == 2, err.decode()
        assert out == b""
        assert own_lines(err.decode()) == [
            f"error: cannot listen on 127.0.0.1:{provider_port} for the demo provider listener: "
            "address already in use"  # the demo provider is bound first
        ]
    finally:
        first.terminate()
        assert await asyncio.wait_for(first.wait(), 30) == 0
