"""What every Redis backend shares: the connection pool, its timeouts, the URL for
logs, and the outage book-keeping (back-off and log lines). The rate limiter
(:mod:`sidecar.limiter.redis`) and the dedup store (:mod:`sidecar.store.redis`)
both use it, so a dead Redis is met the same way by both.

A dead Redis must answer fast. A refused or reset connection fails at once (one
immediate retry on a fresh connection: a pooled one may have died with a Redis
restart). A silent one costs ``TIMEOUT`` — once: after a failure, callers for
the next ``BACKOFF`` seconds are answered as unavailable without touching the
network (:meth:`Outage.backing_off`), and then one call probes. When a probe
succeeds, service is back, with no restart. ``TIMEOUT`` is a second, not
milliseconds, because it also measures this process's own event loop lag: a
CPU-throttled pod (CFS quotas stall a container for tens of milliseconds at a
time) must not turn its own slowness into a Redis outage and fail closed.
Outages are logged when they start, every ``LOG_EVERY`` seconds while they last
(with a count), and when they end — never one line per request.

Every call is one server-side Lua script (:class:`Script`), and scripts asked for in
the same turn of the event loop go out together, as one pipeline: under load one
round trip and one pass through redis-py serve many requests (redis-py spends about
100 µs of CPU per command; in a pipeline of 16 about 30 µs per script), and nothing
waits for a batch to fill. A script is sent by hash (``EVALSHA``); one that Redis
does not know (just restarted, ``SCRIPT FLUSH``) answers ``NOSCRIPT`` and is sent
once in full (``EVAL``, which also caches it again).
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

TIMEOUT = 1.0  # connect, read, and wait for a pooled connection
MAX_CONNECTIONS = 64  # per process; batching rarely needs more than a few
BACKOFF = 0.5
LOG_EVERY = 30.0


def describe(url: str) -> str:
    """``host:port/db`` of a backend URL: never its password, fit for logs."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port or 6379}/{parts.path.strip('/') or '0'}"


