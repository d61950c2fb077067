"""The ``memory`` backend: buckets in this process, bounded.

Per process: two replicas (or two processes) each have the whole budget. Use
the Redis backend to share one budget (docs/deployment.md).

Memory stays bounded however many clients call: a bucket that has filled up
again is the same as no bucket, so such entries are swept (at most every
``sweep_every`` microseconds, when a new key arrives); and past ``max_entries`` the
least recently used tenth is dropped — entries are re-inserted on use, so the
dict's order is least recently used first, and those are the buckets most
likely to be full already. Dropping a bucket can only give its client a full
bucket back, which is why the bound is generous.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

from .base import Check, Decision, Limiter, gcra, now_us

# ~4 MB of buckets at the cap. Dropping a bucket only gives its client a full one
# back, and the least recently used go first: an address still calling keeps its own.
DEFAULT_MAX_ENTRIES = 25_000
SWEEP_EVERY = 10_000_000  # microseconds


class MemoryLimiter(Limiter):
    """Token buckets in a dict. Decisions are synchronous: :meth:`take`."""

    backend = "memory"

    def __init__(
        self,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        clock: Callable[[], int] = now_us,
        sweep_every: int = SWEEP_EVERY,
    ) -> None:
        self.max_entries = max_entries
        self.clock = clock
        self.sweep_every = sweep_every
        self._tats: dict[str, int] = {}
        self._next_sweep = clock() + sweep_every

    def __len__(self) -> int:
        return len(self._tats)

    def take(self, checks: Sequence[Check]) -> Decision:
        """Charge every bucket in ``checks`` or none (a single thread: nothing interleaves)."""
        now = self.clock()
        tats = self._tats
        charged = []
        for policy, key in checks:
            allowed, tat = gcra(tats.get(key), now, policy.interval, policy.tolerance)
            if not allowed:  # nothing charged: report every bucket as it stands
                return Decision(False, tuple(max(tats.get(k, now) - now, 0) for _, k in checks))
            charged.append(tat)
        for (_, key), tat in zip(checks, charged, strict=True):
            if tats.pop(key, None) is None:
                self._make_room(now)
            tats[key] = tat  # (re-)inserted last: most recently used
        return Decision(True, tuple(tat - now for tat in charged))

    async def acquire(self, checks: Sequence[Check]) -> Decision:
        return self.take(checks)

    def _make_room(self, now: int) -> None:
        """Before a new key: sweep full buckets now and then; enforce the bound."""
        tats = self._tats
        if now >= self._next_sweep:
            self._next_sweep = now + self.sweep_every
            for key in [k for k, tat in tats.items() if tat <= now]:
                del tats[key]
        if len(tats) >= self.max_entries:
            # In batches, so a flood of new addresses costs O(1) per request.
            for key in list(itertools.islice(tats, max(1, self.max_entries // 10))):
                del tats[key]
