"""What every limiter backend shares: policies, decisions and the token-bucket math.

The bucket is kept as GCRA, the "generic cell rate algorithm" (ITU-T I.371;
also what the redis-cell module implements): a token bucket of
``burst`` tokens refilled at ``requests`` per ``per`` seconds, stored as one
number per key — the *theoretical arrival time* (``tat``) at which the bucket
will be full again. One number instead of (tokens, last refill) makes the
Redis script one ``GET`` and one ``SET``, lets the key expire exactly when the
bucket is full (a full bucket and a missing key mean the same thing), and
needs no floating-point state in Redis.

With ``interval = per / requests`` (time per token) and
``tolerance = burst * interval`` (the time a full bucket takes to refill):

- a request at ``now`` is allowed iff ``max(tat, now) + interval - tolerance <= now``;
- allowing it moves ``tat`` to ``max(tat, now) + interval``.

Every backend answers with ``ahead = tat - now`` per policy, after its
decision; the functions below turn that into what HTTP clients are told.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from ..settings import RateLimit


@dataclass(frozen=True, slots=True)
class Policy:
    """One configured limit (``name`` is the RateLimit header's policy name).

    Times are whole microseconds: both backends then do exact integer
    arithmetic (Lua numbers are doubles, exact to 2^53 — far beyond epoch
    microseconds), so ``3 * (1/3 s)`` is never more than one second, and the
    memory and Redis backends agree to the microsecond. Rounding the interval
    changes the rate by under one part in 10^5 for any sane limit.
    """

    name: str
    limit: RateLimit
    interval: int = field(init=False)  # microseconds per token
    tolerance: int = field(init=False)  # microseconds for an empty bucket to fill

    def __post_init__(self) -> None:
        interval = max(1, round(self.limit.per * 1_000_000 / self.limit.requests))
        object.__setattr__(self, "interval", interval)
        object.__setattr__(self, "tolerance", interval * self.limit.burst)


# One bucket to check: the policy and the bucket's key (e.g. "ip:192.0.2.7").
Check = tuple[Policy, str]


class Decision(NamedTuple):
    """A backend's answer for a set of checks, taken all-or-nothing.

    ``ahead[i]`` is ``tat - now`` (microseconds) of ``checks[i]``'s bucket after the
    decision: when refused no bucket was charged, so a request stopped by the
    per-IP limit does not spend the global budget, and vice versa.
    """

    allowed: bool
    ahead: tuple[int, ...]


class LimiterUnavailable(Exception):
    """The shared backend could not answer (down, unreachable, too slow)."""


class Limiter:
    """A limiter backend. One per process (per backend URL), living across reloads."""

    backend: str = ""

    async def acquire(self, checks: Sequence[Check]) -> Decision:
        """Charge one token from every bucket in ``checks``, or from none of them.

        Raises :class:`LimiterUnavailable` when the backend cannot decide.
        """
        raise NotImplementedError

    async def aclose(self) -> None:
        """Release everything (process shutdown)."""


def gcra(tat: int | None, now: int, interval: int, tolerance: int) -> tuple[bool, int]:
    """One bucket's decision: ``(allowed, new_tat)``. ``tat`` is None for a full bucket.

    The memory backend uses this directly; the Redis script is the same
    arithmetic in Lua (keep them in step; the tests run both on the same cases).
    """
    if tat is None or tat < now:
        tat = now
    if tat + interval - tolerance <= now:
        return True, tat + interval
    return False, tat


def remaining(policy: Policy, ahead: int) -> int:
    """Whole tokens left in the bucket (the RateLimit ``r``)."""
    return max(0, (policy.tolerance - ahead) // policy.interval)


def next_token_in(policy: Policy, ahead: int) -> int:
    """Microseconds until one more token is in the bucket (until ``r`` grows).

    Before then a client can use no more than ``r``: the draft's "effective
    window" ``t``. A full bucket gains nothing, so it answers one interval.
    """
    if ahead <= 0:
        return policy.interval
    return ahead - (-(-ahead // policy.interval) - 1) * policy.interval


def wait_for(policy: Policy, ahead: int) -> int:
    """Microseconds until this bucket would allow a request (0 when it would now)."""
    return max(0, ahead - (policy.tolerance - policy.interval))


def whole_seconds(microseconds: int) -> int:
    """Round up to whole seconds, at least 1: ``Retry-After`` must not invite a retry
    that is still too early (RFC 9110 §10.2.3 delay-seconds)."""
    return max(1, -(-microseconds // 1_000_000))


def now_us() -> int:
    """The memory backend's clock: monotonic microseconds."""
    return time.monotonic_ns() // 1000
