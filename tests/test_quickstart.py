"""The README's Quickstart, run as written against `sidecar dev`'s demo provider and API.

Each command of its code blocks runs in a shell in an empty directory, with `sidecar` on the
PATH. Two steps need what a person adds: `accounts connect` waits for someone to follow its URL
(an HTTP client signs in and approves), and `run` serves until stopped (it runs in the
background once it logs ``ready``, for the second block's commands).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from sidecar.dev import DevStack, start_dev
from tests.authserver import form_fields

README = Path(__file__).parent.parent / "README.md"
DEMO_PROVIDER_PORT, DEMO_API_PORT = 8180, 8181  # `sidecar dev`'s defaults, as the README says


def quickstart_blocks() -> list[list[str]]:
    """The Quickstart section's ``sh`` blocks, each as its commands (a heredoc or a line
    continued with a backslash is one command)."""
    section = README.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    return [_commands(block) for block in blocks]


def _commands(block: str) -> list[str]:
    commands: list[str] = []
    lines = iter(block.splitlines())
    for line in lines:
        command = line
        while command.endswith("\\"):
            command += "\n" + next(lines)
        heredoc = re.search(r"<<'?(\w+)'?", command)
        if heredoc:
            body = []
            for more in lines:
                body.append(more)
                if more == heredoc.group(1):
                    break
            command += "\n" + "\n".join(body)
        if command.strip():
            commands.append(command)
    return commands


@pytest.fixture
async def demo(tmp_path: Path) -> AsyncIterator[DevStack]:
    """`sidecar dev`, with its provider and API on the ports the README names."""
    stack = await start_dev(
        time.time,
        state_dir=tmp_path,
        proxy_port=0,
        admin_port=0,
        provider_port=DEMO_PROVIDER_PORT,
        api_port=DEMO_API_PORT,
    )
    yield stack
    await stack.stop()


def shell_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


async def shell(command: str, cwd: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        "bash",
        "-ec",
        command,
        cwd=cwd,
        env=shell_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def sign_in(url: str) -> str:
    """What a person does with the URL `connect` prints, at the demo provider."""
    async with aiohttp.ClientSession() as browser:
        async with browser.get(url) as resp:
            assert resp.status == 200
            fields = form_fields(await resp.text()) | {"approve": "yes"}
        async with browser.post(str(resp.url), data=fields) as resp:  # -> the redirect URI
            assert resp.status == 200
            return await resp.text()


async def connect(command: str, cwd: Path) -> None:
    proc = await shell(command, cwd)
    assert proc.stdout is not None
    async with asyncio.timeout(60):
        line = ""
        while not line.startswith("  http"):
            line = (await proc.stdout.readline()).decode()
            assert line, "connect exited before printing the URL"
        page = await sign_in(line.strip())
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert "is connected" in page and "connected new account 'main'" in out.decode()


async def run_until_ready(command: str, cwd: Path) -> asyncio.subprocess.Process:
    proc = await shell("exec " + command, cwd)
    assert proc.stderr is not None
    async with asyncio.timeout(60):
        while True:
            line = (await proc.stderr.readline()).decode()
            assert line, "sidecar run exited before it was ready"
            if '"ready"' in line:
                return proc


async def test_the_quickstart_works_as_written_against_sidecar_dev(
    demo: DevStack, tmp_path: Path
) -> None:
    first, second = quickstart_blocks()
    assert first[-2].startswith("sidecar accounts connect")  # connect comes before run
    work = tmp_path / "quickstart"
    work.mkdir()
    running: asyncio.subprocess.Process | None = None
    try:
        for command in first:
            if command.startswith("sidecar accounts connect"):
                await connect(command, work)
            elif command.startswith("sidecar run"):
                running = await run_until_ready(command, work)
            else:
                proc = await shell(command, work)
                out, err = await proc.communicate()
                assert proc.returncode == 0, (command, err.decode())
        for command in second:
            proc = await shell(command, work)
            out, err = await proc.communicate()
            assert proc.returncode == 0, (command, err.decode())
            assert b'"hello": "demo-user"' in out
    finally:
        if running is not None:
            running.send_signal(signal.SIGTERM)
            await running.communicate()
    assert running.returncode == 0
