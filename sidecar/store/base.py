"""What a dedup backend offers (docs/routes.md, "Delivery ids and duplicates").

A delivery id goes through three states: unknown, *in flight* (claimed by the call
that is forwarding it now) and *done* (answered 200: remembered for the route's
``dedup`` time). A claim is atomic across every process that shares the backend,
so two replicas that receive the same retry at once forward it only once.
"""

from __future__ import annotations

import enum
from typing import Protocol


class Claim(enum.Enum):
    NEW = "new"  # the caller owns the id now: forward, then complete() or release()
    IN_FLIGHT = "in_flight"  # another call is forwarding it: 409 duplicate_in_flight
    DONE = "done"  # already answered 200: 200 {"duplicate": true}, not forwarded


class DedupUnavailable(Exception):
    """The backend cannot answer (Redis down, disk error): the call is refused with
    503 ``dedup_unavailable``, never forwarded unchecked (fail closed)."""


class DedupStore(Protocol):
    # "memory", "sqlite" or the redis:// URL: a reload keeps a store whose backend stays.
    backend: str

    async def claim(self, key: str, in_flight_ttl: float) -> Claim:
        """Claim ``key``. ``in_flight_ttl`` bounds how long an unfinished claim blocks
        retries (a process that died mid-call must not block the id forever)."""

    async def complete(self, key: str, ttl: float) -> None:
        """The call was answered 200: remember ``key`` as done for ``ttl`` seconds."""

    async def release(self, key: str) -> None:
        """The call failed (or was refused after the claim): forget ``key``, so the
        sender's retry goes through."""

    async def aclose(self) -> None: ...
