"""The ``redis://host:port/db`` backend: one budget shared by every replica.

Each decision is one atomic server-side Lua script (one round trip for all the
buckets a request touches, e.g. per-IP and global together): no
read-modify-write race between replicas, and the bucket math runs on the Redis
server's clock (``TIME``), so replicas with skewed clocks still agree. Keys are
prefixed (``whs:rl:``) and expire by themselves when their bucket is full again.

Decisions asked for in the same turn of the event loop go out together, as one
pipeline: under load one round trip and one pass through redis-py serve many
requests (redis-py spends about 100 µs of CPU per command; in a pipeline of 16
about 30 µs per decision), and nothing waits for a batch to fill.

The script is sent by hash (``EVALSHA``); a Redis that does not know it (just
restarted, ``SCRIPT FLUSH``) answers ``NOSCRIPT`` and the same call is sent once
in full (``EVAL``, which also caches it again).

A dead Redis must answer fast. A refused or reset connection fails at once (one
immediate retry on a fresh connection: a pooled one may have died with a Redis
restart). A silent one costs ``TIMEOUT`` — once: after a failure, requests for
the next ``BACKOFF`` seconds are answered as unavailable without touching the
network, and then one batch probes while the others still get that answer at
once. When a probe succeeds, service is back, with no restart. ``TIMEOUT`` is
a second, not milliseconds, because it also measures this process's own event
loop lag: a CPU-throttled pod (CFS quotas stall a container for tens of
milliseconds at a time) must not turn its own slowness into a Redis outage and
fail closed. Outages are logged when they start, every ``LOG_EVERY`` seconds
while they last (with a count), and when they end — never one line per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError

from .base import Check, Decision, Limiter, LimiterUnavailable

log = logging.getLogger("sidecar.limiter")

KEY_PREFIX = "whs:rl:"
TIMEOUT = 1.0  # connect, read, and wait for a pooled connection
MAX_CONNECTIONS = 64  # per process; batching rarely needs more than a few
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

# (number of keys, EVALSHA arguments, the waiting request's future)
_Pending = tuple[int, list[str | int], "asyncio.Future[list[int]]"]


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
        timeout: float = TIMEOUT,
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
            # Retry a broken connection once; never a timeout: that would double it.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        )
        self.client = Redis.from_pool(pool)
        self._queue: list[_Pending] = []
        self._sending: set[asyncio.Task[None]] = set()
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._probe: asyncio.Task[None] | None = None  # the one batch testing a down Redis
        self._failures = 0
        self._logged_at = 0.0

    async def acquire(self, checks: Sequence[Check]) -> Decision:
        if self._down_since is not None and (
            self._probe is not None or self.clock() < self._retry_at
        ):
            self._failures += 1
            raise LimiterUnavailable(self.where)
        args: list[str | int] = [self.prefix + key for _, key in checks]
        for policy, _ in checks:
            args += (policy.interval, policy.tolerance)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[int]] = loop.create_future()
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue.append((len(checks), args, future))
        reply = await future
        return Decision(reply[0] == 1, tuple(reply[1:]))

    def _flush(self) -> None:
        """Send every decision asked for since the last flush, as one batch."""
        batch, self._queue = self._queue, []
        task = asyncio.ensure_future(self._send(batch))
        if self._down_since is not None:
            self._probe = task
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Pending]) -> None:
        replies: list[Any]
        try:
            replies = await self._run(batch)
        except (RedisError, OSError) as exc:
            self._failed(exc)
            replies = [LimiterUnavailable(self.where)] * len(batch)
        except asyncio.CancelledError:  # aclose() at exit: nobody may wait forever
            for _, _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # a bug: the callers' 500 and log line carry it
            replies = [exc] * len(batch)
        else:
            ok = not any(isinstance(reply, LimiterUnavailable) for reply in replies)
            if ok and self._down_since is not None:
                self._recovered()
        finally:
            if self._probe is asyncio.current_task():
                self._probe = None
        for (_, _, future), reply in zip(batch, replies, strict=True):
            if future.done():  # its request was cancelled meanwhile
                continue
            if isinstance(reply, BaseException):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _run(self, batch: list[_Pending]) -> list[Any]:
        """The replies, in order: one EVALSHA, or a pipeline of them (one round trip).

        A script Redis does not know (``NOSCRIPT``) is sent again in full.
        A Redis error for one decision (e.g. ``OOM``) fails that one only.
        """
        client = self.client
        if len(batch) == 1:
            keys, args, _ = batch[0]
            try:
                return [await client.evalsha(SCRIPT_SHA, keys, *args)]
            except NoScriptError:
                return [await client.eval(SCRIPT, keys, *args)]
        pipe = client.pipeline(transaction=False)
        for keys, args, _ in batch:
            pipe.evalsha(SCRIPT_SHA, keys, *args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        unknown = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if unknown:
            pipe = client.pipeline(transaction=False)
            for i in unknown:
                pipe.eval(SCRIPT, batch[i][0], *batch[i][1])
            again = await pipe.execute(raise_on_error=False)
            for i, reply in zip(unknown, again, strict=True):
                replies[i] = reply
        for i, reply in enumerate(replies):
            if isinstance(reply, RedisError):
                self._failed(reply)
                replies[i] = LimiterUnavailable(self.where)
        return replies

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
        for task in list(self._sending):
            task.cancel()
        await self.client.aclose()
