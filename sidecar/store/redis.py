"""The ``redis://host:port/db`` dedup backend: ids shared by every replica (docs/dedup.md).

A claim is one round trip: a Lua script does ``SET key inflight NX PX <ttl>`` and,
when the key exists, reads it (``done`` or ``inflight``), atomically, so two
replicas that get the same retry at once forward it once. ``complete`` is ``SET
key done PX <ttl>``; ``release`` deletes the key only while it is still in flight
(a script), so a late failure never forgets a delivery another call completed.

Keys are ``webhook-sidecar:dedup:<key>`` and expire by themselves. An unreachable
Redis raises :class:`DedupUnavailable` (the guard answers 503: fail closed), with
the back-off and outage log lines of :mod:`sidecar.store.redis_client`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from .base import Claim, DedupUnavailable
from .redis_client import RedisBackend

log = logging.getLogger("sidecar.dedup")

KEY_PREFIX = "webhook-sidecar:dedup:"
INFLIGHT = "inflight"
DONE = "done"

# KEYS[1]: the id. ARGV[1]: in-flight expiry, ms. Returns 0 new, 1 in flight, 2 done.
CLAIM = """
if redis.call('SET', KEYS[1], 'inflight', 'NX', 'PX', ARGV[1]) then return 0 end
if redis.call('GET', KEYS[1]) == 'done' then return 2 end
return 1
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == 'inflight' then return redis.call('DEL', KEYS[1]) end
return 0
"""
_CLAIMS = (Claim.NEW, Claim.IN_FLIGHT, Claim.DONE)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


class RedisDedupStore(RedisBackend):
    """Dedup ids in Redis, one connection pool per process."""

    PREFIX = KEY_PREFIX
    WHAT = "dedup"
    logger = log

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        # register_script: EVALSHA, and EVAL once when Redis does not know the script.
        self._claim = self.client.register_script(CLAIM)
        self._release = self.client.register_script(RELEASE)
        self._probing = False

    async def _run(self, op: Callable[[], Any]) -> Any:
        outage = self._outage
        probe = outage.down_since is not None
        if probe:  # a dead Redis: answer at once, not after a timeout each
            if self._probing or outage.backing_off():
                outage.refused()
                raise DedupUnavailable(self.where)
            self._probing = True  # this call tries again; the others wait for its answer
        try:
            reply = await op()
        except (RedisError, OSError) as exc:
            outage.failed(exc)
            raise DedupUnavailable(self.where) from None
        finally:
            if probe:
                self._probing = False
        outage.recovered()
        return reply

    async def claim(self, key: str, in_flight_ttl: float) -> Claim:
        keys = [self.prefix + key]
        reply = await self._run(lambda: self._claim(keys, [_ms(in_flight_ttl)]))
        return _CLAIMS[int(reply)]

    async def complete(self, key: str, ttl: float) -> None:
        name = self.prefix + key
        await self._run(lambda: self.client.set(name, DONE, px=_ms(ttl)))

    async def release(self, key: str) -> None:
        keys = [self.prefix + key]
        await self._run(lambda: self._release(keys))
