"""The memory backend: all-or-nothing decisions, bounded memory, sweeping, on a fake clock."""

from __future__ import annotations

from sidecar.limiter import MemoryLimiter, Policy, open_limiter
from sidecar.settings import RateLimit

S = 1_000_000
IP = Policy("ip", RateLimit(requests=2, per=1.0, burst=2))
GLOBAL = Policy("global", RateLimit(requests=3, per=60.0, burst=3))


class Clock:
    def __init__(self) -> None:
        self.now = 1_000 * S

    def __call__(self) -> int:
        return self.now


def test_open_limiter_memory() -> None:
    limiter = open_limiter("memory")
    assert isinstance(limiter, MemoryLimiter) and limiter.backend == "memory"


def test_one_bucket_per_key() -> None:
    limiter = MemoryLimiter(clock=Clock())
    a = [limiter.take([(IP, "ip:a")]).allowed for _ in range(3)]
    b = [limiter.take([(IP, "ip:b")]).allowed for _ in range(3)]
    assert a == b == [True, True, False]


def test_refused_requests_charge_no_bucket() -> None:
    """An address over its own limit must not spend the global budget for everyone."""
    limiter = MemoryLimiter(clock=Clock())
    for _ in range(2):
        assert limiter.take([(IP, "ip:noisy"), (GLOBAL, "global")]).allowed
    for _ in range(10):
        assert not limiter.take([(IP, "ip:noisy"), (GLOBAL, "global")]).allowed
    # One global token is still there for someone else, and then no more.
    assert limiter.take([(IP, "ip:quiet"), (GLOBAL, "global")]).allowed
    refused = limiter.take([(IP, "ip:other"), (GLOBAL, "global")])
    assert not refused.allowed
    assert refused.ahead == (0, GLOBAL.tolerance)  # as they stand: ip:other untouched
    # ...and that refusal did not charge ip:other either.
    assert limiter.take([(IP, "ip:other")]).ahead == (IP.interval,)


async def test_acquire_is_take() -> None:
    limiter = MemoryLimiter(clock=Clock())
    decision = await limiter.acquire([(GLOBAL, "global")])
    assert decision.allowed and decision.ahead == (GLOBAL.interval,)
    await limiter.aclose()


def test_time_refills() -> None:
    clock = Clock()
    limiter = MemoryLimiter(clock=clock)
    assert [limiter.take([(IP, "ip:a")]).allowed for _ in range(3)] == [True, True, False]
    clock.now += S // 2
    assert [limiter.take([(IP, "ip:a")]).allowed for _ in range(2)] == [True, False]


def test_full_buckets_are_swept() -> None:
    clock = Clock()
    limiter = MemoryLimiter(clock=clock, sweep_every=5 * S)
    for i in range(100):
        limiter.take([(IP, f"ip:{i}")])
    assert len(limiter) == 100
    clock.now += 6 * S  # every bucket full again, and a sweep is due
    limiter.take([(IP, "ip:new")])
    assert len(limiter) == 1


def test_memory_stays_bounded_under_many_keys() -> None:
    clock = Clock()
    limiter = MemoryLimiter(max_entries=1_000, clock=clock)
    high = 0
    for i in range(50_000):  # a flood of distinct addresses inside one second
        assert limiter.take([(IP, f"ip:{i}")]).allowed
        high = max(high, len(limiter))
    assert 900 <= high <= 1_000
    # The most recently used bucket survived the evictions: its second request
    # passes and its third is refused, as if nothing had been evicted.
    assert [limiter.take([(IP, "ip:49999")]).allowed for _ in range(2)] == [True, False]


def test_eviction_drops_least_recently_used_first() -> None:
    clock = Clock()
    limiter = MemoryLimiter(max_entries=10, clock=clock)
    limiter.take([(IP, "ip:busy")])
    limiter.take([(IP, "ip:busy")])  # empty now
    for i in range(30):
        limiter.take([(IP, f"ip:{i}")])
        limiter.take([(GLOBAL, "global")])  # keeps 'global' recently used
    assert not limiter.take([(GLOBAL, "global")]).allowed  # still remembered, still empty
    assert limiter.take([(IP, "ip:busy")]).allowed  # forgotten: a full bucket again
