"""N concurrent requests fired at once over N pre-opened connections (stdlib asyncio only).

Used for the expired-token scenario: every connection is opened first (a bounded number at a
time, so the proxy's listen backlog never drops a SYN and adds a 1 s retransmit), then every
request is written in the same event-loop pass. Each request's latency runs from its own write
to the last byte of its response.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field


@dataclass
class BurstResult:
    sent: int = 0
    connect_errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    span_s: float = 0.0  # first write to last response

    def summary(self) -> dict[str, object]:
        lat = sorted(self.latencies_s)
        out: dict[str, object] = {
            "sent": self.sent,
            "ok": self.statuses.get(200, 0),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "connect_errors": self.connect_errors,
            "errors": len(self.errors),
            "errors_text": self.errors[:5],
            "span_ms": round(self.span_s * 1000, 2),
        }
        if lat:
            out.update(
                p50_ms=round(statistics.median(lat) * 1000, 2),
                p99_ms=round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 2),
                max_ms=round(lat[-1] * 1000, 2),
                min_ms=round(lat[0] * 1000, 2),
            )
        return out


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def burst(
    port: int, path: str, n: int, headers: list[str], timeout_s: float = 60.0
) -> BurstResult:
    result = BurstResult()
    gate = asyncio.Semaphore(64)

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with gate:
            return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)

    opened = await asyncio.gather(*(connect() for _ in range(n)), return_exceptions=True)
    conns = [c for c in opened if not isinstance(c, BaseException)]
    result.connect_errors = n - len(conns)
    await asyncio.sleep(0.3)  # let the proxy accept every connection before the burst
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        + "".join(f"{h}\r\n" for h in headers)
        + "\r\n"
    ).encode()

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        t0 = time.perf_counter()
        writer.write(request)
        try:
            status = await asyncio.wait_for(_read_response(reader), timeout_s)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as exc:
            result.errors.append(f"{type(exc).__name__}: {exc}"[:200])
            return
        result.latencies_s.append(time.perf_counter() - t0)
        result.statuses[status] = result.statuses.get(status, 0) + 1

    start = time.perf_counter()
    result.sent = len(conns)
    await asyncio.gather(*(one(r, w) for r, w in conns))
    result.span_s = time.perf_counter() - start
    for _, w in conns:
        w.close()
    await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)
    return result


def run_burst(port: int, path: str, n: int, headers: list[str]) -> dict[str, object]:
    return asyncio.run(burst(port, path, n, headers)).summary()
