"""Fake OAuth2 token endpoint for the benchmark: answers every grant, counts every call.

    python token_endpoint.py --port 18090 [--delay-ms 50] [--token bench-token]

POST /token   -> RFC 6749 §5.1 answer: the upstream's accepted access token, a rotated
                 refresh token, expires_in 86400 (after --delay-ms, like a real IdP's latency)
GET  /calls   -> {"calls": N, "in_flight_max": M}: token requests received so far
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json

from aiohttp import web


class TokenEndpoint:
    def __init__(self, token: str, delay_s: float) -> None:
        self.token, self.delay_s = token, delay_s
        self.calls = 0
        self.in_flight = self.in_flight_max = 0
        self._ids = itertools.count(1)

    async def token_handler(self, request: web.Request) -> web.Response:
        self.calls += 1
        self.in_flight += 1
        self.in_flight_max = max(self.in_flight_max, self.in_flight)
        try:
            form = await request.post()
            if form.get("grant_type") not in ("refresh_token", "client_credentials"):
                return web.json_response({"error": "unsupported_grant_type"}, status=400)
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            body = {
                "access_token": self.token,
                "token_type": "Bearer",
                "expires_in": 86400,
                "refresh_token": f"bench-refresh-{next(self._ids)}",
            }
            return web.json_response(body, headers={"Cache-Control": "no-store"})
        finally:
            self.in_flight -= 1

    async def calls_handler(self, request: web.Request) -> web.Response:
        return web.Response(
            text=json.dumps({"calls": self.calls, "in_flight_max": self.in_flight_max}),
            content_type="application/json",
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--token", default="bench-token")
    ap.add_argument("--delay-ms", type=float, default=50.0)
    args = ap.parse_args()
    endpoint = TokenEndpoint(args.token, args.delay_ms / 1000)
    app = web.Application()
    app.router.add_post("/token", endpoint.token_handler)
    app.router.add_get("/calls", endpoint.calls_handler)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
