"""A fake OpenClaw gateway on real loopback TCP that answers the way docs/openclaw.md
says the real one does: plain-text 401/429, JSON 400/403/413/503, forwarding headers
refused before the token check. Used where the real gateway is not needed."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from support.common import AGENT, base_doc, free_port

TOKEN = "0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9"
NEW_TOKEN = "f9e8d7c6b5a4938271605f4e3d2c1b0af9e8d7c6b5a4938271605f4e3d2c1b0a"
THIRD_TOKEN = "5555aaaa6666bbbb7777cccc8888dddd9999eeee0000ffff1111222233334444"
FORWARDING = ("forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip")

Reply = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


class Seen:
    """One request as the fake gateway received it."""

    def __init__(self, path: str, raw_headers: list[tuple[str, str]], body: bytes, peer: Any):
        self.path = path
        self.raw_headers = raw_headers
        self.body = body
        self.peer = peer

    def json(self) -> Any:
        return json.loads(self.body)

    def header_names(self) -> list[str]:
        return [name.lower() for name, _ in self.raw_headers]

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.raw_headers if k.lower() == name.lower()]
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None


class FakeGateway:
    """Answers like openclaw@2026.9.6's hooks (see the notes), on 127.0.0.1."""

    def __init__(self, token: str = TOKEN) -> None:
        self.token = token
        self.seen: list[Seen] = []
        self.reply: Reply | None = None  # a test's own answer, after the auth check
        self.ready: web.Response | None = None  # /readyz answer; None: 200
        self.ready_delay = 0.0
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def hooks(self) -> list[Seen]:
        return [s for s in self.seen if s.path.startswith("/hooks/")]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]
        peer = request.transport.get_extra_info("peername") if request.transport else None
        self.seen.append(Seen(request.path, raw, await request.read(), peer))
        if request.path == "/readyz":
            await asyncio.sleep(self.ready_delay)
            return self.ready or web.json_response({"ready": True, "failing": []})
        if any(name.lower() in FORWARDING for name, _ in raw):
            error = {
                "message": "Proxy client attribution is required.",
                "type": "proxy_attribution_required",
            }
            return web.json_response({"error": error}, status=403)
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.Response(status=401, text="Unauthorized")
        if self.reply is not None:
            answer = await self.reply(request)
            if answer is not None:
                return answer
        if request.path == "/hooks/agent":
            return web.json_response({"ok": True, "runId": str(uuid.uuid4())})
        if request.path == "/hooks/wake":
            return web.json_response({"ok": True, "mode": "now", "eventOutcome": "queued"})
        return web.Response(status=404, text="Not Found")


def openclaw_doc(gw: FakeGateway, token_file: Path, **agent: Any) -> dict[str, Any]:
    doc = base_doc("/unused.sock")
    doc["webhooks"]["agents"][AGENT].update(agent)
    doc["sidecar"]["upstream"] = {
        "url": gw.url,
        "protocol": "openclaw",
        "token": {"file": str(token_file)},
    }
    return doc
