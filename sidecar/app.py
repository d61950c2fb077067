"""The public app: the ordered guard chain in front of one forwarder.

:func:`pipeline` is the whole security policy in one list. Each request takes
the current :class:`Runtime` (settings + guards + forwarder) once, at its
start, and keeps it: a reload swaps ``State.runtime`` in one assignment and
requests in flight finish under the config they started with.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler

from .config import Settings
from .guards.agents import agent_lookup, session_key_policy
from .guards.allowlist import ip_allowlist
from .guards.auth import bearer_auth
from .guards.body import json_body
from .guards.clientip import client_address
from .guards.enabled import webhooks_enabled
from .guards.lockout import LockoutTable, auth_lockout, failure_recorder
from .guards.ratelimit import InFlight, agent_limits, client_limits
from .guards.routing import no_token_in_query, route
from .limiter import Limiter, open_limiter
from .logs import AuditLog
from .metrics import Metrics
from .pipeline import Call, Guard, Reject
from .responses import INTERNAL_ERROR, error_response, ok_response
from .upstream import make_forwarder, make_pool
from .upstream.base import BaseForwarder
from .upstream.pool import Pool

log = logging.getLogger("sidecar")


def pipeline(settings: Settings, state: State, limiter: Limiter) -> list[Guard]:
    """The guard chain, in SPEC §3 order: cheap, unauthenticated checks first, and
    nothing about agents revealed before authentication. ``None`` entries are
    controls the config leaves off."""
    guards = [
        client_address(settings),  # who is calling: TCP peer, or XFF from trusted proxies
        ip_allowlist(settings),  # 403 ip_not_allowed, before anything else
        auth_lockout(settings, state.lockout),  # 429 locked_out, valid token or not
        route(),  # 404 not_found, 405 method_not_allowed
        no_token_in_query(),  # 400 token_in_query: URLs leak into logs
        bearer_auth(settings, failure_recorder(settings, state.lockout)),  # 401 unauthorized
        # 429 rate_limited (per-IP, global), 503 limiter_unavailable: authenticated calls only
        client_limits(settings, limiter, state.metrics),
        webhooks_enabled(settings),  # 503 webhooks_disabled
        json_body(settings),  # 413, 408, 415, 400 invalid_json / invalid_request
        agent_lookup(settings),  # 404 agent_not_found, 403 agent_not_permitted
        session_key_policy(settings),  # 403 session_key_not_allowed
        # 429 rate_limited (the agent's limit, maxConcurrent): last, so a refused call costs nothing
        agent_limits(settings, limiter, state.in_flight, state.metrics),
    ]
    return [g for g in guards if g is not None]


@dataclass(frozen=True, slots=True)
class Runtime:
    """Everything derived from one config; replaced whole on reload."""

    settings: Settings
    guards: tuple[Guard, ...]
    forward: BaseForwarder


class State:
    """What lives as long as the process: metrics, lockout memory, the upstream pool,
    the rate limiter and the calls in flight per agent."""

    def __init__(self, settings: Settings, metrics: Metrics, audit: AuditLog) -> None:
        self.metrics = metrics
        self.audit = audit
        self.lockout = LockoutTable()
        self.pool: Pool | None = None
        self.limiter: Limiter | None = None  # opened by apply(), on the running loop
        self.retired_limiters: list[Limiter] = []
        self.in_flight = InFlight()
        self.draining = False
        self._initial = settings
        self.runtime: Runtime | None = None

    @property
    def settings(self) -> Settings:
        return self.runtime.settings if self.runtime is not None else self._initial

    def apply(self, settings: Settings) -> None:
        """Build and swap in the runtime for ``settings`` (needs the running loop).

        All or nothing: everything is built first, then swapped in one assignment,
        so a failure leaves the running runtime and its pool untouched."""
        old = self.runtime
        pool = self.pool
        fresh = pool is None or old is None or _endpoint(old.settings) != _endpoint(settings)
        if fresh:
            pool = make_pool(settings)
        assert pool is not None
        # Buckets survive reloads that keep the backend. A new limiter opens no
        # connection until used, so a failed build below has nothing to close.
        limiter = self.limiter
        backend = settings.sidecar.rate_limit.backend
        if limiter is None or limiter.backend != backend:
            limiter = open_limiter(backend)
        try:
            guards = tuple(pipeline(settings, self, limiter))
            forward = make_forwarder(settings, pool, old.forward if old is not None else None)
        except BaseException:
            if fresh:
                pool.close()
            raise
        previous, self.pool, self.runtime = self.pool, pool, Runtime(settings, guards, forward)
        if fresh and previous is not None:
            previous.close()  # idle connections only; calls in flight finish on theirs
        if limiter is not self.limiter:
            if self.limiter is not None:  # calls in flight may still use it: closed at exit
                self.retired_limiters.append(self.limiter)
            self.limiter = limiter
        self.metrics.configure(settings)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    async def close_limiters(self) -> None:
        limiters, self.retired_limiters = self.retired_limiters, []
        if self.limiter is not None:
            limiters.append(self.limiter)
            self.limiter = None
        for limiter in limiters:
            await limiter.aclose()


def _endpoint(settings: Settings) -> tuple[object, ...]:
    u = settings.sidecar.upstream
    return (u.socket, u.host, u.port)


STATE = web.AppKey("state", State)


async def handle(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    runtime = state.runtime
    assert runtime is not None
    metrics = state.metrics
    call = Call(request, runtime.settings)
    code: str | None = None
    outcome = "forwarded"
    metrics.in_flight.inc()
    try:
        for guard in runtime.guards:
            pending = guard(call)
            if pending is not None:
                await pending
        started = time.perf_counter()
        try:
            run_id = await runtime.forward(call)
        finally:
            metrics.observe_upstream(call.endpoint, time.perf_counter() - started)
        response = ok_response(call.session, call.request_id, run_id, call.response_headers)
    except Reject as reject:
        code = reject.code
        outcome = "upstream_failed" if code.startswith("upstream_") else "rejected"
        response = error_response(reject, call.request_id)
    except Exception:
        log.exception("internal error", extra={"requestId": call.request_id})
        code = INTERNAL_ERROR.code
        outcome = "rejected"
        response = error_response(INTERNAL_ERROR, call.request_id)
    finally:
        metrics.in_flight.dec()
        if call.finalizers:
            for done in call.finalizers:
                done()
    duration = time.perf_counter() - call.started
    metrics.observe(call.endpoint, response.status, code, duration)
    secret = call.secret
    state.audit.record(
        call.request_id,
        call.client_ip,
        call.endpoint,
        call.body.get("agent") if secret is not None else None,
        outcome,
        response.status,
        code,
        secret.id if secret is not None else None,
        duration,
    )
    if secret is not None:  # every authenticated use: what a rotation watches fall to zero
        metrics.authenticated(secret.id)
    return response


async def _upstream_pool(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    state.apply(state.settings)
    yield
    state.close()


async def _limiter(app: web.Application) -> AsyncIterator[None]:
    """The limiter (a Redis connection pool) is closed on the loop it ran on."""
    yield
    await app[STATE].close_limiters()


@web.middleware
async def _unroutable(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Targets aiohttp's router cannot even try (CONNECT's ``host:port``, ``OPTIONS *``,
    ``http://host`` with no path) go to :func:`handle` too: the router would answer them
    with a text 404 — no SPEC body, no X-Request-Id, no audit line, no metric."""
    if request.match_info.http_exception is not None:
        return await handle(request)
    return await handler(request)


def create_app(state: State) -> web.Application:
    """The public listener's app: one catch-all route, because routing is a guard."""
    app = web.Application(
        middlewares=[_unroutable], handler_args={"max_field_size": 8190, "max_line_size": 8190}
    )
    app[STATE] = state
    app.router.add_route("*", "/{tail:.*}", handle)
    app.cleanup_ctx.append(_upstream_pool)
    app.cleanup_ctx.append(_limiter)
    return app
