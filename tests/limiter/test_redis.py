"""The Redis backend against a real redis-server started by the tests: the script,
its keys, outages and recovery; then sidecars (in-process and real processes)
sharing one budget through it, failing closed or open, and recovering."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from support.clients import post, until
from support.common import AGENT, Runtime, Sidecar, base_doc, free_port, write_config
from support.redis_server import RedisServer

from sidecar.limiter import LimiterUnavailable, MemoryLimiter, Policy, open_limiter
from sidecar.limiter.redis import KEY_PREFIX, SCRIPT_SHA, RedisLimiter, describe
from sidecar.settings import RateLimit

IP = Policy("ip", RateLimit(requests=2, per=3600.0, burst=2))
GLOBAL = Policy("global", RateLimit(requests=3, per=3600.0, burst=3))
AGENT_BODY = {"agent": AGENT, "message": "Deployed v1.2.3"}


@pytest.fixture
async def limiter(redis_server: RedisServer) -> AsyncIterator[RedisLimiter]:
    shared = RedisLimiter(redis_server.url)
    yield shared
    await shared.aclose()


class FrozenClock:
    """Drives only the limiter's back-off; the buckets run on Redis's own clock."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- the backend


def test_open_limiter_redis_and_logs_never_show_the_password() -> None:
    limiter = open_limiter("redis://:hunter2-password@10.0.0.9:6380/3")
    assert isinstance(limiter, RedisLimiter)
    assert limiter.where == "10.0.0.9:6380/3" == describe(limiter.backend)
    assert describe("redis://redis.internal") == "redis.internal:6379/0"


async def test_decisions_match_the_memory_backend(limiter: RedisLimiter) -> None:
    local = MemoryLimiter()
    for who in ["a", "a", "a", "b", "a", "b", "c", "c", "b", "d"]:
        checks = [(IP, f"ip:{who}"), (GLOBAL, "global")]
        remote, mine = await limiter.acquire(checks), local.take(checks)
        assert remote.allowed == mine.allowed, who
        # Both answer tat - now; they differ only by the time between the calls.
        for r, m in zip(remote.ahead, mine.ahead, strict=True):
            assert abs(r - m) < 500_000


async def test_keys_are_prefixed_and_expire_when_the_bucket_is_full(
    limiter: RedisLimiter,
) -> None:
    fast = Policy("agent", RateLimit(requests=10, per=0.5, burst=5))  # full again in 0.5 s
    await limiter.acquire([(IP, "ip:192.0.2.1"), (GLOBAL, "global")])
    await limiter.acquire([(fast, "agent:x")])
    keys = sorted(await limiter.client.keys("*"))
    assert keys == [b"whs:rl:agent:x", b"whs:rl:global", b"whs:rl:ip:192.0.2.1"]
    ttl = await limiter.client.pttl(KEY_PREFIX + "ip:192.0.2.1")
    assert 1_790_000 < ttl <= 1_800_000  # milliseconds: one token of 2/h refills in 30 min
    assert 0 < await limiter.client.pttl(KEY_PREFIX + "agent:x") <= 50
    await asyncio.sleep(0.2)
    assert await limiter.client.exists(KEY_PREFIX + "agent:x") == 0


async def test_refused_requests_charge_no_bucket(limiter: RedisLimiter) -> None:
    for _ in range(2):
        assert (await limiter.acquire([(IP, "ip:noisy"), (GLOBAL, "global")])).allowed
    for _ in range(5):
        assert not (await limiter.acquire([(IP, "ip:noisy"), (GLOBAL, "global")])).allowed
    assert (await limiter.acquire([(IP, "ip:quiet"), (GLOBAL, "global")])).allowed
    refused = await limiter.acquire([(IP, "ip:other"), (GLOBAL, "global")])
    assert not refused.allowed
    assert refused.ahead[0] == 0 and refused.ahead[1] > GLOBAL.tolerance - 1_000_000
    assert await limiter.client.exists(KEY_PREFIX + "ip:other") == 0


async def test_an_unknown_script_is_sent_in_full_once(limiter: RedisLimiter) -> None:
    await limiter.acquire([(GLOBAL, "global")])
    await limiter.client.script_flush()  # what a Redis restart does to the cache
    assert await limiter.client.script_exists(SCRIPT_SHA) == [False]
    decision = await limiter.acquire([(GLOBAL, "global")])
    assert decision.allowed and decision.ahead[0] > GLOBAL.interval  # the same bucket
    assert await limiter.client.script_exists(SCRIPT_SHA) == [True]  # cached again


