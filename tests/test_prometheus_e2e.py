"""A real Prometheus scrapes a real sidecar and loads the project's alert rules.

The server binary comes from Debian's prometheus package, unpacked by .ci/tools.sh like promtool
(missing: the test fails under CI=true, skips elsewhere). It listens on 127.0.0.1, keeps its
TSDB in a temporary directory, scrapes the sidecar's admin listener every second and evaluates
monitoring/prometheus-rules.yaml every second. The test asks its HTTP API, polling under a
deadline, for the series one proxied request leaves behind, and for the rules' health.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml

from sidecar.app import Sidecar
from tests.conftest import seed
from tests.fakes import FakeTokenEndpoint, FakeUpstream, ManualClock
from tests.test_helm import install_tool
from tests.test_monitoring import EXPECTED_ALERTS, RULES

JOB = "oauth-sidecar"  # the rules match `up` by a job name containing "oauth-sidecar"
DEADLINE_SECONDS = 30.0
POLL_SECONDS = 0.2
T = TypeVar("T")


@pytest.fixture(scope="session")
def prometheus_bin() -> str:
    return install_tool("prometheus")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def rule_file(path: Path) -> Path:
    """The alert groups as a plain rule file (accepts a PrometheusRule object too)."""
    doc = yaml.safe_load(RULES.read_text())
    path.write_text(yaml.safe_dump({"groups": doc.get("spec", doc)["groups"]}))
    return path


async def eventually(
    probe: Callable[[], Awaitable[T | None]],
    what: str,
    context: Callable[[], str] = str,
    deadline: float = DEADLINE_SECONDS,
) -> T:
    """Call probe until it returns something other than None, or fail after deadline seconds."""
    end = time.monotonic() + deadline
    last: Any = None
    while time.monotonic() < end:
        try:
            result = await probe()
        except (aiohttp.ClientError, OSError) as exc:
            last, result = exc, None
        if result is not None:
            return result
        await asyncio.sleep(POLL_SECONDS)
    pytest.fail(f"{what}: not seen within {deadline:.0f}s (last error: {last!r})\n{context()}")


@dataclass
class Prometheus:
    url: str
    process: asyncio.subprocess.Process
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


async def start_prometheus(
    binary: str, workdir: Path, target: str, client: aiohttp.ClientSession
) -> Prometheus:
    """Start prometheus on a free loopback port and wait until /-/ready answers 200."""
    config = workdir / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {
                    "scrape_interval": "1s",
                    "scrape_timeout": "1s",
                    "evaluation_interval": "1s",
                },
                "rule_files": [str(rule_file(workdir / "rules.yaml"))],
                "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": [target]}]}],
            },
            sort_keys=False,
        )
    )
    for attempt in range(3):  # another process may take the port between probe and bind
        port = free_port()
        log = workdir / f"prometheus-{attempt}.log"
        with log.open("wb") as out:
            process = await asyncio.create_subprocess_exec(
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={workdir / f'data-{attempt}'}",
                f"--web.listen-address=127.0.0.1:{port}",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )
        prom = Prometheus(f"http://127.0.0.1:{port}", process, log)

        async def ready(prom: Prometheus = prom) -> bool | None:
            if prom.process.returncode is not None:
                return False
            async with client.get(prom.url + "/-/ready") as resp:
                return True if resp.status == 200 else None

        try:
            if await eventually(ready, "prometheus /-/ready", prom.log_tail):
                return prom
        except BaseException:
            await stop_prometheus(prom, check=False)
            raise
        await prom.process.wait()
        if "address already in use" not in prom.log_tail():
            break
    pytest.fail(f"prometheus exited with {prom.process.returncode}:\n{prom.log_tail()}")


async def stop_prometheus(prom: Prometheus, *, check: bool = True) -> None:
    """SIGTERM and wait for a clean exit; kill only if it hangs."""
    if prom.process.returncode is None:
        prom.process.terminate()
        try:
            await asyncio.wait_for(prom.process.wait(), 15)
        except TimeoutError:
            prom.process.kill()
            await prom.process.wait()
            if check:
                pytest.fail(f"prometheus ignored SIGTERM:\n{prom.log_tail()}")
    if check:
        assert prom.process.returncode == 0, prom.log_tail()


@pytest.fixture
async def served_sidecar(
    make_sidecar: Callable[..., Awaitable[Sidecar]],
    idp: FakeTokenEndpoint,
    api: FakeUpstream,
    clock: ManualClock,
    client: aiohttp.ClientSession,
) -> Sidecar:
    """A sidecar that has proxied one GET with an injected token."""
    sidecar = await make_sidecar()
    await seed(sidecar, idp, api, clock)
    async with client.get(sidecar.url("api") + "/v1/things") as resp:
        assert resp.status == 200
    return sidecar


@pytest.fixture
async def prometheus(
    prometheus_bin: str, tmp_path: Path, served_sidecar: Sidecar, api_client: aiohttp.ClientSession
) -> AsyncIterator[Prometheus]:
    host, port = served_sidecar.addresses["admin"]
    prom = await start_prometheus(prometheus_bin, tmp_path, f"{host}:{port}", api_client)
    try:
        yield prom
    finally:
        await stop_prometheus(prom)


@pytest.fixture
async def api_client() -> AsyncIterator[aiohttp.ClientSession]:
    """For Prometheus's API: its answers are gzipped, unlike the proxy tests' `client`."""
    async with aiohttp.ClientSession() as session:
        yield session


async def query(client: aiohttp.ClientSession, prom: Prometheus, promql: str) -> list[Any]:
    async with client.get(prom.url + "/api/v1/query", params={"query": promql}) as resp:
        body = await resp.json()
    assert body["status"] == "success", body
    result: list[Any] = body["data"]["result"]
    return result


async def test_prometheus_scrapes_the_sidecar_and_loads_the_alerts(
    prometheus: Prometheus, served_sidecar: Sidecar, api_client: aiohttp.ClientSession
) -> None:
    client = api_client
    host, port = served_sidecar.addresses["admin"]
    target = {"job": JOB, "instance": f"{host}:{port}"}
    expected = {
        "up": ({}, "1"),
        "sidecar_requests_total": (
            {"upstream": "api", "method": "GET", "status_class": "2xx"},
            "1",
        ),
        "sidecar_upstream_request_duration_seconds_count": ({"upstream": "api"}, "1"),
        'sidecar_accounts{state="active"}': ({"provider": "example", "state": "active"}, "1"),
        'sidecar_accounts{state="reauthorization_required"}': (
            {"provider": "example", "state": "reauthorization_required"},
            "0",
        ),
    }
    for promql, (labels, value) in expected.items():
        name = promql.partition("{")[0]

        async def scraped(promql: str = promql) -> list[Any] | None:
            return await query(client, prometheus, promql) or None

        result = await eventually(scraped, f"{promql} in prometheus", prometheus.log_tail)
        assert [(r["metric"], r["value"][1]) for r in result] == [
            ({"__name__": name, **target, **labels}, value)
        ], promql

    async def rules_evaluated() -> list[dict[str, Any]] | None:
        async with client.get(prometheus.url + "/api/v1/rules") as resp:
            body = await resp.json()
        rules = [r for g in body["data"]["groups"] for r in g["rules"]]
        # A rule reports health "unknown" until its first evaluation.
        return rules if rules and all(r["health"] != "unknown" for r in rules) else None

    rules = await eventually(rules_evaluated, "every rule evaluated once", prometheus.log_tail)
    assert {r["name"] for r in rules if r["type"] == "alerting"} == EXPECTED_ALERTS
    unhealthy = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not unhealthy
    # Healthy and quiet: nothing of this one sidecar is alarming.
    assert all(r["state"] == "inactive" for r in rules), [(r["name"], r["state"]) for r in rules]
