"""Delivery-id dedup (docs/dedup.md): a retried delivery is answered, not forwarded twice.

Which calls are deduplicated, and under which key:

- a route's call (``call.route`` set) with a delivery id, when the route's
  ``dedup`` time is above zero: ``route:<route>:<delivery id>``, remembered for
  the route's ``dedup`` time;
- a call to ``/hooks/wake`` or ``/hooks/agent`` with an ``Idempotency-Key``:
  ``hook:<secret id>:<endpoint>:<key>``, remembered for :data:`HOOK_TTL`. Per
  secret id, so two clients (two secrets) never answer each other's keys, and per
  endpoint, so a wake and an agent call that happen to share a key stay two calls.
  The key forwarded upstream stays the client's own.

The claim's answer: new -> the call goes on and holds the id (``call.claim``);
in flight -> 409 ``duplicate_in_flight`` with ``Retry-After: 1``; done -> 200
``{"duplicate": true}``, not forwarded; backend down -> 503
``dedup_unavailable`` (fail closed: never forwarded unchecked).

``call.claim`` is called once, in ``app.handle``, when the answer is known: a 200
(forwarded, or answered such as ``ignored``) remembers the id; anything else (a
429 from the agent's limit, an upstream failure, a shutdown cut-off) forgets it,
so the sender's retry goes through.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import NoReturn

from ..call import Answer, Call, Finish, Guard, Reject
from ..metrics import Metrics
from ..settings import Settings
from ..store import Claim, DedupStore, DedupUnavailable, MemoryDedupStore

log = logging.getLogger("sidecar.dedup")

HOOK_TTL = 24 * 3600.0  # how long /hooks/wake and /hooks/agent remember an Idempotency-Key
# An unfinished claim blocks retries for at most the upstream timeout plus this: the
# call either ends by then, or its process died and the id must not stay blocked.
IN_FLIGHT_MARGIN = 5.0
RETRY_AFTER_IN_FLIGHT = "1"
RETRY_AFTER_UNAVAILABLE = "5"

_releasing: set[asyncio.Task[None]] = set()  # releases of cut-off calls, kept alive


def route_dedup_seconds(settings: Settings, route: str) -> float:
    """The route's ``dedup`` time in seconds (0: off, or no such route)."""
    config = settings.webhooks.routes.get(f"/hooks/{route}")
    return 0.0 if config is None else config.dedup


async def _finish(store: DedupStore, key: str, ttl: float, answered_ok: bool) -> None:
    """Remember the id (a 200) or forget it (anything else), in a shared backend."""
    # A backend that fails now is not the caller's problem: the answer is given. An
    # id not remembered lets one retry through; one not forgotten blocks retries
    # until its in-flight time runs out.
    try:
        if answered_ok:
            await store.complete(key, ttl)
        else:
            await store.release(key)
    except DedupUnavailable:
        pass  # the store logged the outage


def abandon(call: Call) -> None:
    """The call was cut off (the drain deadline): forget its id, in the background
    when the backend needs a round trip (the call's own task is being cancelled)."""
    if call.claim is None:
        return
    pending = call.claim(call.claim_key, call.claim_ttl, False)
    if pending is not None:
        task = asyncio.ensure_future(pending)
        _releasing.add(task)
        task.add_done_callback(_releasing.discard)


def dedup(settings: Settings, store: DedupStore, metrics: Metrics) -> Guard:
    """Claim the call's delivery id or Idempotency-Key in ``store``; see the module doc.

    Calls with neither pay one attribute test and no coroutine.
    """
    in_flight_ttl = settings.sidecar.upstream.timeout + IN_FLIGHT_MARGIN
    # The memory backend (the default) is called in the guard's own frame, without a
    # coroutine; a keyed call then costs one store call to claim and one to finish,
    # and no object of its own (docs/dedup.md, "Cost").
    claim_now: Callable[[str, float], Claim] | None
    finish: Finish
    if isinstance(store, MemoryDedupStore):
        claim_now, finish = store.claim_now, store.finish_now
    else:
        claim_now, finish = None, partial(_finish, store)
    new = Claim.NEW

    def guard(call: Call) -> Awaitable[None] | None:
        route = call.route
        if route is not None:
            if call.delivery_id is None:
                return None
            ttl = route_dedup_seconds(call.settings, route)
            if ttl <= 0:
                return None
            key = f"route:{route}:{call.delivery_id}"
            label = route
        else:
            client_key = call.idempotency_key
            secret = call.secret
            if client_key is None or secret is None:
                return None
            label = call.endpoint
            key = f"hook:{secret.id}:{label}:{client_key}"
            ttl = HOOK_TTL
        if claim_now is None:
            return _claim_shared(call, key, ttl, label)
        claim = claim_now(key, in_flight_ttl)
        if claim is not new:
            _duplicate(call, claim, label)  # raises
        call.claim, call.claim_key, call.claim_ttl = finish, key, ttl
        return None

    async def _claim_shared(call: Call, key: str, ttl: float, label: str) -> None:
        try:
            claim = await store.claim(key, in_flight_ttl)
        except DedupUnavailable:
            raise Reject(
                503,
                "dedup_unavailable",
                "the dedup backend is unreachable; retry later",
                {"Retry-After": RETRY_AFTER_UNAVAILABLE},
            ) from None
        if claim is not new:
            _duplicate(call, claim, label)  # raises
        call.claim, call.claim_key, call.claim_ttl = finish, key, ttl

    def _duplicate(call: Call, claim: Claim, label: str) -> NoReturn:
        metrics.duplicate(label)
        call.audit("duplicate", True)
        if claim is Claim.IN_FLIGHT:
            raise Reject(
                409,
                "duplicate_in_flight",
                "this delivery is being forwarded now; retry later",
                {"Retry-After": RETRY_AFTER_IN_FLIGHT},
            )
        raise Answer("duplicate", {"duplicate": True})

    return guard
