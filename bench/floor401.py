"""The aiohttp framework floor for refusals.

A bare aiohttp web.Application with one catch-all route that answers 401 with
a small JSON body of the same shape as the sidecar's refusal (and the
WWW-Authenticate header docs/http-api.md asks for). No auth check, no request
id, no logging: the least an aiohttp server can do to refuse a request. The
sidecar's refusal throughput is compared to this (target >= 0.9).

uvloop when importable, access log off.

    python bench/floor401.py --port 18002
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web

BODY = json.dumps(
    {
        "status": "error",
        "error": "unauthorized",
        "message": "missing or invalid bearer token",
        "requestId": "0123456789abcdef0123456789abcdef",
    },
    separators=(",", ":"),
).encode()
HEADERS = {"WWW-Authenticate": 'Bearer realm="webhooks"'}


async def refuse(request: web.Request) -> web.Response:
    return web.Response(status=401, body=BODY, content_type="application/json", headers=HEADERS)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", refuse)

    loop = None
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