async def test_concurrent_decisions_share_one_round_trip_and_stay_exact(
    redis_server: RedisServer, limiter: RedisLimiter
) -> None:
    """50 requests at once: one pipeline on one connection, and still exactly 3 allowed."""
    decisions = await asyncio.gather(
        *(limiter.acquire([(IP, f"ip:{i}"), (GLOBAL, "global")]) for i in range(50))
    )
    assert [d.allowed for d in decisions] == [True] * 3 + [False] * 47
    clients = redis_server.command("CLIENT", "LIST")
    assert clients is not None and clients.count(b"cmd=") == 2  # the limiter's and ours
    stats = redis_server.command("INFO", "commandstats") or b""
    assert b"cmdstat_evalsha:calls=50," in stats


async def test_a_batch_after_script_flush_is_sent_again_in_full(
    limiter: RedisLimiter,
) -> None:
    await limiter.acquire([(GLOBAL, "global")])
    await limiter.client.script_flush()
    decisions = await asyncio.gather(*(limiter.acquire([(GLOBAL, "global")]) for _ in range(4)))
    assert [d.allowed for d in decisions] == [True, True, False, False]
    assert await limiter.client.script_exists(SCRIPT_SHA) == [True]


async def test_an_error_for_one_decision_fails_only_that_one(limiter: RedisLimiter) -> None:
    await limiter.client.hset(KEY_PREFIX + "ip:odd", "x", "1")  # GET on a hash: WRONGTYPE
    results = await asyncio.gather(
        limiter.acquire([(IP, "ip:a")]),
        limiter.acquire([(IP, "ip:odd")]),
        limiter.acquire([(IP, "ip:b")]),
        return_exceptions=True,
    )
    assert isinstance(results[1], LimiterUnavailable)
    assert [r.allowed for r in (results[0], results[2])] == [True, True]  # type: ignore[union-attr]


