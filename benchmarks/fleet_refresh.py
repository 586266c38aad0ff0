"""Fleet benchmark: 10,000 accounts whose tokens all enter the refresh window within a minute.

A fake token endpoint with 50 ms latency on 127.0.0.1; the real sidecar (SQLite store,
background refresher, default limits unless told otherwise) on the real clock. Reports: every
account refreshed before expiry, peak concurrency seen by the token endpoint, refresh errors,
wall time, and memory per account.

    python benchmarks/fleet_refresh.py [--accounts 10000] [--latency 0.05]
        [--concurrency 4] [--rate 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar import config as config_module
from sidecar.app import Sidecar
from sidecar.credentials.maintenance import import_credentials
from sidecar.credentials.refresher import account_jitter
from sidecar.crypto import TokenCipher, generate_key
from sidecar.model import Credential, Token

LIFETIME = 3600.0


class SlowTokenEndpoint:
    def __init__(self, latency: float) -> None:
        self.latency, self.calls, self.in_flight, self.peak = latency, 0, 0, 0

    async def handle(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.calls += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.latency)
        finally:
            self.in_flight -= 1
        n = self.calls
        return web.json_response(
            {
                "access_token": f"a-{n}",
                "refresh_token": f"r-{n}",
                "token_type": "Bearer",
                "expires_in": int(LIFETIME),
                "presented": str(form["refresh_token"])[:2],
            }
        )


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def main(args: argparse.Namespace) -> int:
    fake = SlowTokenEndpoint(args.latency)
    app = web.Application()
    app.router.add_post("/token", fake.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    token_url = f"http://127.0.0.1:{runner.addresses[0][1]}/token"
    tmp = Path(tempfile.mkdtemp(prefix="fleet-"))
    (tmp / "store.key").write_text(generate_key())
    os.chmod(tmp / "store.key", 0o600)
    raw = {
        "store": {"url": f"sqlite://{tmp / 'tokens.db'}", "key_file": str(tmp / "store.key")},
        "admin": {"listen": "127.0.0.1:0"},
        "provider": [
            {
                "name": "p",
                "token_url": token_url,
                "client_id": "c",
                "auth_method": "none",
                "max_concurrent_refreshes": args.concurrency,
                "max_refreshes_per_second": args.rate,
            }
        ],
        "upstream": [
            {"name": "u", "listen": "127.0.0.1:0", "target": "http://127.0.0.1:9", "provider": "p"}
        ],
    }
    cfg = config_module.parse(raw, {}, tmp)
    provider = cfg.providers[0]
    rss_empty = rss_mib()
    sidecar = await Sidecar.start(cfg, registry=CollectorRegistry())
    cipher = TokenCipher(cfg.store.keys)
    now = time.time()
    lead = provider.refresh_lead_fraction * LIFETIME
    creds = []
    for i in range(args.accounts):
        account = f"user-{i:05d}"
        jitter = account_jitter("p", account) * provider.refresh_jitter_fraction * LIFETIME
        due = now + 5 + 55 * i / args.accounts  # every account due within one minute
        refreshed_at = due - LIFETIME + lead + jitter
        token = Token(f"seed-a-{i}", f"seed-r-{i}", refreshed_at + LIFETIME)
        creds.append(Credential("p", account, token, 0, refreshed_at=refreshed_at))
    await import_credentials(sidecar.store, cipher, creds)
    expiry = {c.account: c.token.expires_at for c in creds}
    del creds
    sidecar.refresher.wake()
    start = time.perf_counter()
    rss_start = rss_mib()
    while True:
        rows = await sidecar.store.rows("p")
        done = [r for r in rows if r.version > 1]
        if len(done) == len(rows):
            break
        await asyncio.sleep(1.0)
        print(
            f"  {len(done)}/{len(rows)} refreshed, endpoint in flight {fake.in_flight}",
            file=sys.stderr,
        )
    elapsed = time.perf_counter() - start
    late = [
        r.account
        for r in rows
        if r.refreshed_at is None or r.refreshed_at >= (expiry[r.account] or 0)
    ]
    registry = sidecar.metrics.registry
    errors = sum(
        registry.get_sample_value(
            "sidecar_token_refreshes_total", {"provider": "p", "result": result}
        )
        or 0
        for result in ("transient_error", "fatal_error")
    )
    rss_end = rss_mib()
    await sidecar.stop()
    await runner.cleanup()
    print(f"accounts                 {args.accounts}")
    print(f"token endpoint calls     {fake.calls}")
    print(f"refreshed after expiry   {len(late)}")
    print(f"refresh errors           {int(errors)}")
    print(f"peak concurrency         {fake.peak} (limit {args.concurrency})")
    print(
        f"wall time                {elapsed:.1f} s (rate limit {args.rate}/s, "
        f"latency {args.latency * 1000:.0f} ms)"
    )
    print(
        f"RSS                      {rss_empty:.1f} MiB before start, {rss_start:.1f} after "
        f"import, {rss_end:.1f} after all refreshed"
    )
    print(
        f"memory per account       {(rss_end - rss_empty) * 1024 * 1024 / args.accounts:.0f} "
        f"bytes (RSS growth / accounts)"
    )
    ok = not late and errors == 0 and fake.peak <= args.concurrency
    ok = ok and fake.calls == args.accounts
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=10_000)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--rate", type=float, default=100.0)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    raise SystemExit(asyncio.run(main(parser.parse_args())))
