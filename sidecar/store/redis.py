"""The ``redis://host:port/db`` dedup backend: ids shared by every replica (docs/dedup.md).

A claim is one script: ``SET key inflight NX PX <ttl>`` and, when the key exists,
a read of it (``done`` or ``inflight``), atomically, so two replicas that get the
same retry at once forward it once. ``complete`` sets ``done`` with the id's
expiry; ``release`` deletes the key only while it is still in flight, so a late
failure never forgets a delivery another call completed.

Scripts asked for in the same turn of the event loop share one round trip, as the
rate limiter's do (:mod:`sidecar.store.redis_client`): under load the claims of
many calls, and their completions, go out as one pipeline each.

Keys are ``webhook-sidecar:dedup:<key>`` and expire by themselves. An unreachable
Redis raises :class:`DedupUnavailable` (the guard answers 503: fail closed), with
the back-off and outage log lines of :mod:`sidecar.store.redis_client`.
"""

from __future__ import annotations

import logging

from .base import Claim, DedupUnavailable
from .redis_client import RedisBackend, Script

log = logging.getLogger("sidecar.dedup")

KEY_PREFIX = "webhook-sidecar:dedup:"

# KEYS[1]: the id. ARGV[1]: in-flight expiry, ms. Returns 0 new, 1 in flight, 2 done.
CLAIM = Script("""
if redis.call('SET', KEYS[1], 'inflight', 'NX', 'PX', ARGV[1]) then return 0 end
if redis.call('GET', KEYS[1]) == 'done' then return 2 end
return 1
""")
# ARGV[1]: how long the id is remembered as done, ms.
COMPLETE = Script("return redis.call('SET', KEYS[1], 'done', 'PX', ARGV[1])")
RELEASE = Script("""
if redis.call('GET', KEYS[1]) == 'inflight' then return redis.call('DEL', KEYS[1]) end
return 0
""")
_CLAIMS = (Claim.NEW, Claim.IN_FLIGHT, Claim.DONE)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisDedupStore(RedisBackend):
    """Dedup ids in Redis, one connection pool per process."""

    PREFIX = KEY_PREFIX
    WHAT = "dedup"
    UNAVAILABLE = DedupUnavailable
    logger = log

    async def claim(self, key: str, in_flight_ttl: float) -> Claim:
        reply = await self.run_script(CLAIM, [self.prefix + key], [_ms(in_flight_ttl)])
        return _CLAIMS[int(reply)]

    async def complete(self, key: str, ttl: float) -> None:
        await self.run_script(COMPLETE, [self.prefix + key], [_ms(ttl)])

    async def release(self, key: str) -> None:
        await self.run_script(RELEASE, [self.prefix + key], [])
