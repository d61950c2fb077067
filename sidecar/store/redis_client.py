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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

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


class RedisBackend:
    """A backend kept in Redis: its URL (``backend``, what a reload compares), the URL
    fit for logs (``where``), a key prefix, one pool per process and its outage state.
    Subclasses name their default prefix (``PREFIX``), their ``logger``, what their
    outage log lines call them (``WHAT``) and the calls they count (``COUNT``)."""

    PREFIX = ""
    WHAT = ""
    COUNT = "failedCalls"
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

    async def aclose(self) -> None:
        await self.client.aclose()
