"""The built-in reference runtime: accepts the forward protocol (docs/upstream.md) on a Unix socket.

For trials, the demo and tests, not production: it admits every well-formed
call, answers ``{"ok": true, "runId": ...}`` and reports each call it receives
(one JSON line per call, or to a callback).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

FIELDS = {"/hooks/wake": {"agent", "sessionKey", "requestId"},
          "/hooks/agent": {"agent", "message", "sessionKey", "requestId"}}  # fmt: skip

Reporter = Callable[[dict[str, Any]], None]
REPORTER: web.AppKey[Reporter] = web.AppKey("reporter")


def print_json_line(entry: dict[str, Any]) -> None:
    print(json.dumps(entry), flush=True)


async def hook(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except ValueError:
        return web.json_response({"ok": False, "error": "invalid JSON"}, status=400)
    expected = FIELDS[request.path]
    if not isinstance(body, dict) or set(body) != expected:
        return web.json_response(
            {"ok": False, "error": f"expected exactly the fields {sorted(expected)}"}, status=400
        )
    run_id = f"run-{uuid.uuid4().hex[:12]}"
    request.app[REPORTER](
        {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "hook": request.path.rsplit("/", 1)[1],
            **body,
            "secretId": request.headers.get("X-Webhook-Secret-Id"),
            "forwardedFor": request.headers.get("X-Forwarded-For"),
            "idempotencyKey": request.headers.get("Idempotency-Key"),
            **({"route": route} if (route := request.headers.get("X-Webhook-Route")) else {}),
            "runId": run_id,
        }
    )
    return web.json_response({"ok": True, "runId": run_id})


def create_app(reporter: Reporter = print_json_line) -> web.Application:
    app = web.Application()
    app[REPORTER] = reporter
    app.router.add_post("/hooks/wake", hook)
    app.router.add_post("/hooks/agent", hook)
    return app


async def start(socket_path: str, reporter: Reporter = print_json_line) -> web.AppRunner:
    """Serve on ``socket_path`` (replacing a stale socket file); returns the runner."""
    runner = web.AppRunner(create_app(reporter), access_log=None)
    await runner.setup()
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    await web.UnixSite(runner, socket_path).start()
    return runner


async def _serve(socket_path: str) -> None:
    runner = await start(socket_path)
    print(f"dev-runtime listening on {socket_path}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def run(socket_path: str) -> int:
    try:
        asyncio.run(_serve(socket_path))
    except OSError as exc:
        print(
            f"dev-runtime: cannot listen on {socket_path}: {exc.strerror or exc}", file=sys.stderr
        )
        return 1
    return 0
