"""The ``memory`` dedup backend: ids remembered in this process only (docs/dedup.md).

Bounded: at most ``max_entries`` ids, the oldest claimed first out when a new one
needs room. Expiry is lazy (no background task): an entry past its deadline is
treated as absent when it is looked up, and the few expired entries at the old
end are dropped on each claim. Every operation is O(1): a dict kept in claim
order (re-claimed or completed ids move to the young end).

Per process: replicas, or several ``workers``, each keep their own ids, so a retry
that reaches another process is not recognised. Use a ``redis://`` backend there.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from .base import Claim

DEFAULT_MAX_ENTRIES = 100_000
_SWEEP = 2  # expired entries dropped from the old end per claim: amortised O(1)


class MemoryDedupStore:
    """Ids in an insertion-ordered dict: key -> (done, deadline on ``clock``)."""

    backend = "memory"

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[str, tuple[bool, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry[1] > self.clock()

    def claim_now(self, key: str, in_flight_ttl: float) -> Claim:
        """:meth:`claim` without the coroutine: what the guard calls on the hot path."""
        entries = self._entries
        now = self.clock()
        entry = entries.get(key)
        if entry is not None and entry[1] > now:
            return Claim.DONE if entry[0] else Claim.IN_FLIGHT
        if entry is not None:
            del entries[key]  # expired: claimed afresh, at the young end
        for _ in range(_SWEEP):  # the oldest may have expired: free their room first
            if not entries or next(iter(entries.values()))[1] > now:
                break
            entries.popitem(last=False)
        while len(entries) >= self.max_entries:  # (more than one after a reload shrank it)
            entries.popitem(last=False)  # full: the oldest goes, expired or not
        entries[key] = (False, now + in_flight_ttl)
        return Claim.NEW

    async def claim(self, key: str, in_flight_ttl: float) -> Claim:
        return self.claim_now(key, in_flight_ttl)

    def complete_now(self, key: str, ttl: float) -> None:
        entries = self._entries
        if key not in entries:
            while len(entries) >= self.max_entries:
                entries.popitem(last=False)
        entries[key] = (True, self.clock() + ttl)
        entries.move_to_end(key)

    async def complete(self, key: str, ttl: float) -> None:
        self.complete_now(key, ttl)

    def release_now(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is not None and not entry[0]:  # never forget a delivery that is done
            del self._entries[key]

    async def release(self, key: str) -> None:
        self.release_now(key)

    async def aclose(self) -> None:
        self._entries.clear()
