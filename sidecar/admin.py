"""The admin listener (docs/admin.md): ``/metrics``, ``/healthz``, ``/readyz`` and
``POST /admin/unlock``; never public.

Readiness is cached for a moment and concurrent probes share one check: a burst
of probes and scrapes costs one connection attempt to the runtime, not one each.
It fails at once when shutdown begins, and while no configured secret is valid
(then an error is also logged once a minute, see :func:`secret_expiry_watch`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from .app import STATE, State
from .guards.lockout import address_key
from .upstream.pool import UpstreamConnectError

log = logging.getLogger("sidecar.admin")

PROBE_CACHE_SECONDS = 1.0
PROBE_TIMEOUT = 2.0  # a TCP upstream that drops SYNs must not hang the probe
EXPIRY_LOG_INTERVAL = 60.0
NO_VALID_SECRET = "no configured secret is valid now"  # noqa: S105 - a reason, not a password


def no_valid_secret(state: State, now: float) -> bool:
    runtime = state.runtime
    return runtime is not None and not any(
        s.valid_at(now) for s in runtime.settings.webhooks.secrets
    )


class Readiness:
    """Why the sidecar is not ready, or ``None`` when it is."""

    def __init__(self, state: State, cache_seconds: float = PROBE_CACHE_SECONDS) -> None:
        self.state = state
        self.cache_seconds = cache_seconds
        self._checked = -float("inf")
        self._upstream_problem: str | None = "not checked yet"
        self._probe: asyncio.Future[None] | None = None

    async def problem(self) -> str | None:
        state = self.state
        if state.draining:
            return "shutting down"
        if state.runtime is None:
            return "no config loaded"
        if no_valid_secret(state, time.time()):
            return NO_VALID_SECRET
        if time.monotonic() - self._checked > self.cache_seconds:
            if self._probe is None:  # the first caller probes; the others wait for it
                self._probe = asyncio.ensure_future(self._check())
            await asyncio.shield(self._probe)
        spool = state.spool
        if spool is not None:  # the runtime may be down: the spool still accepts
            spool_state = spool.readiness()["state"]
            return None if spool_state == "ok" else f"spool {spool_state}"
        return self._upstream_problem

    def details(self) -> dict[str, object]:
        """With a spool, how the runtime and the spool are (docs/spool.md)."""
        spool = self.state.spool
        if spool is None:
            return {}
        runtime = "ok" if self._upstream_problem is None else self._upstream_problem
        return {"runtime": runtime, "spool": spool.readiness()}

    async def _check(self) -> None:
        runtime = self.state.runtime
        assert runtime is not None
        try:
            async with asyncio.timeout(PROBE_TIMEOUT):
                await runtime.forward.probe()
            self._upstream_problem = None
        except UpstreamConnectError as exc:
            self._upstream_problem = f"upstream not accepting connections: {exc}"
        except TimeoutError:
            self._upstream_problem = (
                f"upstream did not accept a connection within {PROBE_TIMEOUT:g}s"
            )
        finally:
            self._checked = time.monotonic()
            self._probe = None


READINESS = web.AppKey("readiness", Readiness)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    readiness = request.app[READINESS]
    problem = await readiness.problem()
    if problem is not None:
        body = {"status": "unavailable", "reason": problem, **readiness.details()}
        return web.json_response(body, status=503)
    return web.json_response({"status": "ok", **readiness.details()})


# Set by the supervisor (sidecar.workers > 1) when it passes an unlock on to its workers:
# it logs and counts the operator's unlock once itself.
FANOUT_HEADER = "X-Webhook-Sidecar-Fanout"


class BadUnlock(ValueError):
    """The unlock request's body is not ``{"address": "<IP address>"}``."""


async def unlock_key(request: web.Request) -> str:
    """The lockout key named by a ``POST /admin/unlock`` body. Raises :class:`BadUnlock`."""
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise BadUnlock('the body must be JSON: {"address": "<IP address>"}') from None
    address = body.get("address") if isinstance(body, dict) else None
    if not isinstance(address, str):
        raise BadUnlock('address: required, a string: {"address": "<IP address>"}')
    try:
        return address_key(address)
    except ValueError as exc:
        shown = address if address.isprintable() and len(address) <= 64 else "(not shown)"
        raise BadUnlock(f"address: {shown!r} is not an IP address ({exc})") from None


def bad_unlock(exc: BadUnlock) -> web.Response:
    return web.json_response(
        {"status": "error", "error": "invalid_request", "message": str(exc)}, status=400
    )


def log_unlock(key: str, unlocked: bool) -> None:
    """An operator released an address: audit-worthy, so at warning."""
    log.warning(
        "unlock %s: %s",
        key,
        "lock and failure count released" if unlocked else "it was not locked",
        extra={"address": key, "unlocked": unlocked},
    )


async def unlock(request: web.Request) -> web.Response:
    """Release an address from the auth lockout: its lock and its failure count."""
    try:
        key = await unlock_key(request)
    except BadUnlock as exc:
        return bad_unlock(exc)
    state = request.app[STATE]
    unlocked = state.lockout.unlock(key, time.monotonic())
    if FANOUT_HEADER not in request.headers:
        log_unlock(key, unlocked)
        state.metrics.unlocks.inc()
    return web.json_response({"status": "ok", "unlocked": unlocked})


def secret_expiry_watch(interval: float) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context that logs an error every ``interval`` seconds while no configured
    secret is valid (all expired or not yet valid): every call is then refused with 401,
    and the log says why (docs/metrics.md). It wakes at the next ``notAfter``/``notBefore`` too,
    so the first error comes when the last secret expires, not up to a minute later."""

    async def watch(state: State) -> None:
        while True:
            now = time.time()
            if no_valid_secret(state, now):
                assert state.runtime is not None
                log.error(
                    "no configured secret is valid now: every call is refused; "
                    "add a current secret and reload",
                    extra={"secrets": [s.id for s in state.runtime.settings.webhooks.secrets]},
                )
                delay = interval
            else:
                delay = min(interval, _until_next_boundary(state, now))
            await asyncio.sleep(delay)

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.ensure_future(watch(app[STATE]))
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    return ctx


def _until_next_boundary(state: State, now: float) -> float:
    """Seconds until some secret's validity window opens or closes (a little after)."""
    runtime = state.runtime
    secrets = runtime.settings.webhooks.secrets if runtime is not None else ()
    times = [t for s in secrets for t in (s.not_before, s.not_after) if t is not None and t > now]
    return min(times) - now + 0.05 if times else float("inf")


def create_admin_app(
    state: State,
    *,
    probe_cache_seconds: float = PROBE_CACHE_SECONDS,
    expiry_log_interval: float = EXPIRY_LOG_INTERVAL,
) -> web.Application:
    """The admin listener's app over the process's shared :class:`State`."""
    app = web.Application()
    app[STATE] = state
    app[READINESS] = Readiness(state, probe_cache_seconds)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_post("/admin/unlock", unlock)
    # prometheus_client's own handler: Accept negotiation (OpenMetrics) and gzip.
    app.router.add_get("/metrics", make_aiohttp_handler(state.metrics.registry))
    app.cleanup_ctx.append(secret_expiry_watch(expiry_log_interval))
    return app
