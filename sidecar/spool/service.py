"""The spool of one process (docs/spool.md): accepting a call onto disk, and the delivery
loop that empties it. :class:`Spool` is what the app and the admin listener see."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sqlite3
import time
from collections.abc import Callable
from typing import Protocol

from ..call import Call, Reject
from ..settings import Settings
from ..settings import Spool as SpoolSettings
from ..upstream.base import BaseForwarder
from . import queries
from .delivery import Deliverer
from .store import SpoolFull, SpoolUnavailable, Store, counts, file_bytes, oldest_pending

log = logging.getLogger("sidecar.spool")

RETRY_AFTER_FULL = "30"
RETRY_AFTER_UNAVAILABLE = "5"
STATS_INTERVAL = 1.0  # how often the gauges are refreshed from the file
_randbits = random.getrandbits
_time_ns = time.time_ns


def new_event_id() -> str:
    """32 hex digits: the time in milliseconds (48 bits), then 80 random bits. Unique
    across spool files too, so ``evt:<id>`` never repeats even if a spool file is
    replaced by an empty one; and ids of one time land next to each other in the
    file's index on ``id``: a commit touches a page or two of it, not one per event (a
    random id made the writer thread's work per event 1.7 times larger)."""
    return "%012x%020x" % (_time_ns() // 1_000_000 & 0xFFFFFFFFFFFF, _randbits(80))  # noqa: UP031


class Spool:
    """A spool file opened by this process: ``accept`` commits a call (group commit),
    ``start``/``stop`` run the delivery loop. ``metrics`` is told commit durations,
    delivery outcomes and the gauges."""

    def __init__(
        self,
        settings: Callable[[], Settings],
        forwarder: Callable[[], BaseForwarder],
        draining: Callable[[], bool],
        metrics: SpoolMetrics,
    ) -> None:
        spool = settings().sidecar.spool
        assert spool is not None
        self.path = spool.path
        self._settings = settings
        self._last = spool
        self.metrics = metrics
        self.store = Store(spool.path, spool.max_events)
        loop = asyncio.get_running_loop()

        def committed(seconds: float, ops: int) -> None:
            loop.call_soon_threadsafe(metrics.observe_commit, seconds)

        self.store.on_commit = committed
        self.deliverer = Deliverer(
            self.store, self.spool_settings, forwarder, draining, metrics.delivery
        )
        self.full = False
        self._stats_task: asyncio.Task[None] | None = None

    @property
    def healthy(self) -> bool:
        """The disk takes writes: false from a failed commit until one gets through."""
        return self.store.writable

    def spool_settings(self) -> SpoolSettings:
        """The live settings: ``maxEvents``, ``retry`` and ``concurrency`` follow a reload.
        The file is the one opened at start (:attr:`path`): a reload that moves or removes
        the spool takes effect on restart (the reloader warns), and until then the last
        settings that had a spool stay in force."""
        spool = self._settings().sidecar.spool
        if spool is not None:
            self._last = spool
        return self._last

    async def accept(self, call: Call, forward: BaseForwarder) -> str:
        """Commit ``call``'s upstream request; its eventId once it is on disk. Raises
        Reject 503 ``spool_full`` / ``spool_unavailable`` (docs/spool.md)."""
        event_id = new_event_id()
        path, body, headers = forward.parts(call)
        agent = call.agent
        assert agent is not None
        now = time.time()
        row: queries.Row = (
            event_id,
            f"{agent.name}\n{call.session}",
            "route" if call.route is not None else call.endpoint,
            call.route,
            agent.name,
            call.session,
            call.request_id,
            call.idempotency_key or f"evt:{event_id}",
            path,
            json.dumps(headers),
            body,
            now,
            now,
        )
        try:
            await self.store.run(queries.insert(row, self.spool_settings().max_events))
        except SpoolFull:
            self.full = True
            raise Reject(
                503,
                "spool_full",
                "the spool is full; retry later",
                {"Retry-After": RETRY_AFTER_FULL},
            ) from None
        except SpoolUnavailable:
            raise Reject(
                503,
                "spool_unavailable",
                "the spool cannot store the call now; retry later",
                {"Retry-After": RETRY_AFTER_UNAVAILABLE},
            ) from None
        self.full = False
        self.deliverer.poke()
        return event_id

    def start(self) -> None:
        self.deliverer.start()
        self._stats_task = asyncio.ensure_future(self._stats())

    async def stop(self, timeout: float) -> None:
        """Let deliveries in flight finish (up to ``timeout`` from the drain's start), then
        commit what is queued and close the file. Pending events stay on disk."""
        if self._stats_task is not None:
            self._stats_task.cancel()
        await self.deliverer.stop(timeout)
        await asyncio.to_thread(self.store.close)

    async def _stats(self) -> None:
        """Refresh the gauges. Only the delivering process reports the file's numbers (the
        others report 0), so a sum over ``sidecar.workers`` counts each event once.

        After a disk error, each round first tries a small real write: readiness must
        turn 200 again by itself once space is freed, because a pod that is not ready
        gets no calls (an accept that succeeds would never come)."""
        while True:
            try:
                if not self.store.writable:
                    await self.store.run(queries.probe)
                stats = await self.store.run(_gauges)
            except SpoolUnavailable:
                pass  # the store is marked not writable: /readyz says "unavailable"
            else:
                pending, dead, oldest = stats
                self.full = pending + dead >= self.spool_settings().max_events
                if self.deliverer.leader:
                    age = None if oldest is None else max(0.0, time.time() - oldest)
                    self.metrics.gauges(pending, dead, age)
                else:
                    self.metrics.gauges(0, 0, None)
            await asyncio.sleep(STATS_INTERVAL)

    def readiness(self) -> dict[str, object]:
        """How the spool is, for ``/readyz``."""
        state = "unavailable" if not self.healthy else "full" if self.full else "ok"
        return {"state": state, "bytes": file_bytes(self.path)}


def _gauges(conn: sqlite3.Connection) -> tuple[int, int, float | None]:
    pending, dead = counts(conn)
    return pending, dead, oldest_pending(conn)


class SpoolMetrics(Protocol):
    """What the spool reports; :class:`sidecar.metrics.Metrics` implements it."""

    def observe_commit(self, seconds: float) -> None: ...

    def delivery(self, result: str) -> None: ...

    def gauges(self, pending: int, dead: int, oldest_age: float | None) -> None: ...
