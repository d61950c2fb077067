"""Rate-limit backends: token buckets in this process (``memory``) or shared in Redis.

The guards in :mod:`sidecar.guards.ratelimit` decide *which* buckets a request
touches; a backend only charges them, all or none, and says how full they are.
"""

from __future__ import annotations

from .base import Check, Decision, Limiter, LimiterUnavailable, Policy
from .memory import MemoryLimiter

__all__ = [
    "Check", "Decision", "Limiter", "LimiterUnavailable", "MemoryLimiter", "Policy", "open_limiter",
]  # fmt: skip


def open_limiter(backend: str) -> Limiter:
    """The backend for ``sidecar.rateLimit.backend`` (already validated by config).

    Creating one opens no connection: the Redis pool connects on first use, on
    the running loop, and reconnects by itself after an outage.
    """
    if backend == "memory":
        return MemoryLimiter()
    from .redis import RedisLimiter  # redis-py is imported only when it is used

    return RedisLimiter(backend)