async def test_a_cancelled_request_does_not_disturb_its_batch(limiter: RedisLimiter) -> None:
    first = asyncio.ensure_future(limiter.acquire([(GLOBAL, "global")]))
    second = asyncio.ensure_future(limiter.acquire([(GLOBAL, "global")]))
    await asyncio.sleep(0)  # both queued in one batch
    first.cancel()
    assert (await second).allowed
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_closing_ends_decisions_still_waiting(redis_server: RedisServer) -> None:
    limiter = RedisLimiter(redis_server.url)
    await limiter.acquire([(GLOBAL, "global")])  # connected
    redis_server.command("CLIENT", "PAUSE", "3000")  # Redis holds every reply
    waiting = asyncio.ensure_future(limiter.acquire([(GLOBAL, "global")]))
    await asyncio.sleep(0.05)
    await limiter.aclose()
    # Cancelled, not left waiting (nor answered by the 1 s socket timeout, which
    # would raise LimiterUnavailable).
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_unreachable_backend_fails_fast_backs_off_and_recovers(
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FrozenClock()
    limiter = RedisLimiter(redis_server.url, clock=clock)
    caplog.set_level(logging.INFO, "sidecar.limiter")
    try:
        assert (await limiter.acquire([(GLOBAL, "global")])).allowed  # a pooled connection
        redis_server.stop()
        started = time.monotonic()
        with pytest.raises(LimiterUnavailable):
            await limiter.acquire([(GLOBAL, "global")])
        assert time.monotonic() - started < 2
        redis_server.start()
        # Within the back-off the answer comes without trying the network...
        for _ in range(20):
            with pytest.raises(LimiterUnavailable):
                await limiter.acquire([(GLOBAL, "global")])
        # ...after it, the same limiter reconnects by itself.
        clock.now += 1.0
        assert (await limiter.acquire([(GLOBAL, "global")])).allowed
    finally:
        await limiter.aclose()
    messages = [r.getMessage() for r in caplog.records if r.name == "sidecar.limiter"]
    assert messages == ["rate limit backend unreachable", "rate limit backend reachable again"]
    recovered = caplog.records[-1]
    assert recovered.failedDecisions == 20  # type: ignore[attr-defined]


async def test_a_silent_backend_costs_one_timeout_not_one_per_request() -> None:
    """A listening socket nobody reads: connect succeeds, the reply never comes."""
    clock = FrozenClock()
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        limiter = RedisLimiter(url, timeout=1.0, clock=clock)
        try:
            started = time.monotonic()
            with pytest.raises(LimiterUnavailable):
                await limiter.acquire([(GLOBAL, "global")])
            assert 0.9 < time.monotonic() - started < 1.9  # one timeout, not retried
            # After the back-off one request probes; the others do not wait for it.
            clock.now += 1.0
            probe = asyncio.ensure_future(limiter.acquire([(GLOBAL, "global")]))
            await asyncio.sleep(0.05)
            started = time.monotonic()
            for _ in range(10):
                with pytest.raises(LimiterUnavailable):
                    await limiter.acquire([(GLOBAL, "global")])
            assert time.monotonic() - started < 0.5
            assert not probe.done()
            with pytest.raises(LimiterUnavailable):
                await probe
        finally:
            await limiter.aclose()


async def test_nothing_listening_is_unavailable() -> None:
    limiter = RedisLimiter(f"redis://127.0.0.1:{free_port()}/0")
    try:
        with pytest.raises(LimiterUnavailable):
            await limiter.acquire([(GLOBAL, "global")])
    finally:
        await limiter.aclose()


# ---------------------------------------------------------------- a sidecar on it


def redis_doc(runtime_path: Path, url: str, **rate_limit: Any) -> dict[str, Any]:
    return base_doc(runtime_path, rateLimit={"backend": url, **rate_limit})


async def test_sidecar_refuses_with_the_three_headers(
    make_sidecar: Any, runtime: Runtime, redis_server: RedisServer
) -> None:
    doc = redis_doc(runtime.path, redis_server.url, perIp={"requests": 2, "per": "1h"})
    sc: Sidecar = await make_sidecar(doc)
    for _ in range(2):
        status, headers, _ = await sc.post("/hooks/wake", {"agent": AGENT})
        assert status == 200 and headers["RateLimit"].startswith('"ip";r=')
    status, headers, body = await sc.post("/hooks/wake", {"agent": AGENT})
    assert (status, body["error"]) == (429, "rate_limited")
    assert headers["RateLimit-Policy"] == '"ip";q=2;w=3600'
    assert headers["Retry-After"] in ("1800", "1799")
    assert headers["RateLimit"] == f'"ip";r=0;t={headers["Retry-After"]}'


async def test_backend_down_fails_closed_then_recovers(
    make_sidecar: Any, runtime: Runtime, redis_server: RedisServer
) -> None:
    doc = redis_doc(runtime.path, redis_server.url, **{"global": {"requests": 100, "per": "1s"}})
    sc: Sidecar = await make_sidecar(doc)
    assert (await sc.post("/hooks/wake", {"agent": AGENT}))[0] == 200
    redis_server.stop()
    status, headers, body = await sc.post("/hooks/wake", {"agent": AGENT})
    assert (status, body["error"]) == (503, "limiter_unavailable")
    assert headers["Retry-After"] == "5"
    assert len(runtime.calls) == 1  # nothing reached the runtime unchecked
    audit = sc.audit.entries()[-1]
    assert (audit["status"], audit["error"]) == (503, "limiter_unavailable")
    redis_server.start()

    async def served() -> bool:
        return (await sc.post("/hooks/wake", {"agent": AGENT}))[0] == 200

    await until(served)  # service comes back with Redis
    assert sc.state.metrics.limiter_fail_open._value.get() == 0


async def test_backend_down_with_fail_open_lets_requests_pass_and_counts_them(
    make_sidecar: Any, runtime: Runtime, redis_server: RedisServer
) -> None:
    limit = {"requests": 1, "per": "1h"}
    doc = redis_doc(runtime.path, redis_server.url, perIp=limit, failOpen=True)
    sc: Sidecar = await make_sidecar(doc)
    assert (await sc.post("/hooks/wake", {"agent": AGENT}))[0] == 200
    assert (await sc.post("/hooks/wake", {"agent": AGENT}))[0] == 429  # limits apply while up
    redis_server.stop()
    for _ in range(3):
        status, headers, _ = await sc.post("/hooks/wake", {"agent": AGENT})
        assert status == 200 and "RateLimit" not in headers
    assert len(runtime.calls) == 4
    registry = sc.state.metrics.registry
    assert registry.get_sample_value("webhook_sidecar_limiter_fail_open_total") == 3
    redis_server.start()  # an empty Redis: the bucket starts full again

    async def limited_again() -> bool:
        return (await sc.post("/hooks/wake", {"agent": AGENT}))[0] == 429

    await until(limited_again)  # and so do the limits


# ---------------------------------------------------------------- real processes


@pytest.mark.slow
async def test_two_sidecar_processes_share_one_budget_exactly(
    runtime: Runtime, short_tmp: Path, sidecar_process: Any, redis_server: RedisServer
) -> None:
    budget = 5
    ports, procs = [], []
    for name in ("a", "b"):
        port, admin = free_port(), free_port()
        doc = redis_doc(
            runtime.path, redis_server.url,
            perIp={"requests": 100, "per": "1h"},
            **{"global": {"requests": budget, "per": "1h"}},
        )  # fmt: skip
        doc["sidecar"].update(listen=f"127.0.0.1:{port}", admin={"listen": f"127.0.0.1:{admin}"})
        folder = short_tmp / name
        folder.mkdir()
        procs.append(sidecar_process(write_config(folder, doc), admin))
        ports.append(port)

    async def send(port: int) -> tuple[int, Any, Any]:
        return await post(f"http://127.0.0.1:{port}/hooks/agent", AGENT_BODY)

    # Both at once, in rounds: 2N requests, N allowed in total, not 2N.
    results = []
    for _ in range(budget + 1):
        results += await asyncio.gather(*(send(p) for p in ports))
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == budget and statuses.count(429) == len(results) - budget
    assert len(runtime.calls) == budget
    refused = next(headers for status, headers, _ in results if status == 429)
    assert refused["RateLimit-Policy"] == f'"global";q={budget};w=3600'
    # The per-IP bucket was shared too: both processes charged the same key.
    ip_tat = redis_server.command("PTTL", KEY_PREFIX + "ip:127.0.0.1")
    assert ip_tat is not None and ip_tat.startswith(b":")

    # Redis goes away: both fail closed...
    redis_server.stop()
    for port in ports:
        for _ in range(5):
            status, headers, body = await send(port)
            assert (status, body["error"]) == (503, "limiter_unavailable")
            assert headers["Retry-After"] == "5"
    # ...and both come back by themselves when it returns (empty: a fresh budget).
    redis_server.start()
    for port in ports:

        async def served(port: int = port) -> bool:
            return (await send(port))[0] == 200

        await until(served)  # each recovers by itself
    # The outage was logged when it began and when it ended, not once per request.
    await asyncio.sleep(0.2)  # the log writer thread
    for proc in procs:
        lines = proc.json_lines()
        messages = [line["msg"] for line in lines if line.get("logger") == "sidecar.limiter"]
        assert messages == ["rate limit backend unreachable", "rate limit backend reachable again"]


async def test_agent_stage_unavailable_gives_the_slot_back(
    make_sidecar: Any, runtime: Runtime, redis_server: RedisServer
) -> None:
    doc = redis_doc(runtime.path, redis_server.url)
    doc["webhooks"]["agents"][AGENT].update(maxConcurrent=1, rateLimit={"requests": 9, "per": "1s"})
    sc: Sidecar = await make_sidecar(doc)
    assert (await sc.post("/hooks/wake", {"agent": AGENT}))[0] == 200
    redis_server.stop()
    for _ in range(3):  # each would hold the only slot forever if it were not given back
        status, _, body = await sc.post("/hooks/wake", {"agent": AGENT})
        assert (status, body["error"]) == (503, "limiter_unavailable")
    assert sc.state.in_flight.count(AGENT) == 0


async def test_reload_to_another_backend_retires_the_old_one(
    make_sidecar: Any, runtime: Runtime, redis_server: RedisServer
) -> None:
    import json

    from sidecar import config

    doc = redis_doc(runtime.path, redis_server.url, perIp={"requests": 1, "per": "1h"})
    sc: Sidecar = await make_sidecar(doc)
    assert (await sc.post("/hooks/wake", {"agent": AGENT}))[0] == 200
    shared = sc.state.limiter
    assert isinstance(shared, RedisLimiter)
    doc["sidecar"]["rateLimit"]["backend"] = "memory"
    sc.state.apply(config.loads(json.dumps(doc)))
    assert isinstance(sc.state.limiter, MemoryLimiter)
    assert sc.state.retired_limiters == [shared]
    assert (await sc.post("/hooks/wake", {"agent": AGENT}))[0] == 200  # a new, empty budget
    await sc.client.close()  # the app's cleanup closes both
    assert sc.state.limiter is None and sc.state.retired_limiters == []
