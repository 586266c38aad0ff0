"""The proxy a Python developer would write first: the baseline the sidecar must beat.

A catch-all route on a web.Application, one ClientSession (default connector: keep-alive,
limit 100), bodies streamed both ways, a fixed token injected.

    python naive_aiohttp_proxy.py --port 18101 --upstream 127.0.0.1:18080 [--loop uvloop]
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

from aiohttp import ClientSession, web

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
}
SESSION: web.AppKey[ClientSession] = web.AppKey("session", ClientSession)
UPSTREAM: web.AppKey[str] = web.AppKey("upstream", str)
TOKEN: web.AppKey[str] = web.AppKey("token", str)


async def proxy(request: web.Request) -> web.StreamResponse:
    app = request.app
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
    headers["Authorization"] = f"Bearer {app[TOKEN]}"
    async with app[SESSION].request(
        request.method,
        app[UPSTREAM] + request.path_qs,
        headers=headers,
        data=request.content if request.body_exists else None,
        allow_redirects=False,
    ) as upstream:
        resp = web.StreamResponse(
            status=upstream.status,
            headers={k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP},
        )
        await resp.prepare(request)
        async for chunk in upstream.content.iter_chunked(64 * 1024):
            await resp.write(chunk)
        await resp.write_eof()
        return resp


def make_app(args: argparse.Namespace) -> web.Application:
    app = web.Application()
    app[UPSTREAM], app[TOKEN] = f"http://{args.upstream}", args.token
    app.router.add_route("*", "/{tail:.*}", proxy)

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = ClientSession(auto_decompress=False)
        yield
        await app[SESSION].close()

    app.cleanup_ctx.append(session_ctx)
    return app


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="host:port")
    p.add_argument("--token", default="bench-token")
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    args = p.parse_args()
    if args.loop == "uvloop":
        import uvloop

        uvloop.install()
    web.run_app(make_app(args), host="127.0.0.1", port=args.port, print=None, access_log=None)
