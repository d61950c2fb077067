"""The public app: the ordered guard chain in front of one forwarder.

:func:`pipeline` is the whole security policy in one list. Each request takes
the current :class:`Runtime` (settings + guards + forwarder) once, at its
start, and keeps it: a reload swaps ``State.runtime`` in one assignment and
requests in flight finish under the config they started with.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial

from aiohttp import web

from .call import Answer, Call, Guard, Reject, new_request_id
from .guards.agents import agent_lookup, session_key_policy
from .guards.allowlist import ip_allowlist
from .guards.auth import bearer_auth
from .guards.body import json_body
from .guards.clientip import client_address
from .guards.dedup import abandon, dedup
from .guards.enabled import webhooks_enabled
from .guards.lockout import LockoutTable, auth_lockout, failure_recorder
from .guards.ratelimit import InFlight, agent_limits, client_limits
from .guards.routing import no_token_in_query, route
from .limiter import Limiter, open_limiter
from .logs import AuditLog
from .metrics import Metrics
from .responses import INTERNAL_ERROR, answer_response, error_response, ok_response
from .routes import guards as signed
from .routes import profile_for
from .settings import Route, Settings
from .spool.dedup import SqliteDedup
from .spool.service import Spool
from .spool.store import Store
from .store import DedupStore, MemoryDedupStore, open_dedup_store
from .upstream import make_forwarder, make_pool
from .upstream.base import BaseForwarder
from .upstream.pool import Pool

log = logging.getLogger("sidecar")


def pipeline(settings: Settings, state: State, limiter: Limiter, store: DedupStore) -> list[Guard]:
    """The guard chain, in docs/http-api.md order: cheap, unauthenticated checks first, and
    nothing about agents revealed before authentication. ``None`` entries are
    controls the config leaves off."""
    guards = [
        client_address(settings),  # who is calling: TCP peer, or XFF from trusted proxies
        ip_allowlist(settings),  # 403 ip_not_allowed, before anything else
        auth_lockout(settings, state.lockout),  # 429 locked_out, valid token or not
        route(),  # 404 not_found, 405 method_not_allowed
        no_token_in_query(settings),  # 400 token_in_query: URLs leak into logs
        bearer_auth(settings, failure_recorder(settings, state.lockout)),  # 401 unauthorized
        # 429 rate_limited (per-IP, global), 503 limiter_unavailable: authenticated calls only
        client_limits(settings, limiter, state.metrics),
        webhooks_enabled(settings),  # 503 webhooks_disabled
        json_body(settings),  # 413, 408, 415, 400 invalid_json / invalid_request
        agent_lookup(settings),  # 404 agent_not_found, 403 agent_not_permitted
        session_key_policy(settings),  # 403 session_key_not_allowed
        # 409 duplicate_in_flight, 503 dedup_unavailable, 200 duplicate (docs/dedup.md).
        # Before agent_limits: a retry of a delivery already done is answered without
        # spending the agent's budget or a maxConcurrent slot (a 429 there would only
        # make the sender retry again), and no slot is held while the claim waits on
        # Redis. The price: a 429 below must forget the claim, which handle() does.
        dedup(settings, store, state.metrics),
        # 429 rate_limited (the agent's limit, maxConcurrent): last, so a refused call costs nothing
        agent_limits(settings, limiter, state.in_flight, state.metrics),
    ]
    return [g for g in guards if g is not None]


def route_pipeline(
    settings: Settings, sender: Route, state: State, limiter: Limiter, store: DedupStore
) -> list[Guard]:
    """One route's guard chain (docs/routes.md): the same cheap checks first, then the
    raw body and its signature before anything parses it; rate limits count only
    verified deliveries. The path was matched when the chain was chosen (``dispatch``)."""
    profile = profile_for(sender.verify)
    failed = failure_recorder(settings, state.lockout)
    guards = [
        client_address(settings),
        ip_allowlist(settings),  # 403 ip_not_allowed
        auth_lockout(settings, state.lockout),  # 429 locked_out
        route(),  # 405 method_not_allowed (the path is this route's)
        no_token_in_query(settings),  # 400 token_in_query
        webhooks_enabled(settings),  # 503 webhooks_disabled
        signed.raw_body(settings),  # 413 payload_too_large, 408 request_timeout
        signed.signature(settings, sender, profile, failed),  # 401 signature_invalid / _expired
        client_limits(settings, limiter, state.metrics),  # 429 rate_limited, 503
        signed.payload(settings, sender, profile, failed),  # 415, 400 invalid_json; ping, challenge
        signed.when(sender, profile),  # 200 ignored
        signed.render(settings, sender, profile),  # 422 template_error, 403 session_key_not_allowed
        # 200 duplicate, 409 duplicate_in_flight, 503 dedup_unavailable: after the
        # signature, the body and `when`, before the agent's budget (see pipeline())
        dedup(settings, store, state.metrics),
        agent_limits(settings, limiter, state.in_flight, state.metrics),  # 429 rate_limited
    ]
    return [g for g in guards if g is not None]


@dataclass(frozen=True, slots=True)
class Runtime:
    """Everything derived from one config; replaced whole on reload."""

    settings: Settings
    guards: tuple[Guard, ...]
    forward: BaseForwarder
    # path -> (route, its guard chain): signed senders (docs/routes.md)
    routes: Mapping[str, tuple[Route, tuple[Guard, ...]]] = field(default_factory=dict)


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
        self.dedup_store: DedupStore | None = None  # opened by apply(), like the limiter
        self.retired_dedup_stores: list[DedupStore] = []
        self.in_flight = InFlight()
        self.draining = False  # set when shutdown begins: /readyz answers 503
        self.calls: set[asyncio.Task[web.StreamResponse]] = set()  # handlers in flight
        metrics.count_in_flight(self.calls.__len__)
        self.secret_texts: frozenset[str] = frozenset()  # to keep them out of request ids
        self._initial = settings
        self.runtime: Runtime | None = None
        self.spool: Spool | None = None  # durable acceptance (docs/spool.md), opened at start

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
        store = self.dedup_store
        dedup_config = settings.sidecar.dedup
        if store is None or store.backend != dedup_config.backend:
            if dedup_config.backend == "sqlite":  # in the spool's file (docs/dedup.md)
                store = SqliteDedup(self._spool_store)
            else:
                store = open_dedup_store(dedup_config.backend, dedup_config.max_entries)
        try:
            guards = tuple(pipeline(settings, self, limiter, store))
            routes = {
                path: (r, tuple(route_pipeline(settings, r, self, limiter, store)))
                for path, r in settings.webhooks.routes.items()
            }
            forward = make_forwarder(settings, pool, old.forward if old is not None else None)
        except BaseException:
            if fresh:
                pool.close()
            raise
        runtime = Runtime(settings, guards, forward, routes)
        previous, self.pool, self.runtime = self.pool, pool, runtime
        if fresh and previous is not None:
            previous.close()  # idle connections only; calls in flight finish on theirs
        if limiter is not self.limiter:
            if self.limiter is not None:  # calls in flight may still use it: closed at exit
                self.retired_limiters.append(self.limiter)
            self.limiter = limiter
        if store is not self.dedup_store:
            if self.dedup_store is not None:  # calls in flight may still finish on it
                self.retired_dedup_stores.append(self.dedup_store)
            self.dedup_store = store
        elif isinstance(store, MemoryDedupStore):  # kept, with its ids: only the bound moves
            store.max_entries = dedup_config.max_entries
        self.metrics.configure(settings)
        secrets = [*settings.webhooks.secrets]
        secrets += [s for r in settings.webhooks.routes.values() for s in r.secrets]
        self.secret_texts = frozenset(s.value.decode("latin-1") for s in secrets)

    def _spool_store(self) -> Store:
        """The spool file the ``sqlite`` dedup backend lives in. The config accepts that
        backend only with a spool, which is open before the first call is served and
        stays open (a reload that removes the spool takes effect on restart)."""
        assert self.spool is not None, "the sqlite dedup backend needs sidecar.spool"
        return self.spool.store

    def cut_off(self) -> int:
        """Cancel every call still in flight (the drain deadline passed); returns how many."""
        calls = list(self.calls)
        for task in calls:
            task.cancel()
        return len(calls)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    async def close_backends(self) -> None:
        """Close the limiters and dedup stores, current and retired (at exit)."""
        backends: list[Limiter | DedupStore | None] = [
            *self.retired_limiters, *self.retired_dedup_stores, self.limiter, self.dedup_store
        ]  # fmt: skip
        self.retired_limiters, self.retired_dedup_stores = [], []
        self.limiter = self.dedup_store = None
        for backend in backends:
            if backend is not None:
                await backend.aclose()


def _endpoint(settings: Settings) -> tuple[object, ...]:
    u = settings.sidecar.upstream
    return (u.socket, u.host, u.port)


STATE = web.AppKey("state", State)


# Calls cut off by the drain deadline get no reply (their connection is closed); the
# audit log and metrics still count them, as what they were waiting for ran out of time.
_CUT_OFF_FORWARDING = Reject(504, "upstream_timeout", "cut off by shutdown")
_CUT_OFF = Reject(408, "request_timeout", "cut off by shutdown")


RequestHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


def make_handler(state: State) -> RequestHandler:
    """The one request handler of the public listener, bound to ``state`` (a partial,
    not a wrapping coroutine: one frame less per request)."""
    return partial(handle, state)


async def handle(state: State, request: web.BaseRequest) -> web.StreamResponse:
    runtime = state.runtime
    assert runtime is not None
    metrics = state.metrics
    call = Call(request, runtime.settings)
    if call.request_id in state.secret_texts:  # a client's token sent as X-Request-Id:
        call.request_id = new_request_id()  # it would be logged and echoed back
    forwarding = False
    task = asyncio.current_task()
    state.calls.add(task)  # type: ignore[arg-type]  # also webhook_sidecar_in_flight_requests
    guards = runtime.guards
    if call.endpoint == "other" and runtime.routes:  # /hooks/<route>? (docs/routes.md)
        guards = signed.dispatch(call, runtime.routes) or guards
    try:
        for guard in guards:
            pending = guard(call)
            if pending is not None:
                await pending
        forwarding = True
        if state.spool is not None:  # answered once on disk, delivered later (docs/spool.md)
            event_id = await state.spool.accept(call, runtime.forward)
            response = ok_response(
                call.session, call.request_id, None, call.response_headers, event_id
            )
        else:
            started = time.perf_counter()
            try:
                run_id = await runtime.forward(call)
            finally:
                metrics.observe_upstream(call.endpoint, time.perf_counter() - started)
            response = ok_response(call.session, call.request_id, run_id, call.response_headers)
    except Reject as reject:
        response = error_response(reject, call.request_id)
        _finish(state, call, reject.status, reject.code)
    except Answer as answer:  # answered without forwarding (docs/routes.md)
        response = answer_response(answer, call.request_id)
        _finish(state, call, 200, None, answer.outcome)
    except asyncio.CancelledError:
        # handler_cancellation is off: only the drain deadline (Server.stop) cancels a call.
        cut = _CUT_OFF_FORWARDING if forwarding else _CUT_OFF
        _finish(state, call, cut.status, cut.code)
        abandon(call)
        raise
    except Exception:
        log.exception("internal error", extra={"requestId": call.request_id})
        response = error_response(INTERNAL_ERROR, call.request_id)
        _finish(state, call, INTERNAL_ERROR.status, INTERNAL_ERROR.code)
    else:
        _finish(state, call, 200, None)
    finally:
        state.calls.discard(task)
        if call.finalizers:
            for done in call.finalizers:
                done()
    finish = call.claim
    if finish is not None:  # the one place a held dedup id is remembered or forgotten
        pending = finish(call.claim_key, call.claim_ttl, response.status == 200)
        if pending is not None:
            await pending
    return response


def _finish(
    state: State, call: Call, status: int, code: str | None, outcome: str | None = None
) -> None:
    """Metrics and the one audit line (docs/audit-log.md) of a finished call. ``outcome``:
    what a call answered without forwarding was (e.g. ``ignored``, ``duplicate``)."""
    duration = time.perf_counter() - call.started
    metrics = state.metrics
    metrics.observe(call.endpoint, status, code, duration)
    secret = call.secret
    # The agent only after auth, and only a configured one: an unknown name is request input.
    agent = call.body.get("agent") if secret is not None else None
    if call.route is not None:  # a route's body is the sender's: its agent is the route's
        agent = call.agent.name if secret is not None and call.agent is not None else None
        metrics.observe_route(call.route, status, outcome == "ignored")
    elif agent is not None and agent not in call.settings.webhooks.agents:
        agent = None
    if outcome is None:
        if code is None:
            outcome = "forwarded"
        else:
            outcome = "upstream_failed" if code.startswith("upstream_") else "rejected"
    state.audit.record(
        call.request_id,
        call.client_ip,
        call.endpoint,
        agent,
        outcome,
        status,
        code,
        secret.id if secret is not None else None,
        duration,
        call.audit_extra,
    )
    if secret is not None:  # every authenticated use: what a rotation watches fall to zero
        metrics.authenticated(secret.id)


async def _upstream_pool(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    state.apply(state.settings)
    yield
    state.close()


async def _backends(app: web.Application) -> AsyncIterator[None]:
    """The limiter and the dedup store (Redis connection pools) are closed on the loop
    they ran on."""
    yield
    await app[STATE].close_backends()


async def _spool(app: web.Application) -> AsyncIterator[None]:
    """Open the spool (when configured) and run its delivery loop; on shutdown, let
    deliveries in flight finish within ``shutdownTimeout`` and close the file."""
    state = app[STATE]
    settings = state.settings
    if settings.sidecar.spool is None:
        yield
        return

    def forwarder() -> BaseForwarder:
        assert state.runtime is not None
        return state.runtime.forward

    spool = Spool(lambda: state.settings, forwarder, lambda: state.draining, state.metrics.spool())
    state.spool = spool
    spool.start()
    yield
    await spool.stop(state.settings.sidecar.shutdown_timeout)


def create_app(state: State) -> web.Application:
    """The public listener's app: its lifecycle (``cleanup_ctx``) and state. It has no
    routes: :class:`PublicRunner` serves every request with one handler, because
    routing is a guard."""
    app = web.Application()
    app[STATE] = state
    app.cleanup_ctx.append(_upstream_pool)
    app.cleanup_ctx.append(_backends)
    app.cleanup_ctx.append(_spool)
    return app


class PublicRunner(web.AppRunner):
    """Runs the public app on aiohttp's low-level server: one handler, no router.

    The app's startup and cleanup run as with :class:`web.AppRunner`, but requests
    skip ``Application._handle`` (router resolve, match info, middleware chain) and
    the ``web.Request`` subclass: ~10 us of CPU per request, a quarter of what a bare
    ``web.Application`` costs to answer a 401 (bench/README.md, "Performance").
    ``Expect: 100-continue``, which the router used to answer, is the body guard's.
    """

    async def _make_server(self) -> web.Server:
        app = self.app
        loop = asyncio.get_running_loop()
        app.on_startup.freeze()
        await app.startup()
        app.freeze()
        kwargs = dict(self._kwargs)
        kwargs.setdefault("max_field_size", 8190)
        kwargs.setdefault("max_line_size", 8190)
        return web.Server(make_handler(app[STATE]), loop=loop, **kwargs)
