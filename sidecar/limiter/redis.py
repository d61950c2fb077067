"""The ``redis://host:port/db`` backend: one budget shared by every replica.

Each decision is one atomic server-side Lua script (one round trip for all the
buckets a request touches, e.g. per-IP and global together): no
read-modify-write race between replicas, and the bucket math runs on the Redis
server's clock (``TIME``), so replicas with skewed clocks still agree. Keys are
prefixed (``whs:rl:``) and expire by themselves when their bucket is full again.

The script is sent by hash (``EVALSHA``); a Redis that does not know it (just
restarted, ``SCRIPT FLUSH``) answers ``NOSCRIPT`` and the same call is sent once
in full (``EVAL``, which also caches it again).

A dead Redis must answer fast: short socket timeouts, one immediate retry (a
pooled connection may have died with a Redis restart; the retry opens a fresh
one), and after a failure requests for the next ``BACKOFF`` seconds are
answered as unavailable without touching the network. Then the next request
tries again: service comes back by itself when Redis does. Outages are logged
when they start, every ``LOG_EVERY`` seconds while they last (with a count),
and when they end — never one line per request.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from .base import Check, Decision, Limiter, LimiterUnavailable

log = logging.getLogger("sidecar.limiter")

KEY_PREFIX = "whs:rl:"
SOCKET_TIMEOUT = 0.25  # a same-cluster Redis answers in well under a millisecond
MAX_CONNECTIONS = 64  # per process; requests beyond wait up to SOCKET_TIMEOUT for one
BACKOFF = 0.5
LOG_EVERY = 30.0

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
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()  # noqa: S324 - Redis names scripts by SHA-1


def describe(url: str) -> str:
    """``host:port/db`` of a backend URL: never its password, fit for logs."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 6379}/{parts.path.strip('/') or '0'}"


class RedisLimiter(Limiter):
    """Token buckets in Redis, one connection pool per process."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = KEY_PREFIX,
        timeout: float = SOCKET_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = url
        self.where = describe(url)
        self.prefix = prefix
        self.clock = clock
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 1),
        )
        self.client = Redis.from_pool(pool)
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._failures = 0
        self._logged_at = 0.0

    async def acquire(self, checks: Sequence[Check]) -> Decision:
        now = self.clock()
        if self._down_since is not None and now < self._retry_at:
            self._failures += 1
            raise LimiterUnavailable(self.where)
        args: list[str | int] = [self.prefix + key for _, key in checks]
        for policy, _ in checks:
            args += (policy.interval, policy.tolerance)
        try:
            try:
                reply = await self.client.evalsha(SCRIPT_SHA, len(checks), *args)
            except NoScriptError:
                reply = await self.client.eval(SCRIPT, len(checks), *args)
        except (RedisError, OSError) as exc:
            self._failed(exc)
            raise LimiterUnavailable(self.where) from None
        if self._down_since is not None:
            self._recovered()
        return Decision(reply[0] == 1, tuple(reply[1:]))

    def _failed(self, exc: BaseException) -> None:
        now = self.clock()
        self._retry_at = now + BACKOFF
        self._failures += 1
        first = self._down_since is None
        if first or now - self._logged_at >= LOG_EVERY:
            if first:
                self._down_since = now
            log.warning(
                "rate limit backend unreachable",
                extra={
                    "backend": self.where,
                    "error": f"{type(exc).__name__}: {exc}"[:300],
                    "failedDecisions": self._failures,
                },
            )
            self._logged_at = now
            self._failures = 0

    def _recovered(self) -> None:
        assert self._down_since is not None
        log.info(
            "rate limit backend reachable again",
            extra={
                "backend": self.where,
                "downSeconds": round(self.clock() - self._down_since, 3),
                "failedDecisions": self._failures,
            },
        )
        self._down_since = None
        self._failures = 0

    async def aclose(self) -> None:
        await self.client.aclose()

