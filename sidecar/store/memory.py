"""The ``memory`` dedup backend: ids remembered in this process only (docs/dedup.md).

Bounded: at most ``max_entries`` ids, in flight and done together; when a new one
needs room, the delivery completed longest ago goes first. (A call whose id had to go
while it was in flight, which takes ``max_entries`` calls in flight at once, still
records its answer; the next claim restores the bound.) Expiry is lazy (no background
task): an entry past its deadline is treated as absent when it is looked up, and the
few expired ones at the old end are dropped on each claim.

This runs on every keyed call, so every operation is O(1) and touches as little
memory as it can. One plain dict maps an id to its deadline, with the state in the
sign: negative while in flight (``-deadline``), positive once done. Beside it, a
queue of the done ids and their deadlines, in the order they were completed, says
which id is oldest and whether it has expired without a lookup in the table. An id
claimed again after it expired leaves an old record behind: a record whose deadline
no longer matches the table is skipped when it reaches the front, and that claim
rebuilds the queue from the table (in its order) if stale records could outnumber
the live ones. The check runs there only: a claim of a new id and its completion
do only what the steady state needs (docs/dedup.md, "Cost").

Nothing kept per id is an object the garbage collector tracks (strings and floats,
in two queues rather than one queue of tuples), so remembering 100,000 ids does not
make collections more frequent or longer; a tuple per id cost about 1 µs per call.

Per process: replicas, or several ``workers``, each keep their own ids, so a retry
that reaches another process is not recognised. Use a ``redis://`` backend there.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from .base import Claim

_NEW, _IN_FLIGHT, _DONE = Claim.NEW, Claim.IN_FLIGHT, Claim.DONE

DEFAULT_MAX_ENTRIES = 100_000


class MemoryDedupStore:
    """Ids in ``_entries`` (id -> deadline on ``clock``; negative: in flight) and the
    done ones in completion order (``_order``, ``_deadlines``)."""

    backend = "memory"

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self._entries: dict[str, float] = {}
        self._order: deque[str] = deque()  # done ids, oldest completed first
        self._deadlines: deque[float] = deque()  # their deadlines then, in step

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return abs(self._entries.get(key, 0.0)) > self.clock()

    def claim_now(self, key: str, in_flight_ttl: float) -> Claim:
        """:meth:`claim` without the coroutine: what the guard calls on the hot path."""
        now = self.clock()
        entries = self._entries
        deadline = entries.get(key)
        if deadline is not None:
            if deadline > now:
                return _DONE
            if -deadline > now:
                return _IN_FLIGHT
            self._may_go_stale()  # expired, claimed again: its old record goes stale
        if len(entries) >= self.max_entries:  # full: the steady state of a busy sidecar
            order = self._order
            if order:  # _forget_oldest, inline: this is every claim of a busy sidecar
                oldest, its_deadline = order.popleft(), self._deadlines.popleft()
                now_held = entries.pop(oldest, None)
                if now_held is not its_deadline and now_held is not None:
                    entries[oldest] = now_held  # claimed again since: it stays
            if len(entries) >= self.max_entries:  # that record was stale, or all in flight
                self._make_room(1)
        else:
            deadlines = self._deadlines
            if deadlines and deadlines[0] <= now:  # two a claim: expiry keeps up
                self._forget_oldest()
                if deadlines and deadlines[0] <= now:
                    self._forget_oldest()
        entries[key] = -(now + in_flight_ttl)
        return _NEW

    async def claim(self, key: str, in_flight_ttl: float) -> Claim:
        return self.claim_now(key, in_flight_ttl)

    def finish_now(self, key: str, ttl: float, answered_ok: bool) -> None:
        """The claimed call's answer is known: remember ``key`` as done for ``ttl``
        seconds (a 200), or forget it while it is still in flight (anything else). One
        call, no coroutine: what the guard leaves the call to run on the hot path."""
        entries = self._entries
        if answered_ok:
            deadline = self.clock() + ttl
            entries[key] = deadline
            self._order.append(key)
            self._deadlines.append(deadline)
        elif entries.get(key, 0.0) < 0:  # never forget a delivery that is done
            del entries[key]

    async def complete(self, key: str, ttl: float) -> None:
        self.finish_now(key, ttl, True)

    async def release(self, key: str) -> None:
        self.finish_now(key, 0.0, False)

    async def aclose(self) -> None:
        self._entries.clear()
        self._order.clear()
        self._deadlines.clear()

    def _forget_oldest(self) -> None:
        """Drop the oldest record, and its id unless it was completed again since (then
        the table holds another float than the very one finish_now stored with it)."""
        key = self._order.popleft()
        deadline = self._deadlines.popleft()
        if self._entries.get(key) is deadline:
            del self._entries[key]

    def _may_go_stale(self) -> None:
        """An expired id is being claimed again, so its old record in the queue will
        stop matching the table. Rebuild the queue from the table when stale records
        could outnumber the live ones. (An id evicted while in flight can leave a stale
        record too, when its call and a retry's both complete; but that eviction needs
        an empty queue, so those are never more than ``max_entries``.)"""
        entries = self._entries
        if len(self._order) > 2 * len(entries) + 64:
            self._order = deque(k for k, d in entries.items() if d > 0)
            self._deadlines = deque(d for d in entries.values() if d > 0)

    def _make_room(self, room: int) -> None:
        """Evict until ``room`` more ids fit (more than one goes after a reload shrank
        the bound): the done ids completed longest ago first. Only when none is left,
        i.e. when ``max_entries`` calls are in flight at once, an in-flight id, the
        first found."""
        entries = self._entries
        while len(entries) > self.max_entries - room:
            if self._order:
                self._forget_oldest()
            elif entries:
                del entries[next(iter(entries))]
            else:
                return
