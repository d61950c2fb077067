"""The ``redis://host:port/db`` backend: one budget shared by every replica.

Each decision is one atomic server-side Lua script (one round trip for all the
buckets a request touches, e.g. per-IP and global together): no
read-modify-write race between replicas, and the bucket math runs on the Redis
server's clock (``TIME``), so replicas with skewed clocks still agree. Keys are
prefixed (``whs:rl:``) and expire by themselves when their bucket is full again.

Decisions asked for in the same turn of the event loop go out together, as one
pipeline, and a script Redis does not know is sent again in full: both as
:mod:`sidecar.store.redis_client` says, which the dedup store shares.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ..store.redis_client import RedisBackend, Script, describe
from .base import Check, Decision, Limiter, LimiterUnavailable

__all__ = ["KEY_PREFIX", "SCRIPT", "SCRIPT_SHA", "RedisLimiter", "describe"]

log = logging.getLogger("sidecar.limiter")

KEY_PREFIX = "whs:rl:"

# KEYS: one bucket per policy. ARGV: interval and tolerance (whole microseconds)
# of each key, in KEYS order. Returns {allowed (1/0), tat - now for each key}.
# A key expires (PX, milliseconds) when its bucket is full again.
# Same arithmetic as base.gcra; all-or-nothing: a refused request charges no bucket.
SCRIPT = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tats = {}
local allowed = 1
for i = 1, #KEYS do
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  if tat + tonumber(ARGV[2 * i - 1]) - tonumber(ARGV[2 * i]) > now then allowed = 0 end
  tats[i] = tat
end
local reply = {allowed}
for i = 1, #KEYS do
  local tat = tats[i]
  if allowed == 1 then
    tat = tat + tonumber(ARGV[2 * i - 1])
    local ttl = math.ceil((tat - now) / 1000)
    redis.call('SET', KEYS[i], string.format('%.0f', tat), 'PX', string.format('%.0f', ttl))
  end
  reply[i + 1] = tat - now
end
return reply
"""
_SCRIPT = Script(SCRIPT)
SCRIPT_SHA = _SCRIPT.sha


class RedisLimiter(RedisBackend, Limiter):
    """Token buckets in Redis, one connection pool per process."""

    PREFIX = KEY_PREFIX
    WHAT = "rate limit"
    COUNT = "failedDecisions"
    UNAVAILABLE = LimiterUnavailable
    logger = log

    async def acquire(self, checks: Sequence[Check]) -> Decision:
        keys = [self.prefix + key for _, key in checks]
        args: list[str | int] = []
        for policy, _ in checks:
            args += (policy.interval, policy.tolerance)
        reply = await self.run_script(_SCRIPT, keys, args)
        return Decision(reply[0] == 1, tuple(reply[1:]))
