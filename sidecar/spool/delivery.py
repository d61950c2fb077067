"""The delivery loop (docs/spool.md): pending events to the runtime, in arrival order per
session, with retries, backoff and dead letters.

One process delivers from a spool file at a time: the one holding the ``deliverer``
lease row, renewed every second and taken over by another process (another
``sidecar.workers`` worker, or the next start) once it has lapsed. Every process
accepts; only the lease holder delivers.

In memory the loop holds a window of the oldest pending events (read in arrival
order, by ``seq``, topped up a quarter of the window at a time), one queue per
ordering key (agent and session): a backlog of any size costs the memory of the
window. At most one event per key is in flight, and at most ``concurrency`` in all.
An outcome is written through the store's group commit: 2xx deletes the event (the
deletes of ``DELETE_DELAY`` share one commit); unreachable,
timeout, 429 and 5xx set its next attempt (exponential backoff with jitter,
honouring ``Retry-After``) and the queue waits; another 4xx, or a failure after
``giveUpAfter``, makes it a dead letter and the queue moves on. A process that dies
mid-delivery leaves the event pending: it is sent again with the same
``Idempotency-Key`` (at least once); so does one delivered within ``DELETE_DELAY`` of
the crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ..call import Reject
from ..settings import Spool as SpoolSettings
from ..upstream.base import BaseForwarder
from . import queries
from .queries import Event
from .store import SpoolUnavailable, Store

log = logging.getLogger("sidecar.spool")

LEASE_TTL = 3.0  # a deliverer that stops renewing is replaced after this long
LEASE_RENEW = 1.0
POLL = 0.2  # how often events accepted by other processes are looked for
WINDOW = 2048  # pending events held in memory at most
# A delivered event's delete waits up to this long for others to share its commit: one
# fsync per delivery would cost more than the delivery itself. A crash in between only
# sends those events again, with the same key (at least once).
DELETE_DELAY = 0.01
DELETE_BATCH = 256
MAX_RETRY_AFTER = 86400
Outcome = Callable[[str], None]  # "delivered", "retried", "dead": the metrics


def backoff(attempts: int, initial: float, most: float) -> float:
    """The wait before retry number ``attempts`` (1 for the first): full jitter between
    ``initial`` and a ceiling that doubles with each attempt up to ``most``."""
    ceiling = min(most, initial * float(2 ** min(attempts, 40)))
    jitter: float = random.random()  # noqa: S311 - not a secret
    return initial + jitter * (ceiling - initial)


def retry_after(value: str | bytes | None) -> float:
    """A ``Retry-After`` in delta-seconds, else 0 (an HTTP date is not worth parsing)."""
    if value is None:
        return 0.0
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    text = text.strip()
    return float(min(int(text), MAX_RETRY_AFTER)) if text.isdigit() and len(text) < 9 else 0.0


class Deliverer:
    """Delivers one spool file's pending events while this process holds the lease."""

    def __init__(
        self,
        store: Store,
        settings: Callable[[], SpoolSettings],
        forwarder: Callable[[], BaseForwarder],
        draining: Callable[[], bool],
        outcome: Outcome,
    ) -> None:
        self.store = store
        self.settings = settings
        self.forwarder = forwarder
        self.draining = draining
        self.outcome = outcome
        self.owner = f"{os.getpid()}-{secrets.token_hex(6)}"
        self.leader = False
        self.queues: dict[str, deque[Event]] = {}
        self.loaded = 0
        self.cursor = 0  # the last seq read into memory
        self.more = True  # the last read filled the window: there may be more on disk
        self.busy: set[str] = set()  # ordering keys with an event in flight
        self.in_flight: dict[int, asyncio.Task[None]] = {}
        self.replays = -1
        self.known: set[int] = set()  # re-reading from the start: events already in memory
        self.read_at = 0.0  # the next look at the file for events of other processes
        self.wake = asyncio.Event()
        self.stopping = False
        self.drain_started: float | None = None
        self.task: asyncio.Task[None] | None = None
        self.delivered: list[int] = []  # seqs delivered, their delete not yet submitted
        self.delete_timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self.task = asyncio.ensure_future(self._run())

    def poke(self) -> None:
        """A new event was committed by this process."""
        self.more = True
        self.wake.set()

    async def stop(self, timeout: float) -> None:
        """Start no delivery; let those in flight finish until ``timeout`` after the drain
        began, then cancel them (their events stay pending on disk); release the lease."""
        self.stopping = True
        self.wake.set()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        started = self.drain_started if self.drain_started is not None else time.monotonic()
        left = max(0.0, started + timeout - time.monotonic())
        tasks = list(self.in_flight.values())
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=left)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=1.0)
                log.warning("shutdown: %d delivery(ies) cut off; they stay pending", len(late))
        self._flush_deletes()
        if self.leader:
            with contextlib.suppress(SpoolUnavailable):
                await self.store.run(queries.release_lease(self.owner))

    # -- the loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        renew_at = 0.0
        while not self.stopping:
            if self.draining():
                if self.drain_started is None:
                    self.drain_started = time.monotonic()
                await asyncio.sleep(POLL)  # no new deliveries; stop() waits for the rest
                continue
            now = time.monotonic()
            try:
                if now >= renew_at:
                    await self._lease()
                    renew_at = now + LEASE_RENEW
                if self.leader:
                    await self._read()
            except SpoolUnavailable as exc:
                log.warning("spool: delivery paused: %s", exc)
                await asyncio.sleep(LEASE_RENEW)
                continue
            delay = self._dispatch() if self.leader else LEASE_RENEW
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(delay, POLL, renew_at - time.monotonic())):
                    await self.wake.wait()

    async def _lease(self) -> None:
        was = self.leader
        self.leader = await self.store.run(queries.take_lease(self.owner, LEASE_TTL))
        if self.leader and not was:
            log.info("spool: delivering from this process", extra={"owner": self.owner})
        if not self.leader:
            return
        replays = await self.store.run(queries.replays)
        if replays != self.replays:  # dead letters came back (spool replay): read afresh
            self.replays = replays
            self._flush_deletes()  # queued before the re-read: delivered events stay gone
            self.queues = {k: q for k, q in self.queues.items() if k in self.busy}
            for queue in self.queues.values():
                while len(queue) > 1:
                    queue.pop()  # keep only the event in flight
            self.loaded = sum(len(q) for q in self.queues.values())
            self.cursor = 0
            self.more = True
            # Events kept in memory (in flight) come back from the file: skip them.
            self.known = {e.seq for q in self.queues.values() for e in q}

    async def _read(self) -> None:
        """Top the window up from the file, in batches of at least a quarter of it: one
        read per event would be a round trip to the writer thread for each delivery."""
        room = WINDOW - self.loaded
        if room < WINDOW // 4:
            return
        now = time.monotonic()
        if not self.more and now < self.read_at:
            return  # nothing new here; other processes' events are looked for every POLL
        self.read_at = now + POLL
        events = await self.store.run(queries.pending_after(self.cursor, room))
        self.more = len(events) == room
        known = self.known
        for event in events:
            self.cursor = max(self.cursor, event.seq)
            if event.seq in self.in_flight or event.seq in known:
                continue
            self.queues.setdefault(event.ordering, deque()).append(event)
            self.loaded += 1
        if not self.more:
            self.known = set()  # the file has been read past every event kept

    def _dispatch(self) -> float:
        """Start what may start; the seconds until the next event falls due."""
        settings = self.settings()
        wall = time.time()
        soonest = POLL
        for key, queue in self.queues.items():
            if key in self.busy:
                continue
            if len(self.busy) >= settings.concurrency:
                break
            head = queue[0]
            if head.next_at > wall:
                soonest = min(soonest, head.next_at - wall)
                continue
            self.busy.add(key)
            task = asyncio.ensure_future(self._deliver(head))
            self.in_flight[head.seq] = task
        return max(0.0, soonest)

    def _finish(self, event: Event) -> None:
        queue = self.queues.get(event.ordering)
        if queue and queue[0] is event:
            queue.popleft()
            self.loaded -= 1
            if not queue:
                del self.queues[event.ordering]

    async def _deliver(self, event: Event) -> None:
        status: int | None = None
        wait = 0.0
        try:
            forward = self.forwarder()
            parts = (event.path, event.body, event.headers)
            response = await forward.exchange(parts, event.idempotency_key, event.request_id)
            status = response.status
            if 200 <= status < 300:
                self._finish(event)
                self._delete(event.seq)
                self.outcome("delivered")
                return
            reason = f"the runtime answered {status}"
            wait = retry_after(response.headers.get(b"retry-after"))
            if status != 429 and status < 500:
                event.attempts += 1
                self._dead(event, status, reason)
                return
        except Reject as reject:  # unreachable, timeout, unusable reply
            reason = reject.code
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("spool: delivery failed", extra={"eventId": event.id})
            reason = "internal_error"
        finally:
            self.busy.discard(event.ordering)
            self.in_flight.pop(event.seq, None)
            self.wake.set()
        self._retry(event, status, reason, wait)

    def _retry(self, event: Event, status: int | None, reason: str, wait: float) -> None:
        settings = self.settings().retry
        event.attempts += 1
        now = time.time()
        if now - event.created >= settings.give_up_after:
            self._dead(event, status, f"{reason}; gave up after {settings.give_up_after:g}s")
            return
        event.next_at = now + max(wait, backoff(event.attempts, settings.initial, settings.max))
        self._write(queries.retry_later(event.seq, event.attempts, event.next_at, status, reason))
        self.outcome("retried")

    def _dead(self, event: Event, status: int | None, reason: str) -> None:
        self._finish(event)
        self._write(queries.to_dead(event.seq, event.attempts, status, reason))
        self.outcome("dead")
        log.warning(
            "spool: event moved to the dead letters",
            extra={"eventId": event.id, "upstreamStatus": status, "reason": reason},
        )

    def _delete(self, seq: int) -> None:
        """A delivered event off the file, in the next batch of deletes (DELETE_DELAY)."""
        self.delivered.append(seq)
        if len(self.delivered) >= DELETE_BATCH:
            self._flush_deletes()
        elif self.delete_timer is None:
            loop = asyncio.get_running_loop()
            self.delete_timer = loop.call_later(DELETE_DELAY, self._flush_deletes)

    def _flush_deletes(self) -> None:
        if self.delete_timer is not None:
            self.delete_timer.cancel()
            self.delete_timer = None
        if self.delivered:
            seqs, self.delivered = self.delivered, []
            self._write(queries.delete(seqs))

    def _write(self, op: Callable[[Any], None]) -> None:
        """An outcome, committed in the background: if it is lost (disk error, crash),
        the event is delivered again with the same key, which is allowed."""
        try:
            future = self.store.submit(op)
        except SpoolUnavailable:
            return
        future.add_done_callback(_log_failure)


def _log_failure(future: Any) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("spool: could not record a delivery outcome: %s", future.exception())