def connect(url: str, timeout: float = TIMEOUT) -> Redis:
    """A client on its own pool for ``url``. Opens nothing yet: the pool connects on
    first use, on the running loop, and reconnects by itself after an outage."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=MAX_CONNECTIONS,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        # Retry a broken connection once; never a timeout: that would double it.
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    )
    return Redis.from_pool(pool)


class Outage:
    """One backend's health as its callers see it: when it went down, when to try
    again, how many calls failed since the last log line.

    ``what`` names the backend in log messages ("rate limit", "dedup"); ``count``
    names the counted calls in them (e.g. ``failedDecisions``).
    """

    def __init__(
        self,
        log: logging.Logger,
        what: str,
        where: str,
        count: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log = log
        self.what = what
        self.where = where
        self.count = count
        self.clock = clock
        self.down_since: float | None = None
        self.retry_at = 0.0
        self.failures = 0
        self.logged_at = 0.0

    def backing_off(self) -> bool:
        """Down, and too soon to try again."""
        return self.down_since is not None and self.clock() < self.retry_at

    def refused(self) -> None:
        """A call answered as unavailable without touching the network."""
        self.failures += 1

    def failed(self, exc: BaseException) -> None:
        now = self.clock()
        self.retry_at = now + BACKOFF
        self.failures += 1
        first = self.down_since is None
        if first or now - self.logged_at >= LOG_EVERY:
            if first:
                self.down_since = now
            self.log.warning(
                f"{self.what} backend unreachable",
                extra={
                    "backend": self.where,
                    "error": f"{type(exc).__name__}: {exc}"[:300],
                    self.count: self.failures,
                },
            )
            self.logged_at = now
            self.failures = 0

    def recovered(self) -> None:
        """A call went through: log the end of an outage, if there was one."""
        if self.down_since is None:
            return
        self.log.info(
            f"{self.what} backend reachable again",
            extra={
                "backend": self.where,
                "downSeconds": round(self.clock() - self.down_since, 3),
                self.count: self.failures,
            },
        )
        self.down_since = None
        self.failures = 0


class Script:
    """A Lua script, sent by its SHA-1 (what Redis names scripts by)."""

    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 - Redis's name


# (script, keys, other arguments, the waiting caller's future)
_Pending = tuple[Script, Sequence[str], Sequence[str | int], "asyncio.Future[Any]"]


class RedisBackend:
    """A backend kept in Redis: its URL (``backend``, what a reload compares), the URL
    fit for logs (``where``), a key prefix, one pool per process, its outage state and
    the batch of scripts waiting to be sent (:meth:`run_script`).

    Subclasses name their default prefix (``PREFIX``), their ``logger``, what their
    outage log lines call them (``WHAT``), the calls they count (``COUNT``) and the
    exception their callers get when Redis cannot answer (``UNAVAILABLE``, raised
    with ``where``)."""

    PREFIX = ""
    WHAT = ""
    COUNT = "failedCalls"
    UNAVAILABLE: type[Exception]  # each backend names its own (LimiterUnavailable, ...)
    logger: logging.Logger

    def __init__(
        self,
        url: str,
        *,
        prefix: str | None = None,
        timeout: float = TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = url
        self.where = describe(url)
        self.prefix = self.PREFIX if prefix is None else prefix
        self.client = connect(url, timeout)
        self._outage = Outage(self.logger, self.WHAT, self.where, self.COUNT, clock)
        self._queue: list[_Pending] = []
        self._sending: set[asyncio.Task[None]] = set()
        self._probe: asyncio.Task[None] | None = None  # the one batch testing a down Redis

    async def run_script(
        self, script: Script, keys: Sequence[str], args: Sequence[str | int]
    ) -> Any:
        """``script``'s reply, sent with the others asked for in this turn of the loop.

        Raises ``UNAVAILABLE`` when Redis cannot answer, at once while backing off
        after a failure or while one batch probes whether it is back."""
        outage = self._outage
        if outage.down_since is not None and (self._probe is not None or outage.backing_off()):
            outage.refused()
            raise self.UNAVAILABLE(self.where)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue.append((script, keys, args, future))
        return await future

    def _flush(self) -> None:
        """Send every script asked for since the last flush, as one batch."""
        batch, self._queue = self._queue, []
        task = asyncio.ensure_future(self._send(batch))
        if self._outage.down_since is not None:
            self._probe = task
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[_Pending]) -> None:
        replies: list[Any]
        try:
            replies = await self._run(batch)
        except (RedisError, OSError) as exc:
            self._outage.failed(exc)
            replies = [self.UNAVAILABLE(self.where)] * len(batch)
        except asyncio.CancelledError:  # aclose() at exit: nobody may wait forever
            for *_, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # a bug: the callers' 500 and log line carry it
            replies = [exc] * len(batch)
        else:
            if not any(isinstance(reply, self.UNAVAILABLE) for reply in replies):
                self._outage.recovered()
        finally:
            if self._probe is asyncio.current_task():
                self._probe = None
        for (*_, future), reply in zip(batch, replies, strict=True):
            if future.done():  # its caller was cancelled meanwhile
                continue
            if isinstance(reply, BaseException):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _run(self, batch: list[_Pending]) -> list[Any]:
        """The replies, in order: one EVALSHA, or a pipeline of them (one round trip).

        A script Redis does not know (``NOSCRIPT``) is sent again in full. A Redis
        error for one script (e.g. ``OOM``) fails that one only.
        """
        client = self.client
        if len(batch) == 1:
            script, keys, args, _ = batch[0]
            try:
                return [await client.evalsha(script.sha, len(keys), *keys, *args)]
            except NoScriptError:
                return [await client.eval(script.source, len(keys), *keys, *args)]
        pipe = client.pipeline(transaction=False)
        for script, keys, args, _ in batch:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        unknown = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if unknown:
            pipe = client.pipeline(transaction=False)
            for i in unknown:
                script, keys, args, _ = batch[i]
                pipe.eval(script.source, len(keys), *keys, *args)
            again = await pipe.execute(raise_on_error=False)
            for i, reply in zip(unknown, again, strict=True):
                replies[i] = reply
        for i, reply in enumerate(replies):
            if isinstance(reply, RedisError):
                self._outage.failed(reply)
                replies[i] = self.UNAVAILABLE(self.where)
        return replies

    async def aclose(self) -> None:
        for task in list(self._sending):
            task.cancel()
        await self.client.aclose()
