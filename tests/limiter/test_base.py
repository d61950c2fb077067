"""The token-bucket arithmetic every backend shares, on an injected clock."""

from __future__ import annotations

import pytest

from sidecar.limiter.base import (
    Policy,
    gcra,
    next_token_in,
    remaining,
    wait_for,
    whole_seconds,
)
from sidecar.settings import RateLimit

S = 1_000_000  # microseconds per second


def run(policy: Policy, times: list[float]) -> list[tuple[bool, int]]:
    """Feed requests at ``times`` (seconds); return (allowed, ahead) of each, as a
    backend would."""
    tat: int | None = None
    out = []
    for seconds in times:
        now = round(seconds * S)
        allowed, new_tat = gcra(tat, now, policy.interval, policy.tolerance)
        if allowed:
            tat = new_tat
        out.append((allowed, new_tat - now))
    return out


def test_policy_derives_interval_and_tolerance() -> None:
    p = Policy("ip", RateLimit(requests=60, per=60.0, burst=20))
    assert (p.interval, p.tolerance) == (1 * S, 20 * S)
    third = Policy("ip", RateLimit(requests=3, per=1.0, burst=3))
    assert (third.interval, third.tolerance) == (333_333, 999_999)  # whole microseconds


def test_burst_then_refusal_then_refill() -> None:
    p = Policy("ip", RateLimit(requests=2, per=1.0, burst=2))  # a token every 0.5 s
    results = run(p, [0.0, 0.0, 0.0, 0.49, 0.5, 0.5, 1.5, 1.5, 1.5])
    assert [ok for ok, _ in results] == [True, True, False, False, True, False, True, True, False]


def test_burst_defaults_to_requests_and_bucket_never_overfills() -> None:
    """After a long idle time the bucket holds ``burst`` tokens, not more."""
    p = Policy("global", RateLimit(requests=3, per=1.0, burst=3))
    results = run(p, [1000.0] * 5)
    assert [ok for ok, _ in results] == [True, True, True, False, False]


def test_steady_rate_is_requests_per_period() -> None:
    """Over 10 s at 10/s with a burst of 5, exactly 5 + 100 requests pass."""
    p = Policy("agent", RateLimit(requests=10, per=1.0, burst=5))
    times = [i * 0.001 for i in range(10_000)]  # 1000/s for 10 s
    allowed = sum(ok for ok, _ in run(p, times))
    assert allowed == 5 + 100 - 1  # the last refill (at 10.0 s) falls after the last request


def test_remaining_counts_whole_tokens_left() -> None:
    p = Policy("ip", RateLimit(requests=60, per=60.0, burst=5))
    (_, ahead_1), (_, ahead_2) = run(p, [0.0, 0.0])
    assert remaining(p, ahead_1) == 4 and remaining(p, ahead_2) == 3
    assert remaining(p, 0) == 5  # a full bucket (no key)
    assert remaining(p, p.tolerance + 3) == 0  # never negative


def test_thirds_add_up_exactly() -> None:
    """In floating point 1/3 + 1/3 + 1/3 may exceed 1 and refuse the third of three."""
    p = Policy("ip", RateLimit(requests=3, per=1.0, burst=3))
    results = run(p, [0.0, 0.0, 0.0, 0.0])
    assert [ok for ok, _ in results] == [True, True, True, False]
    assert [remaining(p, ahead) for _, ahead in results[:3]] == [2, 1, 0]


def test_next_token_in_is_the_effective_window() -> None:
    p = Policy("ip", RateLimit(requests=1, per=10.0, burst=3))  # a token every 10 s
    assert next_token_in(p, 10 * S) == 10 * S  # one used just now
    assert next_token_in(p, 14 * S) == 4 * S  # 1.4 used: the 0.4 refills in 4 s
    assert next_token_in(p, 20 * S) == 10 * S  # exactly 2 used
    assert next_token_in(p, 0) == 10 * S  # full: one interval


def test_wait_for_is_time_until_one_token() -> None:
    p = Policy("ip", RateLimit(requests=2, per=1.0, burst=2))
    _, _, (allowed, ahead) = run(p, [0.0, 0.0, 0.2])
    assert not allowed
    assert wait_for(p, ahead) == 300_000  # the first token comes back at 0.5 s
    assert wait_for(p, S // 5) == 0


def test_waiting_the_announced_time_is_enough() -> None:
    """The promise behind Retry-After: retrying after ``wait_for`` seconds is allowed."""
    p = Policy("ip", RateLimit(requests=7, per=3.0, burst=2))
    tat: int | None = None
    now = 0
    for _ in range(50):
        allowed, new_tat = gcra(tat, now, p.interval, p.tolerance)
        if allowed:
            tat = new_tat
            continue
        wait = wait_for(p, new_tat - now)
        assert wait > 0
        assert gcra(tat, now + wait, p.interval, p.tolerance)[0]
        assert not gcra(tat, now + wait - 1, p.interval, p.tolerance)[0]
        now += wait


@pytest.mark.parametrize(
    ("micros", "whole"), [(1, 1), (S // 2, 1), (S, 1), (S + 1, 2), (59_200_000, 60), (0, 1)]
)
def test_whole_seconds_rounds_up_and_is_at_least_one(micros: int, whole: int) -> None:
    assert whole_seconds(micros) == whole
