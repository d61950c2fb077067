"""The admin listener (SPEC §5): ``/metrics``, ``/healthz``, ``/readyz``. Never on the public port.

Readiness is cached for a moment: a burst of probes and scrapes costs one
connection attempt to the runtime, not one each.
"""

from __future__ import annotations

import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .app import STATE, State
from .upstream.pool import UpstreamConnectError

PROBE_CACHE_SECONDS = 1.0


class Readiness:
    """Why the sidecar is not ready, or ``None`` when it is."""

    def __init__(self, state: State) -> None:
        self.state = state
        self._checked = 0.0
        self._upstream_problem: str | None = "not checked yet"

    async def problem(self) -> str | None:
        state = self.state
        if state.draining:
            return "shutting down"
        runtime = state.runtime
        if runtime is None:
            return "no config loaded"
        now = time.time()
        if not any(s.valid_at(now) for s in runtime.settings.webhooks.secrets):
            return "no configured secret is valid now"
        if time.monotonic() - self._checked > PROBE_CACHE_SECONDS:
            try:
                await runtime.forward.probe()
                self._upstream_problem = None
            except UpstreamConnectError as exc:
                self._upstream_problem = f"upstream not accepting connections: {exc}"
            self._checked = time.monotonic()
        return self._upstream_problem


READINESS = web.AppKey("readiness", Readiness)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    problem = await request.app[READINESS].problem()
    if problem is not None:
        return web.json_response({"status": "unavailable", "reason": problem}, status=503)
    return web.json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[STATE].metrics.registry
    response = web.Response(body=generate_latest(registry))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def create_admin_app(state: State) -> web.Application:
    app = web.Application()
    app[STATE] = state
    app[READINESS] = Readiness(state)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
